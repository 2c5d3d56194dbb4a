"""Bad input gets a clear error that says what was expected, and loses nothing."""

from __future__ import annotations

import math
import re

import pytest

from domaingrad.algorithms import ERM
from domaingrad.run.output import read_records
from tests.conftest import make_idx_folder

DEBUG = ["train", "--dataset", "Debug28", "--test-envs", "0", "--hparams", '{"batch_size": 4}']


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "ColouredMNIST"], "unknown dataset 'ColouredMNIST'; valid datasets: ColoredMNIST"),
        (["train", "--algorithm", "EMR"], "unknown algorithm 'EMR'; valid algorithms: ERM"),
        (
            ["train", "--dataset", "Debug28", "--test-envs", "3"],
            "test env 3 is out of range: Debug28 has 3 environments, 0..2",
        ),
        (["train", "--dataset", "Debug28", "--test-envs", "-1"], "test env -1 is out of range"),
        (["train", "--dataset", "Debug28", "--hparams", '{"lrr": 0.1}'], "unknown hyperparameter 'lrr'.*valid names"),
        (["train", "--dataset", "Debug28", "--hparams", '{"lr": "big"}'], "'lr' must be of type float"),
        (["train", "--dataset", "Debug28", "--hparams", '{"lr": 1e-3'], "--hparams is not valid JSON"),
        (["train", "--dataset", "Debug28", "--hparams", '{"batch_size": 0}'], "'batch_size' must be >= 1, got 0"),
        (["train", "--dataset", "Debug28", "--hparams", '{"lr": -1.0}'], "cannot build ERM with these hyperparameters"),
        (["train", "--dataset", "Debug28", "--steps", "0"], "--steps must be a positive integer"),
    ],
)
def test_bad_arguments_are_explained(tmp_path, run_cli, args, message):
    out = tmp_path / "out"
    code, _, err = run_cli(*args, "--output-dir", out)
    assert code == 2
    assert err.startswith("domaingrad: error: ")
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (out / "results.jsonl").exists()


def test_data_dir_without_mnist_files(tmp_path, run_cli):
    code, _, err = run_cli("train", "--data-dir", tmp_path, "--output-dir", tmp_path / "o")
    assert code == 2 and "MNIST files missing" in err and "omit --data-dir" in err


def test_data_dir_with_truncated_mnist(tmp_path, run_cli):
    make_idx_folder(tmp_path / "MNIST" / "raw")
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    code, _, err = run_cli("train", "--data-dir", tmp_path, "--output-dir", tmp_path / "o")
    assert code == 2 and "t10k-labels-idx1-ubyte is truncated" in err


def test_user_mnist_folder_is_used_and_logged(tmp_path, run_cli):
    make_idx_folder(tmp_path / "MNIST" / "raw", n_train=60, n_test=30)
    out = tmp_path / "o"
    code, _, _ = run_cli(
        "train",
        "--data-dir",
        tmp_path,
        "--output-dir",
        out,
        "--test-envs",
        "2",
        "--steps",
        "1",
        "--hparams",
        '{"batch_size": 4}',
    )
    assert code == 0
    assert f"90 images from IDX files in {tmp_path / 'MNIST' / 'raw'}" in (out / "out.txt").read_text()


def test_finished_run_is_not_overwritten(tmp_path, run_cli):
    """The same command again says the run is finished (exit 0); other arguments are
    refused (exit 2); neither touches a file."""
    out = tmp_path / "o"
    assert run_cli(*DEBUG, "--steps", "2", "--output-dir", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, _ = run_cli(*DEBUG, "--steps", "2", "--output-dir", out)
    assert code == 0 and "finished" in stdout
    code, _, err = run_cli(*DEBUG, "--steps", "2", "--seed", "3", "--output-dir", out)
    assert code == 2 and "finished run" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unfinished_run_with_other_arguments_is_not_overwritten(tmp_path, run_cli, monkeypatch):
    out = tmp_path / "o"
    _stop_at(monkeypatch, step=3)
    assert run_cli(*DEBUG, "--steps", "6", "--checkpoint-freq", "2", "--output-dir", out)[0] == 1
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(*DEBUG, "--steps", "6", "--checkpoint-freq", "2", "--seed", "9", "--output-dir", out)
    assert code == 2 and "other arguments (seed: saved 0, now 9)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _stop_at(monkeypatch, step: int) -> None:
    """Make ERM's update return a NaN loss at ``step`` (0-based)."""
    real = ERM.update
    calls = {"n": 0}

    def update(self, minibatches, unlabeled=None):
        out = real(self, minibatches)
        calls["n"] += 1
        return {"loss": math.nan} if calls["n"] == step + 1 else out

    monkeypatch.setattr(ERM, "update", update)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, run_cli, monkeypatch):
    out = tmp_path / "o"
    _stop_at(monkeypatch, step=5)
    code, _, err = run_cli(*DEBUG, "--steps", "10", "--checkpoint-freq", "2", "--output-dir", out)
    assert code == 1
    assert "non-finite value at step 5" in err and "last good checkpoint (step 4)" in err
    assert not (out / "done").exists() and (out / "checkpoint.pt").exists()
    assert [r["step"] for r in read_records(out / "results.jsonl")[0]] == [0, 2, 4]
    monkeypatch.undo()  # the same command now resumes from step 4 and finishes
    code, _, _ = run_cli(*DEBUG, "--steps", "10", "--checkpoint-freq", "2", "--output-dir", out)
    assert code == 0 and (out / "done").exists()
    assert [r["step"] for r in read_records(out / "results.jsonl")[0]] == [0, 2, 4, 6, 8, 9]


def test_real_divergence_is_caught(tmp_path, run_cli):
    out = tmp_path / "o"
    code, _, err = run_cli(
        *DEBUG[:-1], '{"batch_size": 4, "lr": 1e30}', "--steps", "30", "--checkpoint-freq", "50", "--output-dir", out
    )
    assert code == 1 and "non-finite value at step" in err
    assert not (out / "done").exists()
