"""Fishr (DomainBed version): penalty, EMA, annealing, optimizer reset and resume."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad import models
from domaingrad.algorithms.fishr import Fishr
from domaingrad.errors import DomainGradError
from domaingrad.hparams import common_hparams

INPUT = (2, 4, 4)


class TinyFeaturizer(nn.Module):
    """A small smooth featurizer, so that float64 comparisons are tight and fast."""

    n_outputs = 12

    def __init__(self, input_shape):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), self.n_outputs)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


@pytest.fixture
def tiny(monkeypatch):
    """Fishr builds TinyFeaturizer, in float64."""
    monkeypatch.setattr(models, "featurizer_for", lambda shape, hp: TinyFeaturizer(shape))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def hparams(**overrides):
    hp = {s.name: s.default for s in common_hparams(True) + Fishr.hparam_specs(True)}
    hp.update(overrides)
    return hp


def make(num_domains=2, num_classes=3, seed=0, input_shape=INPUT, **overrides):
    torch.manual_seed(seed)
    return Fishr(input_shape, num_classes, num_domains, hparams(**overrides))


def batches(sizes=(4, 4), seed=0, num_classes=3, input_shape=INPUT):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *input_shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)) for n in sizes
    ]


# ---------------------------------------------------------------- brute force


def brute_variances(algo, minibatches):
    """Per domain, per sample (one forward and one autograd.grad each), the centred
    variance of the classifier gradients; differentiable (create_graph)."""
    params = [p for p in algo.classifier.parameters()]
    out = []
    for x, y in minibatches:
        gs = []
        for i in range(len(x)):
            loss = F.cross_entropy(algo.classifier(algo.featurizer(x[i : i + 1])), y[i : i + 1])
            g = torch.autograd.grad(loss, params, create_graph=True)
            gs.append(torch.cat([t.flatten() for t in g]))
        mean = sum(gs) / len(gs)
        out.append(sum((g - mean) ** 2 for g in gs) / len(gs))
    return out


def domainbed_penalty(vs):
    mean = sum(vs) / len(vs)
    return sum(((v - mean) ** 2).mean() for v in vs) / len(vs)


def irm_penalty(vs):
    mean = sum(vs) / len(vs)
    return sum(((v - mean) ** 2).sum() for v in vs)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("sizes", [(4, 4), (4, 3, 5)])
def test_penalty_equals_brute_force(tiny, nonlinear, sizes):
    algo = make(num_domains=len(sizes), nonlinear_classifier=nonlinear)
    assert isinstance(algo.classifier, nn.Linear) != nonlinear
    mb = batches(sizes)
    want = domainbed_penalty(brute_variances(algo, mb))  # first step: EMA state is zero
    out = algo.update(mb)
    assert set(out) == {"loss", "nll", "penalty"} and all(isinstance(v, float) for v in out.values())
    assert out["penalty"] > 0
    assert out["penalty"] == pytest.approx(want.item(), rel=1e-9)


def test_nonlinear_classifier_uses_all_its_parameters(tiny):
    algo = make(nonlinear_classifier=True)
    k = sum(p.numel() for p in algo.classifier.parameters())
    assert algo.ema_variances.shape == (2, k) and len(list(algo.classifier.parameters())) == 6


def test_ema_matches_its_formula_over_several_steps(tiny):
    ema = 0.9
    algo = make(ema=ema, penalty_anneal_iters=2, **{"lambda": 5.0})
    state = None
    for step in range(5):
        mb = batches(seed=step)
        var = torch.stack([v.detach() for v in brute_variances(algo, mb)])
        state = (1 - ema) * var if state is None else ema * state + (1 - ema) * var
        used = state / (1 - ema)
        want = domainbed_penalty(list(used))
        out = algo.update(mb)
        assert out["penalty"] == pytest.approx(want.item(), rel=1e-9), step
        torch.testing.assert_close(algo.ema_variances, state, rtol=1e-10, atol=1e-14)
    # the EMA really smooths: the last penalty is not the one-step penalty
    assert out["penalty"] != pytest.approx(domainbed_penalty(list(var)).item(), rel=1e-3)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_update_gradient_equals_brute_force_objective(tiny, nonlinear):
    lam = 7.0
    algo = make(penalty_anneal_iters=0, nonlinear_classifier=nonlinear, **{"lambda": lam})
    # plain SGD with lr 1: the parameter change is minus the gradient
    algo.optimizer = torch.optim.SGD(algo.network.parameters(), lr=1.0)
    mb = batches((4, 3), seed=3)
    params = list(algo.network.parameters())
    before = [p.detach().clone() for p in params]

    x, y = torch.cat([b[0] for b in mb]), torch.cat([b[1] for b in mb])
    nll = F.cross_entropy(algo.network(x), y)
    penalty = domainbed_penalty(brute_variances(algo, mb))
    pen_grad_feat = torch.autograd.grad(penalty, algo.featurizer.fc.weight, retain_graph=True)[0]
    assert pen_grad_feat.abs().max() > 0  # the penalty reaches the featurizer
    want = torch.autograd.grad(nll + lam * penalty, params)

    out = algo.update(mb)
    assert out["nll"] == pytest.approx(nll.item(), rel=1e-12)
    assert out["loss"] == pytest.approx(nll.item() + lam * penalty.item(), rel=1e-9)
    for b, p, g in zip(before, params, want):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-8, atol=1e-12)


def test_weight_is_zero_before_anneal_and_lambda_after(tiny):
    anneal = 3
    a = make(penalty_anneal_iters=anneal, **{"lambda": 1000.0})
    b = make(penalty_anneal_iters=anneal, **{"lambda": 0.0})
    erm_like = copy.deepcopy(b)  # same initial weights
    erm_opt = torch.optim.Adam(erm_like.network.parameters(), lr=1e-3)
    for step in range(anneal + 2):
        mb = batches(seed=step)
        x, y = torch.cat([t[0] for t in mb]), torch.cat([t[1] for t in mb])
        assert a.penalty_weight() == (0.0 if step < anneal else 1000.0)
        out_a, out_b = a.update(mb), b.update(mb)
        assert out_a["penalty"] > 0
        if step <= anneal:  # same weights until the first penalised step
            assert out_a["penalty"] == pytest.approx(out_b["penalty"], rel=1e-9)
        if step < anneal:
            assert out_a["loss"] == out_a["nll"]
            # the update is ERM's: Adam on the mean cross-entropy only
            loss = F.cross_entropy(erm_like.network(x), y)
            erm_opt.zero_grad()
            loss.backward()
            erm_opt.step()
            for p, q in zip(a.network.parameters(), erm_like.network.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        else:
            assert out_a["loss"] == pytest.approx(out_a["nll"] + 1000.0 * out_a["penalty"], rel=1e-12)
    # after the anneal step the penalty changed the trajectory
    assert any(not torch.allclose(p, q) for p, q in zip(a.network.parameters(), b.network.parameters()))


@pytest.mark.parametrize("anneal", [0, 3])
def test_optimizer_recreated_exactly_once_at_the_anneal_step(tiny, monkeypatch, anneal):
    algo = make(penalty_anneal_iters=anneal)
    calls = []
    original = Fishr.make_optimizer
    monkeypatch.setattr(Fishr, "make_optimizer", lambda self, params: calls.append(1) or original(self, params))
    changed_at = []
    for step in range(6):
        before = algo.optimizer
        algo.update(batches(seed=step))
        if algo.optimizer is not before:
            changed_at.append(step)
    if anneal == 0:
        assert changed_at == [] and calls == []
    else:
        assert changed_at == [anneal] and len(calls) == 1
    # the live optimizer covers the whole network and has taken the steps since it was made
    assert {id(p) for g in algo.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in algo.network.parameters()
    }
    first = next(algo.network.parameters())
    assert int(algo.optimizer.state[first]["step"]) == 6 - anneal


def test_irm_setup_penalty(tiny):
    sizes = (4, 3, 5)
    algo = make(num_domains=3, fishr_penalty="irm_setup", ema=0.95, penalty_anneal_iters=100)
    for step in range(2):
        mb = batches(sizes, seed=step)
        vs = brute_variances(algo, mb)
        out = algo.update(mb)
        # no EMA: the penalty is the one of this batch alone, and the state is untouched
        assert out["penalty"] == pytest.approx(irm_penalty(vs).item(), rel=1e-9)
        assert torch.equal(algo.ema_variances, torch.zeros_like(algo.ema_variances))
    # it is D * K times the DomainBed penalty without EMA
    db = make(num_domains=3, ema=0.0)
    irm = make(num_domains=3, fishr_penalty="irm_setup")
    mb = batches(sizes, seed=9)
    k = algo.ema_variances.shape[1]
    assert irm.update(mb)["penalty"] == pytest.approx(3 * k * db.update(mb)["penalty"], rel=1e-9)


def test_training_state_round_trip_continues_identically(tiny):
    kw = dict(penalty_anneal_iters=4, ema=0.9, **{"lambda": 50.0})
    a = make(**kw)
    for i in range(3):
        a.update(batches(seed=i))
    assert a.ema_variances.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(a.training_state(), buf)
    b = make(seed=99, **kw)
    buf.seek(0)
    b.load_training_state(torch.load(buf, weights_only=False))
    assert int(b.update_count) == 3
    torch.testing.assert_close(b.ema_variances, a.ema_variances, rtol=0, atol=0)
    # a copy without the EMA state goes elsewhere: the EMA matters for the next penalty
    c = copy.deepcopy(b)
    c.ema_variances.zero_()
    assert c.update(batches(seed=3))["penalty"] != pytest.approx(a_copy_penalty(a, 3), rel=1e-6)
    for i in range(3, 7):  # crosses the anneal step (re-created optimizer) at update 4
        assert a.update(batches(seed=i)) == b.update(batches(seed=i))
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


def a_copy_penalty(algo, seed):
    return copy.deepcopy(algo).update(batches(seed=seed))["penalty"]


def test_default_network_runs():
    # DomainBed's MNIST_CNN and linear classifier, float32, 2 domains of 4 samples
    algo = make(input_shape=(2, 28, 28), num_classes=2, penalty_anneal_iters=1)
    mb = batches((4, 4), num_classes=2, input_shape=(2, 28, 28))
    outs = [algo.update(mb) for _ in range(2)]
    assert all(np.isfinite(list(o.values())).all() for o in outs)
    assert algo.ema_variances.shape == (2, 128 * 2 + 2)
    assert algo.predict(mb[0][0]).shape == (4, 2)


def test_hparams():
    specs = {s.name: s for s in Fishr.hparam_specs(True)}
    assert {n: s.default for n, s in specs.items()} == {
        "lambda": 1000.0,
        "penalty_anneal_iters": 1500,
        "ema": 0.95,
        "fishr_penalty": "domainbed",
    }
    assert specs["fishr_penalty"].choices == ("domainbed", "irm_setup")
    for seed in range(20):
        r = np.random.RandomState
        assert 10.0 <= specs["lambda"].draw(r(seed)) <= 1e4
        anneal = specs["penalty_anneal_iters"].draw(r(seed))
        assert isinstance(anneal, int) and 0 <= anneal < 5000
        assert 0.90 <= specs["ema"].draw(r(seed)) <= 0.99
    # DomainBed's draws: each from its own RandomState
    assert specs["lambda"].draw(r(5)) == pytest.approx(10 ** r(5).uniform(1.0, 4.0))


def test_bad_hparams_and_inputs(tiny):
    with pytest.raises(DomainGradError, match="ema"):
        make(ema=1.0)
    with pytest.raises(DomainGradError, match="fishr_penalty"):
        make(fishr_penalty="sum")
    with pytest.raises(ValueError, match="one minibatch per training domain"):
        make().update(batches((4,)))
