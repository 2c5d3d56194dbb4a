"""Fixtures of the sweep tests: a tiny MNIST folder and helpers to build sweep flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import embedded_digits_folder


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> Path:
    """A --data-dir of 240 real digits (80 per ColoredMNIST environment): a 3-step run's
    evaluation takes a fraction of a second, so a job costs little more than its imports."""
    return embedded_digits_folder(tmp_path_factory.mktemp("tiny_mnist"), 240, seed=1, n_train=200)


def sweep_flags(data_dir: Path, steps: int = 3, checkpoint_freq: int = 2, test_envs: str = "0 1") -> list[str]:
    """ERM on ColoredMNIST, the test envs one at a time, the default hparams, one trial."""
    return [
        "--datasets",
        "ColoredMNIST",
        "--algorithms",
        "ERM",
        "--single-test-envs",
        "--test-envs",
        *test_envs.split(),
        "--n-hparams",
        "1",
        "--n-trials",
        "1",
        "--steps",
        str(steps),
        "--checkpoint-freq",
        str(checkpoint_freq),
        "--hparams",
        '{"batch_size": 8}',
        "--data-dir",
        str(data_dir),
        "--skip-confirmation",
        "--no-progress",
    ]
