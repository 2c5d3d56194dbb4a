"""Shared fixtures: small synthetic IDX folders and a helper to run the CLI in-process."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from domaingrad import cli


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array as an IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, n_train: int,
                     compress: bool = False) -> None:
    """The four MNIST IDX files in ``folder``: the first ``n_train`` as train, the rest as t10k."""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images[:n_train], compress)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:n_train], compress)
    write_idx(folder / "t10k-images-idx3-ubyte", images[n_train:], compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[n_train:], compress)


def make_idx_folder(folder: Path, n_train: int = 30, n_test: int = 12, seed: int = 0,
                    compress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Four IDX files of random digits in ``folder``; returns (images, labels), train then t10k."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n_train + n_test, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n_train + n_test).astype(np.uint8)
    write_idx_folder(folder, images, labels, n_train, compress)
    return images, labels


@pytest.fixture
def run_cli(capsys):
    """Run ``domaingrad ARGS`` in-process; returns (exit code, stdout, stderr)."""
    def _run(*args: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return _run


@pytest.fixture(scope="session")
def small_mnist_dir(tmp_path_factory) -> Path:
    """A --data-dir holding 1,200 real digits (a seeded subset of the embedded ones) as
    MNIST IDX files: ColoredMNIST/RotatedMNIST runs through the CLI whose evaluation
    takes a second instead of ten."""
    from domaingrad.data.digits import load_embedded_mnist

    pool = load_embedded_mnist()
    pick = np.random.RandomState(0).permutation(len(pool.images))[:1200]
    images, labels = pool.images.numpy()[pick], pool.labels.numpy()[pick].astype(np.uint8)
    root = tmp_path_factory.mktemp("small_mnist")
    write_idx_folder(root / "MNIST" / "raw", images, labels, n_train=1000)
    return root
