"""The dmg-masks analysis (Chattopadhyay, Balaji, Hoffman, "Learning to Balance Specificity
and Invariance for In and Out of Domain Generalization", ECCV 2020, Table 4, appendix
Table 5 and Fig. 4): overlaps of masks set by hand, the mask x domain accuracy matrix on
a hand-made case, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from domaingrad import models
from domaingrad.algorithms.dmg import DMG
from domaingrad.algorithms.erm import ERM
from domaingrad.analysis.dmg_masks import DMGMasks, mask_accuracies, mask_overlaps, pair_mean, probs_of_state
from domaingrad.cli import main
from domaingrad.data.base import Split, TensorEnvironment
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, train
from tests.algorithms.staged import StagedCNN, build
from tests.analysis.plots import check_png

pytestmark = pytest.mark.usefixtures("single_thread")

BIG = 50.0  # sigmoid(50) is 1.0 in float32; sigmoid(-50) about 2e-22


def set_masks(algo, masks):
    """Mask logits +-BIG from 0/1 patterns: layer -> (D, k)."""
    with torch.no_grad():
        for layer, pattern in masks.items():
            algo.mask_logits[layer].copy_(BIG * (2 * torch.tensor(pattern, dtype=torch.float32) - 1))


def test_identical_masks_overlap_fully_and_disjoint_ones_not_at_all(monkeypatch):
    """Three domains on StagedCNN's features (6 units): domains 0 and 1 keep units 0-2,
    domain 2 keeps units 3-5. Soft IoU (Eq. 1) and IoU at 0.5 are 1 for the identical
    pair, 0 for the disjoint ones; the mean over the three pairs is 1/3."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: StagedCNN(input_shape))
    algo = build(DMG, num_domains=3, dmg_layers="features")
    set_masks(algo, {"features": [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]})
    overlaps = mask_overlaps(algo.soft_masks())["features"]
    expected = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(overlaps["siou"], expected, rtol=0, atol=1e-6)
    assert torch.equal(overlaps["iou"], expected)
    assert overlaps["mean_siou"] == pytest.approx(1 / 3, abs=1e-6) and overlaps["mean_iou"] == pytest.approx(1 / 3)
    assert overlaps["active"].tolist() == [0.5, 0.5, 0.5]
    # the same from a saved model_dict (what the analysis reads from model_step files)
    saved = probs_of_state(algo.state_dict())
    assert torch.equal(saved["features"], algo.soft_masks()["features"].detach())
    assert pair_mean(torch.ones(1, 1)) == 1.0
    with pytest.raises(DomainGradError, match="mask_logits"):
        probs_of_state({"w": torch.zeros(1)})


class Flat(nn.Module):
    """A featurizer with one flat 'stage': its (B, 2) input as features."""

    n_outputs = 2
    stage_names = ("flat",)
    stage_channels = {"flat": 2}

    def __init__(self, input_shape):
        super().__init__()

    def forward(self, x, stage_fn=None):
        return x.flatten(1)


def test_accuracy_matrix_on_a_hand_made_case(monkeypatch):
    """Features (a, b) > 0, identity classifier. Mask m^0 = (1, 0) keeps a (always class 0),
    m^1 = (0, 1) keeps b (always class 1); the ensembles (mean mask (1/2, 1/2), or the
    mean of the two predictions) predict argmax(a, b). Domain 0's samples are all class
    0, domain 1's all class 1."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: Flat(input_shape))
    algo = build(DMG, num_domains=2, num_classes=2, dmg_layers="features")
    with torch.no_grad():
        algo.classifier.weight.copy_(torch.eye(2))
        algo.classifier.bias.zero_()
    set_masks(algo, {"features": [[1, 0], [0, 1]]})

    def split(x, y):
        env = TensorEnvironment("e", torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        return Split(env, torch.arange(len(y)))

    source0 = split([[2, 1], [1, 2]], [0, 0])  # ensembles: right, wrong
    source1 = split([[1, 2], [1, 3], [3, 1]], [1, 1, 1])  # ensembles: 2 of 3
    target = split([[3, 1], [1, 3], [3, 1], [2, 0.5]], [0, 1, 1, 0])  # ensembles 3 of 4; each mask 2 of 4
    expected = torch.tensor(
        [[1, 0, 0.5], [0, 1, 0.5], [0.5, 2 / 3, 0.75], [0.5, 2 / 3, 0.75], [0.5, 2 / 3, 0.75]], dtype=torch.float64
    )
    for hard in (False, True):
        acc = mask_accuracies(algo, [source0, source1, target], hard=hard, batch_size=2)
        torch.testing.assert_close(acc, expected, rtol=0, atol=1e-12)
    result = DMGMasks(
        ["m^0", "m^1", "Pred-Ens", "Pred-Ens (logits)", "Mask-Ens"],
        ["0", "1", "2"],
        [True, True, False],
        expected,
        None,
        False,
    )
    assert result.diagonal() == {"own": 1.0, "other": 0.0, "own_minus_best_other": 1.0}
    ens = result.ensembles()
    assert ens["Mask-Ens"]["in_domain"] == pytest.approx(7 / 12) and ens["Pred-Ens"]["out_of_domain"] == 0.75
    with pytest.raises(DomainGradError, match="needs a DMG"):
        mask_accuracies(build(ERM, num_domains=2), [target])


def test_command_on_a_finished_run_and_on_a_run_it_trains(tmp_path, capsys):
    run_dir = tmp_path / "dmg"
    args = TrainArgs(
        dataset="Debug28",
        algorithm="DMG",
        test_envs=[0],
        steps=5,
        checkpoint_freq=2,
        hparams={"batch_size": 4},
        output_dir=str(run_dir),
        save_model_every_checkpoint=True,
        progress=False,
    )
    train(args)
    out = tmp_path / "out"
    assert main(["analyze", "dmg-masks", "--run", str(run_dir), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "dmg-masks.json").read_text())
    assert summary["rows"] == ["m^1", "m^2", "Pred-Ens", "Pred-Ens (logits)", "Mask-Ens"]
    assert summary["columns"] == ["1", "2", "0"] and summary["source"] == [True, True, False]
    assert len(summary["accuracy"]) == 5 and all(0 <= a <= 1 for row in summary["accuracy"] for a in row)
    overlaps = summary["overlaps"]
    assert overlaps["source"] == "checkpoints" and overlaps["steps"] == [0, 2, 4]
    assert set(overlaps["values"][0]) == {"conv2", "conv3", "features"}  # MNIST_CNN's official placement
    check_png(out / "dmg-masks.png", wider_than=600)
    assert "Mask-Ens: in-domain" in capsys.readouterr().out
    # the matrix of an earlier checkpoint
    assert (
        main(["analyze", "dmg-masks", "--run", str(run_dir), "--step", "2", "--output-dir", str(tmp_path / "s2")]) == 0
    )
    assert json.loads((tmp_path / "s2" / "dmg-masks.json").read_text())["step"] == 2
    # a run the analysis trains: overlaps at steps 0, 2 and the last (3)
    fresh = tmp_path / "fresh"
    training = ["--dataset", "Debug28", "--steps", "4", "--every", "2", "--hparams", '{"batch_size": 4}']
    assert main(["analyze", "dmg-masks", *training, "--output-dir", str(fresh)]) == 0
    assert json.loads((fresh / "dmg-masks.json").read_text())["overlaps"]["steps"] == [0, 2, 3]


def test_command_refuses_a_run_that_is_not_dmg(tmp_path, capsys):
    run_dir = tmp_path / "erm"
    train(
        TrainArgs(
            dataset="Debug28",
            test_envs=[0],
            steps=1,
            hparams={"batch_size": 4},
            output_dir=str(run_dir),
            progress=False,
        )
    )
    assert main(["analyze", "dmg-masks", "--run", str(run_dir), "--output-dir", str(tmp_path / "o")]) != 0
    assert "needs a DMG run" in capsys.readouterr().err
