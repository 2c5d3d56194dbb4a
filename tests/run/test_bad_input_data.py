"""Bad data and arguments that used to train, or to fail with a traceback, get a clear
error before any training starts (exit 2, nothing written), or a warning on stderr."""

from __future__ import annotations

import re

import numpy as np
import pytest

from domaingrad.errors import DomainGradError
from domaingrad.layout import SPLIT_70_10_20
from domaingrad.registry import resolve_hparams
from domaingrad.run import TrainArgs, check_args
from tests.conftest import make_image_folder, write_idx, write_idx_folder

FOLDER = ["--image-size", "28", "--weights", "none", "--num-workers", "0", "--hparams", '{"backbone": "mnist_cnn"}']


def refused(run_cli, tmp_path, *args, message: str) -> str:
    """Run ``domaingrad train ARGS``; check it exits 2 with ``message`` (a regex), no
    traceback and no output directory; returns stderr."""
    out = tmp_path / "out"
    code, _, err = run_cli("train", *args, "--output-dir", out)
    assert code == 2, err
    assert err.startswith("domaingrad: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
    return err


def test_every_environment_a_test_environment(tmp_path, run_cli):
    refused(
        run_cli,
        tmp_path,
        *("--dataset", "Debug28", "--test-envs", "2", "0", "1"),
        message=r"--test-envs 2 0 1 names every environment of Debug28 \(0=0, 1=1, 2=2\), leaving none to train on",
    )


def test_image_folder_whose_only_domains_are_test_environments(tmp_path, run_cli):
    make_image_folder(tmp_path / "one", {"only": {"cat": 2, "dog": 2}})
    make_image_folder(tmp_path / "two", {"a": {"cat": 5, "dog": 5}, "b": {"cat": 5, "dog": 5}})
    for folder, test_envs in (("one", ["0"]), ("two", ["0", "1"])):
        refused(
            run_cli,
            tmp_path,
            *("--dataset", f"folder:{tmp_path / folder}", "--test-envs", *test_envs, *FOLDER),
            message="no training environment: every environment is a test environment; leave at least one",
        )


def _mnist(tmp_path, n: int = 42, n_train: int = 30, labels: np.ndarray | None = None):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=n).astype(np.uint8) if labels is None else labels
    raw = tmp_path / "MNIST" / "raw"
    write_idx_folder(raw, images, labels, n_train=n_train)
    return raw, images, labels


def test_idx_label_file_of_the_wrong_shape(tmp_path, run_cli):
    raw, images, labels = _mnist(tmp_path)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[30:].reshape(12, 1))
    write_idx(raw / "train-labels-idx1-ubyte", labels[:30].reshape(30, 1))
    refused(
        run_cli,
        tmp_path,
        *("--data-dir", tmp_path, "--steps", "1"),
        message=re.escape(f"{raw / 'train-labels-idx1-ubyte'} holds labels of shape (30, 1); expected an idx1 file"),
    )


@pytest.mark.parametrize("dataset", ["ColoredMNIST", "RotatedMNIST"])
def test_idx_labels_out_of_range(tmp_path, run_cli, dataset):
    labels = np.random.RandomState(1).randint(0, 10, size=42).astype(np.uint8)
    labels[[3, 7]] = 200
    raw, _, _ = _mnist(tmp_path, labels=labels)
    refused(
        run_cli,
        tmp_path,
        *("--dataset", dataset, "--data-dir", tmp_path, "--steps", "1"),
        message=re.escape(f"{raw / 'train-labels-idx1-ubyte'} holds 2 label(s) outside the digit classes 0..9"),
    )


def test_idx_counts_that_differ_per_file(tmp_path, run_cli):
    raw, images, labels = _mnist(tmp_path)
    write_idx(raw / "t10k-images-idx3-ubyte", images[25:])  # 17 images for 12 labels
    write_idx(raw / "train-images-idx3-ubyte", images[:25])  # 25 images for 30 labels: 42 in all either way
    refused(
        run_cli,
        tmp_path,
        *("--data-dir", tmp_path, "--steps", "1"),
        message=re.escape(f"{raw / 'train-labels-idx1-ubyte'} holds 30 labels but {raw / 'train-images-idx3-ubyte'}"),
    )


def test_idx_set_too_small_for_every_environment(tmp_path, run_cli):
    """Two digits for Colored MNIST's three environments: test environment 2 got none and
    the epoch count divided by zero after the first step."""
    raw, _, _ = _mnist(tmp_path, n=2, n_train=1)
    refused(
        run_cli,
        tmp_path,
        *("--data-dir", tmp_path, "--test-envs", "2", "--steps", "1"),
        message=re.escape(f"{raw / 'train-images-idx3-ubyte'} and {raw / 't10k-images-idx3-ubyte'} hold 2 image(s)"),
    )


def test_domain_adaptation_is_refused_without_uda_data_or_for_an_algorithm_ignoring_it(tmp_path):
    with pytest.raises(DomainGradError, match="--task domain_adaptation needs unlabelled test-environment data"):
        check_args(TrainArgs(dataset="Debug28", task="domain_adaptation", output_dir=str(tmp_path)))
    with pytest.raises(DomainGradError, match="ERM does not use unlabelled data"):
        check_args(
            TrainArgs(dataset="Debug28", task="domain_adaptation", uda_holdout_fraction=0.2, output_dir=str(tmp_path))
        )
    # a uda split under domain generalization is DomainBed's (same splits as an adaptation run)
    assert check_args(TrainArgs(dataset="Debug28", uda_holdout_fraction=0.2)).args.uda_holdout_fraction == 0.2
    assert check_args(TrainArgs(dataset="Debug28")).args.task == "domain_generalization"


def test_holdout_fraction_zero_is_refused(tmp_path, run_cli):
    refused(
        run_cli,
        tmp_path,
        *("--dataset", "Debug28", "--holdout-fraction", "0", "--steps", "1"),
        message=r"--holdout-fraction must be in \(0, 1\), got 0.0.*training-domain validation",
    )
    # unused under the 70/10/20 protocol, so not checked there
    check_args(TrainArgs(dataset="Debug28", holdout_fraction=0.0, split_protocol=SPLIT_70_10_20))


@pytest.mark.parametrize(
    "dataset, hparams, message",
    [
        ("ColoredMNIST", {"resnet_dropout": 5.0}, r"'resnet_dropout' must be in \[0, 1\), got 5.0"),
        ("RotatedMNIST", {"resnet_dropout": -0.1}, r"'resnet_dropout' must be in \[0, 1\), got -0.1"),
        ("PACS", {"weight_decay": -1e-4}, r"'weight_decay' must be >= 0, got -0.0001"),
    ],
)
def test_hparam_out_of_range_whatever_the_backbone(dataset, hparams, message):
    """Colored MNIST's MNIST_CNN has no dropout: a resnet_dropout of 5 used to train."""
    with pytest.raises(DomainGradError, match=message):
        resolve_hparams("ERM", dataset, 0, 0, hparams)
    with pytest.raises(DomainGradError, match=message):
        check_args(TrainArgs(dataset=dataset, hparams=hparams))


def test_hparam_out_of_range_through_the_cli(tmp_path, run_cli):
    refused(
        run_cli,
        tmp_path,
        *("--dataset", "ColoredMNIST", "--hparams", '{"resnet_dropout": 1.0}', "--steps", "1"),
        message=r"cannot build ERM with these hyperparameters: hyperparameter 'resnet_dropout' must be in \[0, 1\)",
    )


def test_class_map_on_a_dataset_without_class_folders(tmp_path, run_cli):
    mapping = tmp_path / "map.json"
    mapping.write_text('{"hund": "dog"}')
    refused(
        run_cli,
        tmp_path,
        *("--dataset", "Debug28", "--class-map", mapping, "--steps", "1"),
        message="--class-map applies only to image-folder datasets.*Debug28 has no class folders",
    )


def test_a_single_training_class_is_warned_about(tmp_path, run_cli, single_thread):
    """Domain a holds only cats: with the two others the test environments the classifier
    sees one class and learns nothing; the run says so (on stderr)."""
    make_image_folder(tmp_path / "pets", {"a": {"cat": 5}, "b": {"cat": 5, "dog": 5}, "c": {"dog": 5}}, size=(32, 32))
    with pytest.warns(UserWarning, match=r"environments 'a'\) holds a single class \(label 0\)"):
        code, _, err = run_cli(
            "train",
            *("--dataset", f"folder:{tmp_path / 'pets'}", "--test-envs", "1", "2", "--steps", "1", *FOLDER),
            *("--output-dir", tmp_path / "out"),
        )
    assert code == 0, err
