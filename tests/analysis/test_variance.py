"""`analyze gradient-variance`: the distance between per-domain gradient variances that Fishr
penalises (Rame, Dancette, Cord, ICML 2022), by hand, against the Fishr algorithm, over
training and from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from domaingrad.algorithms import ERM, MultiHeaded
from domaingrad.algorithms.fishr import Fishr
from domaingrad.analysis._common import prepare_run
from domaingrad.analysis.variance import (
    algorithm_variance_distance,
    classifier_gradients,
    gradient_variances,
    variance_distance,
    variance_over_training,
)
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.hparams import common_hparams
from domaingrad.run import TrainArgs
from tests.algorithms import test_fishr
from tests.analysis.plots import check_png

tiny = test_fishr.tiny  # the fixture: TinyFeaturizer, float64


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_equal_variances_give_distance_zero():
    a = t([[1.0, 2.0], [3.0, 6.0]])
    shifted = a + 8.0  # a shift changes the mean, not the variance
    swapped = a.flip(0)
    result = variance_distance([a, shifted, swapped])
    assert result.distance == 0.0 and result.per_domain == [0.0, 0.0, 0.0]
    assert variance_distance([a, shifted], "irm_setup").distance == 0.0
    assert result.variances.tolist() == [[1.0, 4.0]] * 3


def test_two_domains_by_hand():
    # A: var (1, 0); B: var (0, 4); mean (0.5, 2); squared differences (0.25, 4) for both
    a, b = t([[1.0, 0.0], [3.0, 0.0]]), t([[0.0, 2.0], [0.0, -2.0]])
    result = variance_distance([a, b])
    assert result.variances.tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert result.distance == pytest.approx(2.125) and result.per_domain == pytest.approx([2.125, 2.125])
    assert result.mean_variance == pytest.approx(1.25)
    assert variance_distance([a, b], "irm_setup").distance == pytest.approx(8.5)


def test_three_domains_unequal_sizes_divide_by_n():
    # C has 3 samples: mean (1, 1), var ((1 + 1 + 4) / 3) = 2 per coordinate (not 3: divided by n)
    a, b, c = t([[1.0, 0.0], [3.0, 0.0]]), t([[0.0, 2.0], [0.0, -2.0]]), t([[0.0, 0.0], [0.0, 0.0], [3.0, 3.0]])
    assert gradient_variances([c]).tolist() == [[2.0, 2.0]]
    result = variance_distance([a, b, c])  # mean variance (1, 2): squares (0,4), (1,4), (1,0)
    assert result.per_domain == pytest.approx([2.0, 2.5, 0.5])
    assert result.distance == pytest.approx(5 / 3)
    assert variance_distance([a, b, c], "irm_setup").per_domain == pytest.approx([4.0, 5.0, 1.0])
    assert variance_distance([a, b, c], "irm_setup").distance == pytest.approx(10.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one domain"):
        variance_distance([])
    with pytest.raises(ValueError, match="common K"):
        variance_distance([t([[1.0, 2.0]]), t([[1.0, 2.0, 3.0]])])
    with pytest.raises(ValueError, match="normalization"):
        variance_distance([t([[1.0]])], "sum")


def make(cls, **overrides):
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    hp.update(overrides)
    torch.manual_seed(0)
    return cls((2, 3, 3), 3, 2, hp)


def domain_batches(sizes=(5, 4)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 3, 3, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("penalty", ["domainbed", "irm_setup"])
@pytest.mark.parametrize("nonlinear", [False, True])
def test_agrees_with_what_the_fishr_algorithm_penalises(tiny, penalty, nonlinear):
    fishr = make(Fishr, ema=0.0, fishr_penalty=penalty, nonlinear_classifier=nonlinear)
    batches = domain_batches()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    features = fishr.featurizer(x)
    expected = fishr.fishr_penalty(features, fishr.classifier(features), y, [5, 4])
    measured = algorithm_variance_distance(fishr, batches, normalization=penalty)
    assert measured.distance == pytest.approx(float(expected.detach()), rel=1e-10)
    assert measured.distance > 0


def test_the_closed_form_and_torch_func_paths_agree(tiny):
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    wrapped = nn.Sequential(layer)  # not an nn.Linear: goes through per_sample_gradients
    features, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    closed, generic = classifier_gradients(layer, features, y), classifier_gradients(wrapped, features, y)
    assert closed.shape == (7, 3 * 6 + 3) and torch.allclose(closed, generic, atol=1e-12)


def test_an_algorithm_without_one_classifier_is_refused(tiny):
    with pytest.raises(DomainGradError, match="featurizer` and `classifier"):
        algorithm_variance_distance(make(MultiHeaded), domain_batches())
    assert algorithm_variance_distance(make(ERM), domain_batches()).distance > 0


def debug_args(**overrides):
    values = dict(dataset="Debug28", test_envs=[0], steps=3, hparams={"batch_size": 4}, progress=False)
    values.update(overrides)
    return TrainArgs(**values)


def test_over_training_measures_every_k_steps_and_leaves_training_unchanged():
    plain = prepare_run(debug_args())
    for _ in range(3):
        plain.train_step()
    run = prepare_run(debug_args())
    curve = variance_over_training(run, every=2, batch_size=3)
    assert curve.algorithm == "ERM" and curve.steps == [0, 2, 3]
    assert len(curve.per_domain) == 3 and all(len(p) == 2 for p in curve.per_domain)
    assert all(d > 0 for d in curve.distance)
    assert curve.loss[0] != curve.loss[0] and all(v == v for v in curve.loss[1:])  # NaN before any update
    assert run.algorithm.training
    trained, reference = run.algorithm.state_dict(), plain.algorithm.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    with pytest.raises(DomainGradError, match="--batch-size"):
        variance_over_training(run, every=1, batch_size=1)


def test_command_compares_algorithms(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", "gradient-variance", "--dataset", "Debug28", "--steps", "2", "--every", "1"]
    argv += ["--batch-size", "4", "--hparams", '{"batch_size": 4}', "--output-dir", str(out)]
    assert main(argv + ["--algorithm-hparams", "Fishr", '{"penalty_anneal_iters": 0, "lambda": 10.0}']) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and "wrote" in captured.out
    summary = json.loads((out / "gradient-variance.json").read_text())
    erm, fishr = summary["algorithms"]["ERM"], summary["algorithms"]["Fishr"]
    assert erm["steps"] == fishr["steps"] == [0, 1, 2]
    # same seed: same initial weights and the same measurement batches at step 0
    assert erm["distance"][0] == fishr["distance"][0]
    assert erm["penalty_from"] is None and fishr["penalty_from"] == 0
    assert summary["hparams_overrides"]["Fishr"] == {"batch_size": 4, "penalty_anneal_iters": 0, "lambda": 10.0}
    lines = (out / "gradient-variance.csv").read_text().splitlines()
    assert lines[0].startswith("algorithm,step,distance,mean_variance,loss,domain0_distance,domain1_distance")
    assert len(lines) == 1 + 6
    check_png(out / "gradient-variance.png", wider_than=599, taller_than=199)

    assert main(argv + ["--force", "--algorithms", "Fishr", "--steps", "1"]) == 0  # default anneal 1500 > 1 step
    assert "penalty weight is 0 for the whole run" in capsys.readouterr().err
    assert main(argv + ["--force", "--algorithms", "ERM", "--algorithm-hparams", "Fishr", "{}"]) == 2
    assert "not in --algorithms" in capsys.readouterr().err
    assert main(argv + ["--force", "--algorithms", "ERM", "ERM"]) == 2
    assert "twice" in capsys.readouterr().err
