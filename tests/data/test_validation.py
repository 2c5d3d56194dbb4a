"""The data layer refuses malformed input with a clear error before any training: IDX
files whose labels have the wrong shape, are outside 0..9 or do not pair with the images,
digit sets too small for every environment, environments without samples, no training
environment at all, and unreadable class directories; it warns about a training set with
a single class and about empty out splits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from domaingrad.data import InfiniteMinibatches, Split, TensorEnvironment, get_dataset, split_environment
from domaingrad.data.images import ImageMinibatches
from domaingrad.errors import DomainGradError
from tests.conftest import make_image_folder, write_idx, write_idx_folder

SMALL = {"image_size": 32, "num_workers": 0}


def digits(n: int, seed: int = 0, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
    return images, rng.randint(0, 10, size=n).astype(np.uint8) if labels is None else labels


def test_label_file_of_the_wrong_shape_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    images, labels = digits(42)
    write_idx_folder(raw, images, labels, n_train=30)
    write_idx(raw / "train-labels-idx1-ubyte", labels[:30].reshape(30, 1))  # idx2 instead of idx1
    with pytest.raises(DomainGradError) as info:
        get_dataset("ColoredMNIST", str(tmp_path))
    text = str(info.value)
    assert f"{raw / 'train-labels-idx1-ubyte'} holds labels of shape (30, 1)" in text
    assert "expected an idx1 file of shape (N,)" in text


@pytest.mark.parametrize("dataset, bad", [("ColoredMNIST", 200), ("RotatedMNIST", 10), ("RotatedMNIST", 255)])
def test_labels_outside_the_digit_classes_are_refused(tmp_path, dataset, bad):
    """Colored MNIST took label 200 for class 1 (200 >= 5) without a word; Rotated MNIST
    failed inside the loss, with another error on each device."""
    raw = tmp_path / "MNIST" / "raw"
    images, labels = digits(42)
    labels[33] = bad  # in the t10k part
    write_idx_folder(raw, images, labels, n_train=30)
    with pytest.raises(DomainGradError) as info:
        get_dataset(dataset, str(tmp_path))
    text = str(info.value)
    assert f"{raw / 't10k-labels-idx1-ubyte'} holds 1 label(s) outside the digit classes 0..9 (values {bad})" in text


def test_counts_that_differ_per_file_are_refused_even_when_the_totals_agree(tmp_path):
    """30 + 12 images against 25 + 17 labels: concatenated, the totals agree (42) and
    every image after the 25th would silently take another image's label."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = digits(42)
    write_idx(raw / "train-images-idx3-ubyte", images[:30])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:25])
    write_idx(raw / "t10k-images-idx3-ubyte", images[30:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[25:])
    with pytest.raises(DomainGradError) as info:
        get_dataset("RotatedMNIST", str(tmp_path))
    text = str(info.value)
    assert f"{raw / 'train-labels-idx1-ubyte'} holds 25 labels but {raw / 'train-images-idx3-ubyte'} holds 30" in text
    assert "one label per image" in text


@pytest.mark.parametrize("dataset, n_envs, n", [("ColoredMNIST", 3, 2), ("RotatedMNIST", 6, 5)])
def test_a_digit_set_too_small_for_every_environment_names_its_files(tmp_path, dataset, n_envs, n):
    raw = tmp_path / "MNIST" / "raw"
    images, labels = digits(n)
    write_idx_folder(raw, images, labels, n_train=1)
    with pytest.raises(DomainGradError) as info:
        get_dataset(dataset, str(tmp_path))
    text = str(info.value)
    assert f"deals its digits round-robin to {n_envs} environments" in text
    assert str(raw / "train-images-idx3-ubyte") in text and str(raw / "t10k-images-idx3-ubyte") in text
    assert f"hold {n} image(s) in all" in text and f"expected at least {n_envs}" in text
    images, labels = digits(n_envs)  # one more digit: one for every environment
    write_idx_folder(raw, images, labels, n_train=1)
    assert [len(env) for env in get_dataset(dataset, str(tmp_path)).environments] == [1] * n_envs


def test_an_environment_without_samples_is_refused_when_split():
    empty = TensorEnvironment("nothing", torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DomainGradError, match=r"environment 4 \('nothing'\) has no samples"):
        split_environment(empty, 0.2, trial_seed=0, env_index=4)


def test_an_empty_out_split_is_warned_about():
    env = TensorEnvironment("tiny", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.warns(UserWarning, match=r"environment 1 \('tiny'\) gets an empty out \(validation\) split"):
        out, inside = split_environment(env, 0.2, trial_seed=0, env_index=1)
    assert len(out) == 0 and len(inside) == 4  # DomainBed's split all the same: int(4 * 0.2) = 0


def _split(labels: list[int], name: str = "e") -> Split:
    env = TensorEnvironment(name, torch.zeros(len(labels), 2), torch.tensor(labels))
    return Split(env, torch.arange(len(labels)))


def test_no_training_split_at_all_is_refused():
    with pytest.raises(DomainGradError, match="no training environment: every environment is a test environment"):
        InfiniteMinibatches([], batch_size=4, seed=0)
    with pytest.raises(DomainGradError, match="no training environment"):  # was an IndexError
        ImageMinibatches([], 4, 0, class_balanced=False, augment=False, num_workers=0)


def test_a_training_set_with_a_single_class_is_warned_about(recwarn):
    with pytest.warns(UserWarning, match=r"environments 'a', 'b'\) holds a single class \(label 1\).*trivial"):
        InfiniteMinibatches([_split([1, 1, 1], "a"), _split([1, 1], "b")], batch_size=4, seed=0)
    recwarn.clear()
    InfiniteMinibatches([_split([0, 0, 0], "a"), _split([1, 1], "b")], batch_size=4, seed=0)  # two classes in all
    assert not [w for w in recwarn if "single class" in str(w.message)]


def test_an_image_folder_whose_only_domain_is_the_test_environment_is_refused(tmp_path):
    make_image_folder(tmp_path / "mine", {"only": {"cat": 2, "dog": 3}})
    ds = get_dataset("folder:mine", str(tmp_path), **SMALL)
    with pytest.raises(DomainGradError, match="no training environment"):
        ds.minibatches([], batch_size=2, seed=0)


def test_an_unreadable_class_directory_is_reported_as_unreadable(tmp_path, monkeypatch):
    """Root reads every directory whatever its mode, so the listing itself is made to
    fail as it does for an ordinary user on a directory without read permission."""
    make_image_folder(tmp_path / "mine", {"d1": {"cat": 2, "dog": 1}, "d2": {"cat": 1, "dog": 1}})
    nested = tmp_path / "mine" / "d2" / "cat" / "more"
    nested.mkdir()
    (nested / "img9.jpg").write_bytes((tmp_path / "mine" / "d2" / "cat" / "img0.jpg").read_bytes())
    readable = get_dataset("folder:mine", str(tmp_path), **SMALL)
    assert [len(e) for e in readable.environments] == [3, 3]  # nested files are found, as before

    unreadable = tmp_path / "mine" / "d2" / "cat"
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(unreadable):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DomainGradError) as info:
        get_dataset("folder:mine", str(tmp_path), **SMALL)
    text = str(info.value)
    assert f"cannot read class directory {unreadable} (PermissionError: Permission denied)" in text
    assert "no images of class" not in text


def test_an_unreadable_nested_directory_is_reported_too(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "mine", {"d1": {"cat": 1, "dog": 1}, "d2": {"cat": 1, "dog": 1}})
    nested = tmp_path / "mine" / "d1" / "dog" / "more"
    nested.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(nested):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DomainGradError, match=f"cannot read directory {nested} "):
        get_dataset("folder:mine", str(tmp_path), **SMALL)
