"""The arguments of a run (domaingrad.run.args): hyperparameters as a dict, written as
DomainBed's JSON text on disk, checked once per run."""

from __future__ import annotations

import importlib
import io

import pytest
import torch

from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, check_args, run_training, train
from domaingrad.run.output import read_records
from tests.conftest import train_until_interrupted


def debug_args(tmp_path, **changes) -> TrainArgs:
    fields = {
        "dataset": "Debug28",
        "test_envs": [0],
        "steps": 4,
        "checkpoint_freq": 2,
        "hparams": {"batch_size": 8, "lr": 0.002},
        "output_dir": str(tmp_path / "run"),
        "progress": False,
    }
    return TrainArgs(**{**fields, **changes})


def test_hparams_are_a_dict_and_written_as_domainbeds_json_text(tmp_path):
    record = train(debug_args(tmp_path), stream=io.StringIO())
    assert record["hparams"]["batch_size"] == 8 and record["hparams"]["lr"] == 0.002
    assert record["args"]["hparams"] == '{"batch_size": 8, "lr": 0.002}'
    model = torch.load(tmp_path / "run" / "model.pkl", weights_only=False)
    assert model["args"]["hparams"] == record["args"]["hparams"] and model["model_hparams"] == record["hparams"]


def test_the_arguments_are_checked_once_per_run(tmp_path, monkeypatch):
    train_module = importlib.import_module("domaingrad.run.train")  # domaingrad.run.train is also a function

    calls = []
    monkeypatch.setattr(train_module, "check_args", lambda args: calls.append(args) or check_args(args))
    outcome = run_training(debug_args(tmp_path), stream=io.StringIO())
    assert len(calls) == 1 and [r["step"] for r in outcome.records] == [0, 2, 3]
    assert outcome.run.algorithm.hparams["lr"] == 0.002  # the trained algorithm comes back too


def test_a_run_saved_with_hparams_as_text_resumes_from_the_dict(tmp_path, monkeypatch):
    """An older checkpoint holds ``--hparams`` as the text the user typed; the same values
    as a dict continue it (no 'other arguments' refusal) to the uninterrupted records."""
    reference = run_training(debug_args(tmp_path, output_dir=str(tmp_path / "ref")), stream=io.StringIO()).records
    args = debug_args(tmp_path)
    train_until_interrupted(monkeypatch, args, at_call=4)  # after the checkpoint at step 2
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["args"]["hparams"] = '{"lr": 2e-3,  "batch_size": 8}'
    torch.save(state, checkpoint)
    resumed = run_training(args, stream=io.StringIO()).records
    assert "resuming from the checkpoint at step 2" in (tmp_path / "run" / "out.txt").read_text()
    timing = {"step_time", "wall_time", "mem_gb", "args"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in reference
    ]
    assert read_records(tmp_path / "run" / "results.jsonl")[0][-1]["step"] == 3
    # the same command on the finished run trains nothing and returns its last record
    again = io.StringIO()
    assert train(args, stream=again)["step"] == 3 and "finished" in again.getvalue()


def test_saved_arguments_come_back_checked(tmp_path):
    args = TrainArgs.from_dict(debug_args(tmp_path).record())
    assert args.overrides() == {"batch_size": 8, "lr": 0.002} and args.record() == debug_args(tmp_path).record()
    with pytest.raises(DomainGradError, match="unknown train argument.*learning_rate"):
        TrainArgs.from_dict({"learning_rate": 0.1})
