"""Surgery on per-domain against mixed batches (Mansilla et al., ICCV 2021, Fig. 4 control)."""

from __future__ import annotations

import json

import pytest

from domaingrad.analysis import mixed as X
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs
from tests.analysis.plots import check_png

BASE = TrainArgs(dataset="Debug28", algorithm="AgrSum", test_envs=[0], steps=4, hparams={"batch_size": 4})


def test_both_runs_start_from_the_same_model_and_samples_and_differ_only_in_the_batches(single_thread):
    runs = X.compare_batches(BASE, ["AgrSum"], [0], checkpoint_freq=2)
    assert [(r.algorithm, r.batches, r.seed) for r in runs] == [("AgrSum", "domain", 0), ("AgrSum", "mixed", 0)]
    domain, mixed = runs
    assert domain.steps == mixed.steps == [0, 2, 3]
    # step 0: the same network and the same 2 x 4 samples, regrouped; equal batch sizes,
    # so the mean of the two batch losses is the mean over the same eight samples
    assert mixed.stats["loss"][0] == pytest.approx(domain.stats["loss"][0], rel=1e-5)
    assert mixed.stats["fine_mod_freq"][0] != domain.stats["fine_mod_freq"][0]  # other gradients combined
    assert {"agree_frac", "fine_mod_freq", "coarse_mod_freq"} <= set(domain.stats) and "mod_ratio" not in domain.stats
    # the held-out accuracy is over the whole test environment (16 samples: in + out)
    for run in runs:
        assert all(abs(a * 16 - round(a * 16)) < 1e-9 and 0 <= a <= 1 for a in run.heldout_acc)


def test_only_surgery_algorithms_with_a_held_out_domain_are_compared(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("trained before every name was checked")

    monkeypatch.setattr(X._common, "prepare_run", never)
    with pytest.raises(DomainGradError, match="ERM is not a gradient-surgery algorithm"):
        X.compare_batches(BASE, ["AgrSum", "ERM"], [0], 2)
    with pytest.raises(DomainGradError, match="--test-envs"):
        X.train_with_batches(TrainArgs(**{**BASE.__dict__, "test_envs": []}), "mixed", 2)


def test_cli_end_to_end(tmp_path, capsys, single_thread):

    out = tmp_path / "mixed"
    args = ["analyze", "mixed-batches", "--output-dir", str(out), "--dataset", "Debug28", "--test-envs", "0"]
    args += ["--steps", "3", "--checkpoint-freq", "1", "--algorithms", "AgrSum", "PCGrad", "--seeds", "3"]
    assert main([*args, "--hparams", '{"batch_size": 4}']) == 0
    printed = capsys.readouterr().out
    assert printed.count("held-out accuracy") == 4 and "wrote" in printed
    summary = json.loads((out / "mixed.json").read_text())
    assert [(r["algorithm"], r["batches"], r["seed"]) for r in summary["runs"]] == [
        (a, b, 3) for a in ("AgrSum", "PCGrad") for b in ("domain", "mixed")
    ]
    assert all(r["steps"] == [0, 1, 2] for r in summary["runs"])
    assert "mod_ratio" in summary["runs"][2]["stats"] and "agree_frac" in summary["runs"][0]["stats"]
    lines = (out / "mixed.csv").read_text().splitlines()
    assert lines[0].startswith("algorithm,batches,seed,step,heldout_acc") and len(lines) == 1 + 4 * 3
    check_png(out / "mixed.png", wider_than=600)
    assert main(["analyze", "mixed-batches", "--output-dir", str(tmp_path / "bad"), "--checkpoint-freq", "0"]) != 0
    assert "--checkpoint-freq" in capsys.readouterr().err
