"""RDM (Nguyen, Do, Duong, Nguyen, "Domain Generalisation via Risk Distribution Matching",
WACV 2024), DomainBed's version: the penalties on small risk matrices written out by hand,
the anneal step and Adam's re-creation with ``rdm_lr``, and a short CLI run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad import models
from domaingrad.algorithms.distribution import RDM, RDM_GAMMAS, rdm_mmd, rdm_penalties
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import TinyFeaturizer, batches, build


@pytest.fixture
def tiny(monkeypatch):
    """TinyFeaturizer (tanh of one linear layer) in place of the real featurizer."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams, *a, **k: TinyFeaturizer(input_shape))


def _kernel(a: float, b: float) -> float:
    return sum(math.exp(-g * (a - b) ** 2) for g in RDM_GAMMAS)


def _mmd_by_hand(xs: list[float], ys: list[float]) -> float:
    kxx = sum(_kernel(a, b) for a in xs for b in xs) / len(xs) ** 2
    kyy = sum(_kernel(a, b) for a in ys for b in ys) / len(ys) ** 2
    kxy = sum(_kernel(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    return kxx + kyy - 2 * kxy


def _var(v: list[float]) -> float:
    m = sum(v) / len(v)
    return sum((x - m) ** 2 for x in v) / (len(v) - 1)


def test_penalties_on_a_small_risk_matrix():
    rows = [[0.2, 0.5, 0.1], [1.5, 0.3, 2.0], [0.9, 0.4, 0.6]]  # domain 1 has the largest mean risk
    erm, matching, variance = rdm_penalties(torch.tensor(rows, dtype=torch.float64))
    flat = [r for row in rows for r in row]
    assert erm.item() == pytest.approx(sum(flat) / 9, abs=1e-12)
    assert matching.item() == pytest.approx(_mmd_by_hand(rows[1], flat), abs=1e-10)
    assert variance.item() == pytest.approx(_var(flat) + _var(rows[1]), abs=1e-12)
    assert matching.item() > 1e-3
    # the kernel has the bandwidth 1e-4 that MMD's lacks
    assert 0.0001 in RDM_GAMMAS and len(RDM_GAMMAS) == 8
    assert rdm_mmd(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)).item() == 0.0


def _adam_first_step(params, grads, lr):
    """Adam's first step from zero moments: p - lr * g / (|g| + eps) (bias-corrected)."""
    return [p - lr * g / (g.abs() + 1e-8) for p, g in zip(params, grads)]


def test_update_before_the_anneal_step_is_plain_erm(tiny):
    algo = build(RDM, num_domains=3, rdm_penalty_anneal_iters=5, rdm_lambda=7.0, variance_weight=0.5)
    ref = copy.deepcopy(algo.network)
    mb = batches(3, n=4)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = _adam_first_step([p.detach() for p in ref.parameters()], grads, 1e-3)
    out = algo.update(mb)
    assert out["total_loss"] == pytest.approx(out["erm_loss"], abs=0) and out["matching_penalty"] > 0
    assert out["update_count"] == 1.0 and out["rdm_lambda"] == 7.0
    for p, q in zip(algo.network.parameters(), expected):
        assert torch.allclose(p, q, atol=1e-7, rtol=0)


def test_from_the_anneal_step_adam_is_recreated_with_rdm_lr_on_the_full_objective(tiny):
    algo = build(RDM, num_domains=2, rdm_penalty_anneal_iters=2, rdm_lambda=3.0, variance_weight=0.25, rdm_lr=2e-5)
    for step in range(2):
        before = algo.optimizer
        algo.update(batches(2, seed=step))
        assert algo.optimizer is before
    ref = copy.deepcopy(algo.network)
    mb = batches(2, seed=7, n=5)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    risks = F.cross_entropy(ref(x), y, reduction="none").view(2, 5)
    worst = int(risks.mean(1).argmax())
    flat = risks.flatten()
    matching = rdm_mmd(risks[worst].unsqueeze(1), flat.unsqueeze(1))
    objective = risks.mean() + 3.0 * matching + 0.25 * (flat.var() + risks[worst].var())
    grads = torch.autograd.grad(objective, list(ref.parameters()))
    expected = _adam_first_step([p.detach() for p in ref.parameters()], grads, 2e-5)
    before = algo.optimizer
    out = algo.update(mb)
    assert algo.optimizer is not before and algo.optimizer.param_groups[0]["lr"] == 2e-5
    assert out["total_loss"] == pytest.approx(objective.item(), rel=1e-6)
    assert out["total_loss"] > out["erm_loss"]
    for p, q in zip(algo.network.parameters(), expected):
        assert torch.allclose(p, q, atol=1e-9, rtol=0)
    after = algo.optimizer
    algo.update(mb)
    assert algo.optimizer is after and int(algo.update_count) == 4


def test_unequal_domain_batches_are_refused(tiny):
    algo = build(RDM)
    mb = batches(2, n=4)
    with pytest.raises(DomainGradError, match="equal batch sizes"):
        algo.update([mb[0], (mb[1][0][:3], mb[1][1][:3])])


@pytest.mark.parametrize(
    "dataset,expected",
    [
        (None, {"rdm_lambda": 5.0, "rdm_penalty_anneal_iters": 1500, "variance_weight": 0.004, "rdm_lr": 1.5e-5}),
        ("PACS", {"rdm_lambda": 5.0, "rdm_penalty_anneal_iters": 1500, "variance_weight": 0.004, "rdm_lr": 1.5e-5}),
        ("OfficeHome", {"rdm_lambda": 5.0, "rdm_penalty_anneal_iters": 1500, "variance_weight": 0.0, "rdm_lr": 1.5e-5}),
        ("DomainNet", {"rdm_lambda": 0.5, "rdm_penalty_anneal_iters": 2400, "variance_weight": 0.0, "rdm_lr": 1.5e-5}),
    ],
)
def test_domainbed_defaults_and_draws_by_dataset(dataset, expected):
    specs = {s.name: s for s in RDM.hparam_specs(False, dataset)}
    assert {k: s.default for k, s in specs.items()} == expected
    draws = {k: [s.draw(np.random.RandomState(i)) for i in range(40)] for k, s in specs.items()}
    low = {"PACS": 1.0, "DomainNet": 0.1}.get(dataset, 0.1)
    high = 1.0 if dataset == "DomainNet" else 10.0
    assert all(low <= d <= high for d in draws["rdm_lambda"]) and min(draws["rdm_lambda"]) < low + 0.3 * (high - low)
    assert all(8e-6 <= d <= 2e-5 for d in draws["rdm_lr"])
    assert all(type(d) is int for d in draws["rdm_penalty_anneal_iters"])
    if expected["variance_weight"] == 0.0:
        assert set(draws["variance_weight"]) == {0.0}
    else:
        assert all(0.001 <= d <= 0.007 for d in draws["variance_weight"])
    batch = {s.name: s for s in RDM.common_overrides(False, dataset)}["batch_size"]
    assert batch.default == (40 if dataset == "DomainNet" else 88)
    assert RDM.common_overrides(True, dataset) == []


@pytest.mark.slow
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    out = tmp_path / "run"
    record = train_by_spec(
        run_cli,
        tiny_mnist_dir,
        out,
        "domaingrad.algorithms.distribution:RDM",
        '{"batch_size": 8, "rdm_penalty_anneal_iters": 1}',
    )
    assert math.isfinite(record["total_loss"]) and record["matching_penalty"] > 0
