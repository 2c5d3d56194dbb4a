"""IGA, IB_ERM, IB_IRM and EQRM: each update checked against the method's formula written
out by hand, the anneal / burn-in schedules, and a short CLI run on Colored MNIST each."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd

from domaingrad import models
from domaingrad.algorithms.bottleneck import IB_ERM, IB_IRM, ib_penalty
from domaingrad.algorithms.invariance import EQRM, IGA, kde_quantile
from domaingrad.errors import DomainGradError
from tests.algorithms.test_alignment import train_through_cli
from tests.algorithms.test_baselines import (
    TinyFeaturizer,
    adam_step,
    assert_same_params,
    batches,
    build,
    irm_penalty_by_hand,
)


@pytest.fixture
def tiny(monkeypatch):
    """The algorithms built here get test_baselines' TinyFeaturizer."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))


# -- IGA ------------------------------------------------------------------------------------


def test_iga_gradient_penalty_on_small_tensors():
    grads = [(torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])), (torch.tensor([3.0, 0.0]), torch.tensor([[2.0]]))]
    mean = (torch.tensor([2.0, 1.0]), torch.tensor([[1.0]]))
    # (1-2)^2 + (2-1)^2 + (0-1)^2 + (3-2)^2 + (0-1)^2 + (2-1)^2
    assert IGA.gradient_penalty(grads, mean).item() == 6.0


def test_iga_update_is_adam_on_mean_loss_plus_gradient_variance(tiny):
    """The hand objective keeps the mean gradient in the graph (the trace of the
    gradients' covariance, times D); DomainBed's detached mean gives the same step."""
    algo, ref = build(IGA, num_domains=3, penalty=50.0), build(IGA, num_domains=3)
    mb = batches(3, n=5)

    def objective(net):
        params = list(net.parameters())
        losses = [F.cross_entropy(net(x), y) for x, y in mb]
        grads = [autograd.grad(loss, params, create_graph=True) for loss in losses]
        mean = [sum(g[k] for g in grads) / 3 for k in range(len(params))]
        variance = sum((g[k] - mean[k]).pow(2).sum() for g in grads for k in range(len(params)))
        return sum(losses) / 3 + 50.0 * variance

    adam_step(ref.network, objective)
    out = algo.update(mb)
    assert out["penalty"] > 1e-4
    assert_same_params(algo.network, ref.network)


# -- IB_ERM, IB_IRM --------------------------------------------------------------------------


def test_ib_penalty_is_the_mean_unbiased_feature_variance():
    z = torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 1.0]])
    # column variances (n - 1): ((1-2)^2 + (3-2)^2 + 0) / 2 = 1 and ((2-3)^2 + (6-3)^2 + (1-3)^2) / 2 = 7
    assert ib_penalty(z).item() == pytest.approx((1.0 + 7.0) / 2)


@pytest.mark.parametrize("cls", [IB_ERM, IB_IRM], ids=lambda c: c.__name__)
def test_ib_weights_anneal_and_adam_is_recreated_at_each_anneal_step(cls, tiny):
    overrides = {"ib_penalty_anneal_iters": 3, "ib_lambda": 7.0}
    if cls is IB_IRM:
        overrides.update(irm_penalty_anneal_iters=1, irm_lambda=5.0)
    algo = build(cls, num_domains=3, **overrides)
    resets = []
    for step in range(5):
        before = algo.optimizer
        out = algo.update(batches(3, seed=step))
        resets.append(algo.optimizer is not before)
        ib_w = 0.0 if step < 3 else 7.0
        expected = out["nll"] + ib_w * out["IB_penalty"]
        if cls is IB_IRM:
            expected += (1.0 if step < 1 else 5.0) * out["IRM_penalty"]
        assert out["loss"] == pytest.approx(expected, rel=1e-5)
        assert out["IB_penalty"] > 0
    assert resets == ([False, False, False, True, False] if cls is IB_ERM else [False, True, False, True, False])
    assert int(algo.optimizer.state[next(algo.network.parameters())]["step"]) == 2  # since update 3
    assert int(algo.update_count) == 5


def test_ib_irm_update_is_adam_on_the_three_terms(tiny):
    hp = {"ib_penalty_anneal_iters": 0, "ib_lambda": 3.0, "irm_penalty_anneal_iters": 0, "irm_lambda": 2.0}
    algo, ref = build(IB_IRM, num_domains=3, **hp), build(IB_IRM, num_domains=3, **hp)
    mb = batches(3, n=6)

    def objective(net):
        total = 0.0
        for x, y in mb:
            z = net[0](x)
            logits = net[1](z)
            var = ((z - z.mean(0)) ** 2).sum(0) / (len(z) - 1)
            total = total + F.cross_entropy(logits, y) + 2.0 * irm_penalty_by_hand(logits, y) + 3.0 * var.mean()
        return total / 3

    expected = adam_step(ref.network, objective)
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_params(algo.network, ref.network)


def test_ib_hparams_are_domainbeds():
    specs = {s.name: s for s in IB_IRM.hparam_specs(False)}
    assert list(specs) == ["irm_lambda", "irm_penalty_anneal_iters", "ib_lambda", "ib_penalty_anneal_iters"]
    assert (specs["ib_lambda"].default, specs["ib_penalty_anneal_iters"].default) == (1e2, 500)
    draws = [specs["ib_penalty_anneal_iters"].draw(np.random.RandomState(s)) for s in range(30)]
    assert all(type(d) is int and 1 <= d <= 10**4 for d in draws)
    assert [s.name for s in IB_ERM.hparam_specs(True)] == ["ib_lambda", "ib_penalty_anneal_iters"]


# -- EQRM -----------------------------------------------------------------------------------


def _kde_cdf(t, risks):
    """mean_d Phi((t - r_d) / h), h = 1.06 * std * n**(-1/5) (unbiased std), by hand."""
    h = 1.06 * statistics.stdev(risks) * len(risks) ** -0.2
    return sum(0.5 * (1 + math.erf((t - r) / (h * math.sqrt(2)))) for r in risks) / len(risks)


@pytest.mark.parametrize("risks,q", [([0.6, 0.7, 0.8], 0.75), ([0.2, 1.5], 0.5), ([0.3, 0.1, 0.9, 2.0], 0.9)])
def test_kde_quantile_solves_kde_cdf_equals_q(risks, q):
    r = torch.tensor(risks, dtype=torch.float64, requires_grad=True)
    got = kde_quantile(r, torch.tensor(q, dtype=torch.float64))
    assert _kde_cdf(got.item(), risks) == pytest.approx(q, abs=1e-7)
    # translation equivariance: the gradient is an affine combination, summing to one
    (grad,) = autograd.grad(got, r)
    assert grad.sum().item() == pytest.approx(1.0, abs=1e-9)
    if len(risks) == 2 and q == 0.5:  # symmetric: the midpoint
        assert got.item() == pytest.approx(0.85, abs=1e-8)


def test_kde_quantile_refuses_one_risk_and_handles_equal_risks():
    with pytest.raises(ValueError, match="at least 2 risks"):
        kde_quantile(torch.tensor([0.5]), torch.tensor(0.5))
    assert kde_quantile(torch.tensor([0.5, 0.5]), torch.tensor(0.9, dtype=torch.float64)).item() == 0.5


def test_eqrm_burns_in_with_erm_then_minimises_the_quantile_with_eqrm_lr(tiny):
    algo = build(EQRM, num_domains=3, eqrm_burnin_iters=2, eqrm_lr=1e-2, eqrm_quantile=0.8)
    first = algo.optimizer
    for step in range(2):  # burn-in: mean risk, the initial Adam(lr)
        mb = batches(3, seed=step)
        with torch.no_grad():
            mean = sum(F.cross_entropy(algo.network(x), y) for x, y in mb).item() / 3
        assert algo.update(mb)["loss"] == pytest.approx(mean, rel=1e-5)
        assert algo.optimizer is first
    mb = batches(3, seed=2)
    with torch.no_grad():
        risks = [F.cross_entropy(algo.network(x), y).item() for x, y in mb]
    out = algo.update(mb)  # update 2: the quantile, with a fresh Adam(eqrm_lr)
    assert algo.optimizer is not first and algo.optimizer.param_groups[0]["lr"] == 1e-2
    assert _kde_cdf(out["loss"], risks) == pytest.approx(0.8, abs=1e-5)
    assert int(algo.update_count) == 3 and algo.alpha.dtype == torch.float64


def test_eqrm_quantile_step_is_adam_on_the_kde_quantile(tiny):
    algo = build(EQRM, num_domains=3, eqrm_burnin_iters=0, eqrm_lr=1e-3)
    ref = build(EQRM, num_domains=3)
    mb = batches(3, n=6)
    q = torch.tensor(0.75, dtype=torch.float64)
    expected = adam_step(
        ref.network, lambda net: kde_quantile(torch.stack([F.cross_entropy(net(x), y) for x, y in mb]), q)
    )
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-6)
    assert_same_params(algo.network, ref.network)


def test_eqrm_refuses_a_single_training_domain(tiny):
    with pytest.raises(DomainGradError, match="at least 2 training domains"):
        build(EQRM, num_domains=1)


def test_eqrm_hparams_are_domainbeds_with_an_integer_burn_in():
    specs = {s.name: s for s in EQRM.hparam_specs(True)}
    assert (specs["eqrm_quantile"].default, specs["eqrm_burnin_iters"].default, specs["eqrm_lr"].default) == (
        0.75,
        2500,
        1e-6,
    )
    burn = [specs["eqrm_burnin_iters"].draw(np.random.RandomState(s)) for s in range(30)]
    assert all(type(b) is int and 316 <= b <= 3162 for b in burn)
    lrs = [specs["eqrm_lr"].draw(np.random.RandomState(s)) for s in range(30)]
    assert all(1e-7 <= v <= 1e-5 for v in lrs)


# -- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,overrides",
    [(IB_IRM, {"ib_penalty_anneal_iters": 2, "irm_penalty_anneal_iters": 4}), (EQRM, {"eqrm_burnin_iters": 4})],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_training_state_round_trip_continues_identically(cls, overrides, tiny):
    a = build(cls, num_domains=3, **overrides)
    for step in range(3):
        a.update(batches(3, seed=step))
    b = build(cls, num_domains=3, seed=5, **overrides)
    b.load_training_state(a.training_state())
    assert int(b.update_count) == 3
    for step in range(3, 6):  # crosses the anneal / burn-in step
        assert a.update(batches(3, seed=step)) == b.update(batches(3, seed=step))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        "domaingrad.algorithms.invariance:IGA",
        "domaingrad.algorithms.bottleneck:IB_ERM",
        "domaingrad.algorithms.bottleneck:IB_IRM",
        "domaingrad.algorithms.invariance:EQRM",
    ],
)
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, spec):
    train_through_cli(tmp_path, run_cli, tiny_mnist_dir, spec)
