"""``domaingrad.train(...)``: the main job from Python, hyperparameters as a dict."""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch

import domaingrad as dg
from domaingrad.run.output import read_records

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_block() -> str:
    """The Python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.slow
def test_the_main_job_runs_from_python(tmp_path):
    """The README's Python API block: ERM on Colored MNIST (the embedded digits), test
    environment 2, here at one step (one checkpoint: evaluating the 10,000 digits takes
    most of the time) and with an output directory. The result holds the run's records,
    its final per-environment accuracies and the trained algorithm, the same as the files
    the run wrote; the other calls of the block give what they say."""
    out = tmp_path / "erm-cmnist"
    block = readme_api_block()
    assert "steps=201, checkpoint_freq=100)" in block
    block = block.replace("steps=201, checkpoint_freq=100)", "steps=1, output_dir=OUT, stream=STREAM)")
    namespace = {"OUT": out, "STREAM": io.StringIO()}
    exec(compile(block, str(README), "exec"), namespace)
    result = namespace["result"]
    on_disk, bad = read_records(out / "results.jsonl")
    assert bad == [] and [r["step"] for r in result.records] == [0] and namespace["records"] is result.records
    assert json.loads(json.dumps(result.records)) == on_disk
    assert result.environments == ["+90%", "+80%", "-90%"] and result.test_envs == [2] and result.output_dir == out
    assert result.accuracies == {
        i: {"in": on_disk[-1][f"env{i}_in_acc"], "out": on_disk[-1][f"env{i}_out_acc"]} for i in range(3)
    }
    assert result.hparams["batch_size"] == 64 and on_disk[-1]["hparams"] == result.hparams
    assert on_disk[-1]["args"]["hparams"] == '{"batch_size": 64, "lr": 0.001}'  # on disk: DomainBed's JSON text
    saved = torch.load(out / "model.pkl", weights_only=False)["model_dict"]
    trained = namespace["erm"].state_dict()
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k].cpu()) for k in saved)
    assert "per-environment accuracy at the last step" in namespace["STREAM"].getvalue()
    assert "ERM on ColoredMNIST | test envs [2]" in (out / "out.txt").read_text()
    assert namespace["draw"] == dg.resolve_hparams("Fishr", "ColoredMNIST", 3, 0) != namespace["defaults"]
    assert namespace["fishr"].hparams == namespace["draw"] and len(namespace["dataset"]) == 3


def test_without_output_dir_the_run_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory goes
    result = dg.train(dataset="Debug28", test_envs=[0], hparams={"batch_size": 4}, steps=2, verbose=False)
    assert result.output_dir is None and list(tmp_path.iterdir()) == []
    assert [r["step"] for r in result.records] == [0, 1]
    x = dg.get_dataset("Debug28")[0].x[:5]
    assert result.algorithm.predict(x).shape == (5, 2)


def test_a_class_is_accepted_for_the_algorithm_and_named_by_its_registered_name(tmp_path):
    result = dg.train(
        dataset="Debug28",
        algorithm=dg.ERM,
        test_envs=[0],
        hparams={"batch_size": 4},
        steps=1,
        output_dir=tmp_path / "run",
        verbose=False,
    )
    assert result.final["args"]["algorithm"] == "ERM"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hparams": '{"lr": 1e-3}'}, TypeError, "hparams is a dict"),
        ({"learning_rate": 1e-3}, TypeError, "unknown option.*learning_rate"),
        ({"hparams": {"lrr": 1.0}}, dg.DomainGradError, "unknown hyperparameter 'lrr'"),
        ({"test_envs": [5]}, dg.DomainGradError, "test env 5 is out of range"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, error, match):
    args = {
        "dataset": "Debug28",
        "test_envs": [0],
        "steps": 1,
        "output_dir": tmp_path / "run",
        "verbose": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        dg.train(**args)
    assert not Path(tmp_path / "run" / "results.jsonl").exists()
