"""The analyses' shared plumbing: output files that are never overwritten, the command
listing every analysis, class-restricted batches and rebuilt runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from matplotlib.figure import Figure

from domaingrad.analysis import ANALYSES
from domaingrad.analysis._common import Outputs, flatten_grads, load_run, prepare_run, sample_batch
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, train


def test_outputs_write_json_csv_png_and_never_overwrite(tmp_path):
    out = Outputs(tmp_path / "a", "demo")
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    paths = out.write({"x": float("nan"), "t": torch.tensor([1.0, 2.0])}, [{"a": 1}, {"a": 2, "b": 3}], figure)
    assert [p.name for p in paths] == ["demo.json", "demo.csv", "demo.png"]
    assert json.loads(paths[0].read_text()) == {"x": None, "t": [1.0, 2.0]}
    rows = list(csv.DictReader(paths[1].open()))
    assert rows == [{"a": "1", "b": ""}, {"a": "2", "b": "3"}]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DomainGradError, match="--force"):
        Outputs(tmp_path / "a", "demo")
    Outputs(tmp_path / "a", "demo", force=True)  # allowed when asked
    with pytest.raises(DomainGradError, match="empty"):
        Outputs("", "demo")


def test_analyze_help_lists_the_seven_analyses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["analyze", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert len(ANALYSES) == 7
    assert all(name in text for name in ANALYSES)


def test_sample_batch_restricts_to_one_class_without_replacement():
    run = prepare_run(TrainArgs(dataset="Debug28", test_envs=[0], hparams={"batch_size": 4}))
    split = run.in_splits[1]
    g = torch.Generator().manual_seed(0)
    x, y = sample_batch(split, 5, g, label=1)
    assert x.shape[0] == 5 == y.shape[0] and bool((y == 1).all())
    everything = sample_batch(split, 10**6, g)
    assert everything[0].shape[0] == len(split)
    assert sample_batch(split, 3, g, label=99) is None


def test_flatten_grads_keeps_leading_dims():
    g = [torch.ones(4, 2, 3), torch.zeros(4, 5)]
    flat = flatten_grads(g)
    assert flat.shape == (4, 11) and flat[:, :6].sum() == 24 and flat[:, 6:].sum() == 0


def test_load_run_rebuilds_the_trained_weights(tmp_path):
    args = TrainArgs(
        dataset="Debug28",
        test_envs=[0],
        steps=3,
        checkpoint_freq=2,
        hparams={"batch_size": 4},
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    train(args)
    loaded = load_run(tmp_path / "run")
    assert loaded.step is None and [r["step"] for r in loaded.records] == [0, 2]
    saved = torch.load(tmp_path / "run" / "model.pkl", weights_only=False)["model_dict"]
    assert all(torch.equal(saved[k], v) for k, v in loaded.run.algorithm.state_dict().items())
    assert not loaded.run.algorithm.training
    with pytest.raises(DomainGradError, match="no model.pkl"):
        load_run(tmp_path)
