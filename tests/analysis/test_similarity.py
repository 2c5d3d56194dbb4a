"""`analyze similarity`: intra/inter cosines of per-sample gradients on hand-built cases,
the training driver, and the command end to end (Mansilla et al., ICCV 2021, Fig. 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from domaingrad.algorithms import ERM
from domaingrad.analysis._common import prepare_run
from domaingrad.analysis.similarity import (
    gradient_similarity,
    layer_groups,
    measurement_steps,
    similarity_over_training,
)
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.hparams import common_hparams
from domaingrad.run import TrainArgs
from tests.analysis.plots import check_png


def weighted_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss y * sum(out): for a bias-free nn.Linear(k, 1) the sample's gradient is y * x."""
    return (out * y).sum()


def linear(k: int = 2, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, 1, bias=bias)


def batch(rows, scale=None):
    x = torch.tensor(rows, dtype=torch.float64)
    return x, torch.ones(len(rows), dtype=torch.float64) if scale is None else torch.tensor(scale, dtype=torch.float64)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_identical_gradients_have_cosine_one(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(1, 4).repeat(3, 1), torch.tensor([1, 1, 1])
    result = gradient_similarity(model, [(x, y), (x, y), (x, y)])  # cross-entropy by default
    assert result.network.intra == pytest.approx(1.0, abs=1e-12)
    assert result.network.inter == pytest.approx(1.0, abs=1e-12)
    assert (result.network.intra_pairs, result.network.inter_pairs) == (3 * 3, 3 * 9)


def test_orthogonal_domains_have_inter_cosine_zero_and_opposite_ones_minus_one(float64):
    a, b = batch([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), batch([[0.0, 3.0, 0.0], [0.0, 0.5, 0.0]])
    result = gradient_similarity(linear(3), [a, b], loss_fn=weighted_sum)
    assert abs(result.network.inter) < 1e-12
    assert result.network.intra == pytest.approx(1.0, abs=1e-12)
    # the loss's sign flips the gradient: y = -1 in the second domain -> cos = -1 across
    flipped = batch([[1.0, 0.0, 0.0], [4.0, 0.0, 0.0]], scale=[-1.0, -2.0])
    result = gradient_similarity(linear(3), [a, flipped], loss_fn=weighted_sum)
    assert result.network.inter == pytest.approx(-1.0, abs=1e-12)
    assert result.network.gap == pytest.approx(2.0, abs=1e-12)


def test_intra_and_inter_bookkeeping_by_hand(float64):
    # gradients are the inputs: a1 = a2 = (1, 0); b1 = (0, 1), b2 = (1, 1)
    a, b = batch([[1.0, 0.0], [1.0, 0.0]]), batch([[0.0, 1.0], [1.0, 1.0]])
    result = gradient_similarity(linear(), [a, b], loss_fn=weighted_sum)
    # intra pairs: (a1, a2) = 1 and (b1, b2) = 1/sqrt(2); inter: a.b1 = 0 twice, a.b2 = 1/sqrt(2) twice
    assert result.network.intra == pytest.approx((1 + 2**-0.5) / 2, abs=1e-12)
    assert result.network.inter == pytest.approx(2**-0.5 / 2, abs=1e-12)
    assert (result.network.intra_pairs, result.network.inter_pairs) == (2, 4)


def test_pairs_are_pooled_over_domains_not_averaged_per_domain(float64):
    # domain A: (1,0), (1,0), (0,1): pair cosines 1, 0, 0; domain B: (0,1), (0,2): 1
    a, b = batch([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), batch([[0.0, 1.0], [0.0, 2.0]])
    result = gradient_similarity(linear(), [a, b], loss_fn=weighted_sum)
    assert result.network.intra == pytest.approx(2 / 4, abs=1e-12)  # not (1/3 + 1) / 2
    assert result.network.inter == pytest.approx(2 / 6, abs=1e-12)  # only (0,1) matches B
    assert (result.network.intra_pairs, result.network.inter_pairs) == (4, 6)


def test_a_zero_gradient_leaves_its_pairs_out(float64):
    # a1 = 0 (cosine undefined): only (a2, a3) = 1 and (b1, b2) = 1 are intra pairs; inter: 4 zeros
    a, b = batch([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), batch([[0.0, 1.0], [0.0, 2.0]])
    result = gradient_similarity(linear(), [a, b], loss_fn=weighted_sum)
    assert (result.network.intra_pairs, result.network.inter_pairs) == (2, 4)
    assert result.network.intra == pytest.approx(1.0, abs=1e-12)  # a zero counted as cosine 0 would give 0.5
    assert abs(result.network.inter) < 1e-12


def test_groups_measure_each_layer_alone_and_the_network_as_one_vector(float64):
    # nn.Linear(2, 2) with loss sum(out): dW = [x; x], db = (1, 1)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    a, b = batch([[1.0, 0.0], [1.0, 0.0]]), batch([[0.0, 1.0], [1.0, 1.0]])
    result = gradient_similarity(
        model, [a, b], groups={"w": ["weight"], "b": ["bias"]}, loss_fn=lambda out, y: out.sum() * y
    )
    assert list(result.layers) == ["w", "b"]
    assert result.layers["b"].intra == pytest.approx(1.0) and result.layers["b"].inter == pytest.approx(1.0)
    assert result.layers["w"].intra == pytest.approx((1 + 2**-0.5) / 2, abs=1e-12)
    # whole network: <g_i, g_j> = 2 (x_i . x_j + 1)
    assert result.network.intra == pytest.approx((1 + 2 / math.sqrt(6)) / 2, abs=1e-12)
    assert result.network.inter == pytest.approx((0.5 + 2 / math.sqrt(6)) / 2, abs=1e-12)


def test_bad_input_is_refused():
    a = batch([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        gradient_similarity(linear(), [a], loss_fn=weighted_sum)
    with pytest.raises(ValueError, match="two samples"):
        gradient_similarity(linear(), [batch([[1.0, 0.0]]), batch([[0.0, 1.0]])], loss_fn=weighted_sum)
    with pytest.raises(ValueError, match="group 'g'"):
        gradient_similarity(linear(), [a, a], groups={"g": ["nope"]}, loss_fn=weighted_sum)


def test_layer_groups_use_the_algorithms_names():
    hp = {s.name: s.default for s in common_hparams(True)}
    algorithm = ERM((2, 28, 28), 2, 2, hp)
    groups = layer_groups(algorithm.network, naming=algorithm)
    assert groups["featurizer.conv1"] == ["0.conv1.weight", "0.conv1.bias"]
    assert groups["classifier"] == ["1.weight", "1.bias"]
    assert sum(map(len, groups.values())) == len(list(algorithm.network.parameters()))
    assert layer_groups(nn.Linear(2, 1)) == {"(root)": ["weight", "bias"]}


def test_measurement_steps_include_zero_and_the_last():
    assert measurement_steps(10, 4) == [0, 4, 8, 10]
    assert measurement_steps(8, 4) == [0, 4, 8]


def debug_args(**overrides):
    values = dict(dataset="Debug28", test_envs=[0], steps=3, hparams={"batch_size": 4}, progress=False)
    values.update(overrides)
    return TrainArgs(**values)


def test_over_training_measures_one_class_at_a_time_and_leaves_training_unchanged():
    plain = prepare_run(debug_args())
    for _ in range(3):
        plain.train_step()
    run = prepare_run(debug_args())
    curve = similarity_over_training(run, every=2, batch_size=3, per_layer=True)
    assert curve.steps == [0, 2, 3] and curve.labels == [0, 1, 0]
    assert curve.train_envs == [1, 2] and curve.test_envs == [0]
    assert all(c.intra_pairs == 2 * 3 and c.inter_pairs == 9 for c in curve.network)
    assert "classifier" in curve.layers and len(curve.layers["classifier"]) == 3
    assert run.algorithm.training  # mode restored
    trained, reference = run.algorithm.state_dict(), plain.algorithm.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    with pytest.raises(DomainGradError, match="--every"):
        similarity_over_training(run, every=0, batch_size=3)
    with pytest.raises(DomainGradError, match="--batch-size"):
        similarity_over_training(run, every=1, batch_size=1)


def test_command_writes_json_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", "similarity", "--dataset", "Debug28", "--steps", "2", "--every", "1", "--batch-size", "3"]
    argv += ["--per-layer", "--hparams", '{"batch_size": 4}', "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "intra > inter at" in printed and "wrote" in printed
    summary = json.loads((out / "similarity.json").read_text())
    (combination,) = summary["combinations"]
    assert combination["steps"] == [0, 1, 2] and combination["test_envs"] == [0]
    assert combination["mean_gap"] == pytest.approx(
        sum(i - j for i, j in zip(combination["intra"], combination["inter"])) / 3
    )
    assert "featurizer.conv1" in combination["layers"]
    lines = (out / "similarity.csv").read_text().splitlines()
    assert lines[0].startswith("test_envs,sources,step,class,layer,intra,inter")
    assert sum(",network," in line for line in lines) == 3
    check_png(out / "similarity.png", wider_than=299, taller_than=199)
    assert main(argv) == 2  # never overwrites without --force
    assert "--force" in capsys.readouterr().err


def test_command_all_combinations_one_panel_each(tmp_path, capsys):
    out = tmp_path / "all"
    argv = ["analyze", "similarity", "--dataset", "Debug28", "--steps", "1", "--every", "1", "--batch-size", "2"]
    assert main(argv + ["--all-combinations", "--hparams", '{"batch_size": 4}', "--output-dir", str(out)]) == 0
    summary = json.loads((out / "similarity.json").read_text())
    assert [c["test_envs"] for c in summary["combinations"]] == [[0], [1], [2]]
    assert [c["train_envs"] for c in summary["combinations"]] == [[1, 2], [0, 2], [0, 1]]
    check_png(out / "similarity.png", wider_than=899, taller_than=199)  # three panels side by side
    capsys.readouterr()
    assert main(argv + ["--all-combinations", "--test-envs", "1", "--output-dir", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err
