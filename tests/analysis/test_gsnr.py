"""The GSNR analysis (Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain
Generalization Guided by Gradient Signal to Noise Ratio of Parameters", ICCV 2023):
per-parameter GSNR on hand-computed cases, histograms that account for every parameter,
the loss difference read from records, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from domaingrad import models
from domaingrad.algorithms.erm import ERM
from domaingrad.analysis.gsnr import (
    RunGSNR,
    algorithm_gsnr,
    analyse,
    by_layer,
    histogram,
    log_edges,
    loss_gap_series,
    parameter_gsnr,
)
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, train
from tests.algorithms.staged import SHAPE, StagedCNN, build
from tests.analysis.plots import check_png

pytestmark = pytest.mark.usefixtures("single_thread")


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 4), nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def test_gsnr_of_a_constant_gradient_is_its_square_over_eps_and_an_unused_parameter_gets_zero():
    """Every sample the same input and label: zero variance, so GSNR = g^2 / eps (Listing 2's
    1e-7); a parameter the loss does not reach has zero gradient and GSNR 0."""
    torch.manual_seed(0)
    model = WithUnused()
    x, y = torch.randn(1, 3).repeat(5, 1), torch.tensor([2] * 5)
    gsnr = parameter_gsnr(model, x, y)
    loss = nn.functional.cross_entropy(model(x[:1]), y[:1])
    g_w, g_b = torch.autograd.grad(loss, [model.used.weight, model.used.bias])
    assert (g_w.abs() > 1e-3).all()
    torch.testing.assert_close(gsnr["used.weight"], g_w**2 / 1e-7, rtol=1e-4, atol=0)
    torch.testing.assert_close(gsnr["used.bias"], g_b**2 / 1e-7, rtol=1e-4, atol=0)
    assert torch.equal(gsnr["unused.weight"], torch.zeros(2, 2))
    # with a different eps, the value scales accordingly
    torch.testing.assert_close(parameter_gsnr(model, x, y, eps=1e-3)["used.weight"], g_w**2 / 1e-3, rtol=1e-4, atol=0)


def test_gsnr_of_two_samples_by_hand():
    """Linear(1, 2) with zero weights: softmax (1/2, 1/2), so dCE/dW = (p - onehot(y)) x.
    Sample 1 (x = 1, y = 0): W-gradient (-0.5, 0.5), bias (-0.5, 0.5); sample 2 (x = 2,
    y = 1): (1, -1), bias (0.5, -0.5). Weight: mean +-0.25, unbiased variance 1.125; bias:
    mean 0."""
    model = nn.Linear(1, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    gsnr = parameter_gsnr(model, torch.tensor([[1.0], [2.0]]), torch.tensor([0, 1]))
    expected = 0.0625 / (1.125 + 1e-7)
    torch.testing.assert_close(gsnr["weight"], torch.full((2, 1), expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(gsnr["bias"], torch.zeros(2), rtol=0, atol=1e-12)
    with pytest.raises(DomainGradError, match="at least 2 samples"):
        parameter_gsnr(model, torch.ones(1, 1), torch.tensor([0]))


def test_histograms_count_every_parameter_of_every_layer(monkeypatch):
    """StagedCNN + linear head: the layers are the three convolutions and the classifier
    (GroupNorm left out unless asked); each layer's histogram counts sum to its
    parameter count, zeros included in the first bin."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: StagedCNN(input_shape))
    algo = build(ERM)
    algo.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, *SHAPE, generator=g), torch.randint(0, 3, (6,), generator=g)
    gsnr = algorithm_gsnr(algo, x, y)
    assert algo.training  # mode restored
    layers = by_layer(gsnr)
    convs = algo.featurizer.convs
    assert list(layers) == ["featurizer.convs.0", "featurizer.convs.1", "featurizer.convs.2", "classifier"]
    expected = [sum(p.numel() for p in c.parameters()) for c in convs] + [
        sum(p.numel() for p in algo.classifier.parameters())
    ]
    assert [v.numel() for v in layers.values()] == expected
    assert len(by_layer(gsnr, weighted_only=False)) == 7  # the three GroupNorms too
    layers["classifier"][:2] = 0.0  # two zeros: counted in the first bin
    result = analyse([RunGSNR("r", "ERM", "x", gsnr={5: layers})], bins=7)
    for name, s in result.layers["r"][5].items():
        assert sum(s.counts) == s.n_params == layers[name].numel() and len(s.counts) == 7 and len(s.edges) == 8
        assert s.median == pytest.approx(float(layers[name].double().median()))
    assert result.layers["r"][5]["classifier"].zeros == 2


def test_log_edges_span_the_positive_values_and_clip_the_rest_into_the_end_bins():
    values = torch.tensor([0.0, 3e-5, 0.2, 0.2, 40.0])
    edges = log_edges([values], bins=7)
    assert edges[0] == pytest.approx(1e-5) and edges[-1] == pytest.approx(100.0) and len(edges) == 8
    counts = histogram(values, edges)
    assert counts.sum() == 5 and counts[0] == 2 and counts[-1] == 1  # 0 and 3e-5 in the first bin
    # at most 12 decades below the top: smaller values fall into the first bin
    assert log_edges([torch.tensor([1e-30, 1.0])], 4)[0] == pytest.approx(1e-12)
    assert np.allclose(log_edges([torch.zeros(3)], 2), [0.1, 10**-0.5, 1.0])


def test_loss_gap_series_reads_the_records_that_have_it():
    records = [{"step": 10, "loss_gap": 0.5}, {"step": 0, "loss_gap": 0.25}, {"step": 20, "loss": 1.0}]
    assert loss_gap_series(records) == ([0, 10], [0.25, 0.5])


def test_command_on_a_finished_run_and_on_a_run_it_trains(tmp_path, capsys):
    """``domaingrad analyze gsnr`` on a GSNRDropBlock run with model_step files (two of its
    three checkpoints measured, its recorded loss_gap plotted), and on a run it trains."""
    run_dir = tmp_path / "gsnrdb"
    args = TrainArgs(
        dataset="Debug28",
        algorithm="GSNRDropBlock",
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
    common = ["--samples", "3", "--bins", "10", "--output-dir", str(out)]
    assert main(["analyze", "gsnr", "--run", str(run_dir), "--checkpoints", "2", *common]) == 0
    summary = json.loads((out / "gsnr.json").read_text())
    run = summary["runs"]["gsnrdb"]
    assert sorted(run["gsnr"], key=int) == ["0", "4"] and run["loss_gap"]["steps"] == [0, 2, 4]
    assert all(v > 0 for v in run["loss_gap"]["values"])
    layer = run["gsnr"]["4"]["featurizer.conv1"]
    assert sum(layer["counts"]) == layer["n_params"] == 64 * 3 * 9 + 64
    check_png(out / "gsnr.png", wider_than=400)
    assert "median GSNR" in capsys.readouterr().out
    assert main(["analyze", "gsnr", "--run", str(run_dir), *common]) != 0
    assert "--force" in capsys.readouterr().err
    # a run trained by the analysis: GSNR at steps 0, 2 and the last (3), loss_gap every step
    fresh = tmp_path / "fresh"
    training = ["--dataset", "Debug28", "--steps", "4", "--every", "2", "--hparams", '{"batch_size": 4}']
    assert main(["analyze", "gsnr", *training, "--samples", "3", "--output-dir", str(fresh)]) == 0
    run = json.loads((fresh / "gsnr.json").read_text())["runs"]["this run"]
    assert sorted(run["gsnr"], key=int) == ["0", "2", "3"] and run["loss_gap"]["steps"] == [0, 1, 2, 3]


def test_command_refuses_a_loss_gap_only_analysis_of_runs_that_do_not_log_it(tmp_path, capsys):
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
    assert main(["analyze", "gsnr", "--run", str(run_dir), "--parts", "loss-gap", "--output-dir", str(tmp_path)]) != 0
    assert "no run logs loss_gap" in capsys.readouterr().err
