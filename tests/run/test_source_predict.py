"""Training environments are evaluated with ``predict_source`` and their training-domain
index (DMG's ``dmg_source_predict``), test environments with ``predict``."""

from __future__ import annotations

import json

import pytest
import torch

from domaingrad.algorithms.dmg import DMG
from domaingrad.run.evaluation import accuracy
from domaingrad.run.train import TrainArgs, TrainingRun

pytestmark = pytest.mark.usefixtures("single_thread")


def test_training_envs_use_their_own_domain_and_test_envs_the_test_rule(tmp_path, monkeypatch):
    args = TrainArgs(
        dataset="Debug28",
        algorithm="DMG",
        test_envs=[1],
        steps=1,
        checkpoint_freq=1,
        output_dir=str(tmp_path),
        device="cpu",
        hparams=json.dumps({"dmg_source_predict": "own_hard", "dmg_layers": "features"}),
    )
    run = TrainingRun.prepare(args)
    algo = run.algorithm
    assert isinstance(algo, DMG)
    calls = []
    predict, predict_source = algo.predict, algo.predict_source
    monkeypatch.setattr(algo, "predict", lambda x: calls.append(None) or predict(x))
    monkeypatch.setattr(algo, "predict_source", lambda x, d: calls.append(d) or predict_source(x, d))
    accs = run.evaluate()
    # in splits of envs 0, 1, 2, then out splits; env 1 is the test env (predict_source with
    # "own_hard" does not call predict); envs 0 and 2 are training domains 0 and 1
    assert [c for c in calls if c is not None] == [0, 1, 0, 1]
    assert calls.count(None) == 2
    monkeypatch.undo()
    with torch.no_grad():
        for i, d in ((0, 0), (2, 1)):
            split = run.out_splits[i]
            x, y = next(split.batches(len(split)))
            algo.eval()
            expected = (algo.predict_domain(x, d, hard=True).argmax(1) == y).float().mean().item()
            assert accs[f"env{i}_out_acc"] == pytest.approx(expected)
    assert accs["env1_out_acc"] == accuracy(algo, run.out_splits[1])
