"""TRM (transfer risk minimisation) and Transfer (loss-gap adversarial classifier): the
inverse-Hessian estimate, the domain weights, the projection and the updates, each
checked against the formula written out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad.algorithms.transfer import (
    TRM,
    Transfer,
    hessian_vector_product,
    network_distance,
    neumann_inverse_hvp,
    project_to_ball,
)
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import LR, assert_same_params, batches, build, tiny  # noqa: F401


def double(minibatches):
    return [(x.double(), y) for x, y in minibatches]


# -- the inverse-Hessian estimate ----------------------------------------------------------


def spd(n, seed, low, high):
    """A symmetric matrix with eigenvalues spread in [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, n, dtype=torch.float64)) @ q.T


def test_neumann_series_and_domainbeds_aliased_sum():
    h = spd(4, 0, 0.2, 0.9)
    v = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64)
    m = torch.eye(4, dtype=torch.float64) - h
    terms = [torch.linalg.matrix_power(m, k) @ v for k in range(11)]
    series = neumann_inverse_hvp(lambda u: h @ u, v, "paper")
    assert torch.allclose(series, sum(terms), atol=1e-12)
    # sum_{k<=10} (I-H)^k v = H^{-1} (I - (I-H)^11) v: close to H^{-1} v for ||I - H|| = 0.8
    assert torch.allclose(series, torch.linalg.solve(h, v - terms[10] @ m.T), atol=1e-12)
    domainbed = neumann_inverse_hvp(lambda u: h @ u, v, "domainbed")
    assert torch.allclose(domainbed, 2 * terms[1] + sum(terms[2:]), atol=1e-12)
    assert not torch.allclose(domainbed, series, atol=1e-3)


def test_neumann_stops_once_an_entry_passes_ten():
    h = torch.diag(torch.tensor([0.1, 0.5], dtype=torch.float64))
    v = torch.tensor([3.0, 0.0], dtype=torch.float64)
    # partial sums of 3 * 0.9^k: 3, 5.7, 8.13, 10.317 -> stops after the third added term
    got = neumann_inverse_hvp(lambda u: h @ u, v, "paper")
    assert got[0].item() == pytest.approx(3 * (1 + 0.9 + 0.81 + 0.729), rel=1e-12)


def test_hessian_vector_product_is_the_explicit_hessian_times_v():
    g = torch.Generator().manual_seed(2)
    f, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, generator=g, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(lambda a: F.cross_entropy(f @ a.T, y), w.detach()).reshape(12, 12)
    assert torch.allclose(hessian_vector_product(lambda: F.cross_entropy(f @ w.T, y), w, v), hess @ v, atol=1e-12)


# -- TRM -------------------------------------------------------------------------------------


def test_trm_hparams_are_domainbeds():
    specs = {s.name: s for s in TRM.hparam_specs(True)}
    assert {k: s.default for k, s in specs.items()} == {
        "cos_lambda": 1e-4,
        "iters": 200,
        "groupdro_eta": 1e-2,
        "trm_variant": "paper",
    }
    iters = [specs["iters"].draw(np.random.RandomState(s)) for s in range(50)]
    assert all(type(i) is int and 1 <= i <= 10**4 for i in iters)


@pytest.mark.usefixtures("tiny")
def test_trm_is_erm_before_iters():
    algo = build(TRM, num_domains=3, iters=2).double()
    ref = copy.deepcopy(algo)
    heads = [p.detach().clone() for p in algo.clist.parameters()]
    mb = double(batches(3))
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in (ref.featurizer, ref.classifier)]
    loss = F.cross_entropy(ref.classifier(ref.featurizer(x)), y)
    loss.backward()
    for o in opts:
        o.step()
    out = algo.update(mb)
    assert out == {"nll": pytest.approx(loss.item(), rel=1e-12), "trm_loss": 0.0}
    assert_same_params(algo, ref, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(heads, algo.clist.parameters()))
    assert torch.equal(algo.alpha, 1 - torch.eye(3, dtype=torch.float64)) and int(algo.update_count) == 1


@pytest.mark.parametrize("variant", ["paper", "domainbed"])
@pytest.mark.usefixtures("tiny")
def test_trm_update_by_hand(variant):
    """Heads: 30 SGD(0.1) steps on sum_d CE(head_d(f_d)); per domain Q, with explicit
    Hessians: term_Q = sum_i a CE_Qi - cos_lambda * (S_Q g_P) . g_Q, S_Q the Neumann sum of
    H_Q; loss = CE + mean_Q term_Q; alpha[Q, i] = a * exp(eta * a * CE_Qi), a = 1/(D-1).
    DomainBed's variant: S_Q = 2 (I-H) + sum_{k>=2} (I-H)^k, and the gradient of a CE_Qi
    taken with the updated alpha[Q, i] (the value with a)."""
    d, cos, eta = 3, 0.5, 0.3
    algo = build(TRM, num_domains=d, iters=0, cos_lambda=cos, groupdro_eta=eta, trm_variant=variant).double()
    ref = copy.deepcopy(algo)
    mb = double(batches(d, n=5))
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    ys = [b for _, b in mb]
    feats = ref.featurizer(x)
    fs = list(feats.split(5))
    heads = [copy.deepcopy(ref.clist[q]) for q in range(d)]
    for _ in range(30):
        grads = [
            torch.autograd.grad(F.cross_entropy(h(f.detach()), t), list(h.parameters()))
            for h, f, t in zip(heads, fs, ys)
        ]
        with torch.no_grad():
            for h, gs in zip(heads, grads):
                for p, g in zip(h.parameters(), gs):
                    p -= 0.1 * g
    a = 1 / (d - 1)
    terms, alpha = [], torch.zeros(d, d, dtype=torch.float64)
    for q, h in enumerate(heads):
        w, b = h.weight, h.bias.detach()

        def ce(weight, f, t, b=b):
            return F.cross_entropy(f @ weight.T + b, t)

        (g_q,) = torch.autograd.grad(ce(w, fs[q], ys[q]), w, create_graph=True)
        others = [i for i in range(d) if i != q]
        ces = {i: ce(w, fs[i], ys[i]) for i in others}
        (g_p,) = torch.autograd.grad(sum(a * ces[i] for i in others), w, retain_graph=True)
        f_q, y_q = fs[q].detach(), ys[q]
        hess = torch.autograd.functional.hessian(lambda wt, f_q=f_q, y_q=y_q: ce(wt, f_q, y_q), w.detach())
        hess = hess.reshape(-1, w.numel())
        m = torch.eye(w.numel(), dtype=torch.float64) - hess
        powers = [torch.linalg.matrix_power(m, k) @ g_p.reshape(-1) for k in range(11)]
        u = sum(powers) if variant == "paper" else 2 * powers[1] + sum(powers[2:])
        assert u.abs().max() < 10  # so the series ran to its end
        for i in others:
            alpha[q, i] = a * math.exp(eta * a * ces[i].item())
        grad_weight = {i: a if variant == "paper" else alpha[q, i].item() for i in others}
        transfer = sum(a * ces[i].detach() + grad_weight[i] * (ces[i] - ces[i].detach()) for i in others)
        terms.append(transfer - cos * (u @ g_q.reshape(-1)))
    nll = F.cross_entropy(ref.classifier(feats), y)
    total = nll + sum(terms) / d
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in (ref.featurizer, ref.classifier)]
    total.backward()
    for o in opts:
        o.step()

    out = algo.update(mb)
    assert out["nll"] == pytest.approx(nll.item(), rel=1e-10)
    assert out["trm_loss"] == pytest.approx(total.item() - nll.item(), rel=1e-8)
    assert torch.allclose(algo.alpha, alpha, rtol=1e-10)
    for q in range(d):
        assert_same_params(algo.clist[q], heads[q], atol=1e-12)
    assert_same_params(algo.featurizer, ref.featurizer, atol=1e-10)
    assert_same_params(algo.classifier, ref.classifier, atol=1e-10)


@pytest.mark.usefixtures("tiny")
def test_trm_needs_two_domains():
    with pytest.raises(DomainGradError, match="at least 2 training domains"):
        build(TRM, num_domains=1)


@pytest.mark.usefixtures("tiny")
def test_trm_state_dict_holds_heads_and_alpha():
    algo = build(TRM, num_domains=2)
    keys = set(algo.state_dict())
    assert {"alpha", "update_count", "clist.2.weight"} <= keys and len(algo.clist) == 3


# -- Transfer ----------------------------------------------------------------------------------


def test_projection_onto_the_ball_around_the_classifier():
    torch.manual_seed(0)
    h, adv = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    dist = network_distance(adv, h).item()
    flat = torch.cat([p.detach().reshape(-1) for p in h.parameters()])
    flat_adv = torch.cat([p.detach().reshape(-1) for p in adv.parameters()])
    assert dist == pytest.approx((flat_adv - flat).norm().item(), rel=1e-12)
    inside = copy.deepcopy(adv)
    project_to_ball(dist + 0.1, inside, h)
    assert all(torch.equal(p, q) for p, q in zip(inside.parameters(), adv.parameters()))
    project_to_ball(dist / 4, adv, h)
    moved = torch.cat([p.detach().reshape(-1) for p in adv.parameters()])
    assert torch.allclose(moved, flat + (flat_adv - flat) / 4, atol=1e-12)
    assert network_distance(adv, h).item() == pytest.approx(dist / 4, rel=1e-12)


def test_transfer_hparams_are_domainbeds():
    for small in (True, False):
        specs = {s.name: s for s in Transfer.hparam_specs(small)}
        assert {k: s.default for k, s in specs.items()} == {
            "t_lambda": 1.0,
            "delta": 2.0,
            "d_steps_per_g": 10,
            "weight_decay_d": 0.0,
            "gda": False,
            "beta1": 0.5,
            "lr_d": 1e-3,
        }
        assert {specs["d_steps_per_g"].draw(np.random.RandomState(s)) for s in range(30)} == {1, 2, 5}
        assert specs["gda"].draw(np.random.RandomState(0)) is True


def gap_by_hand(featurizer, head, mb):
    losses = [F.cross_entropy(head(featurizer(x)), y) for x, y in mb]
    values = [v.item() for v in losses]
    return losses[values.index(max(values))] - losses[values.index(min(values))]


@pytest.mark.parametrize("delta", [2.0, 1e-3])  # the ball is not reached / is reached
@pytest.mark.usefixtures("tiny")
def test_transfer_update_by_hand(delta):
    """Adam on CE, Adam (same optimizer) on t * gap(h'), h' := h, then k times: SGD(lr_d)
    on -t * gap(h') and projection onto ||h' - h|| <= delta."""
    t, k, lr_d = 0.7, 3, 0.5
    algo = build(Transfer, num_domains=3, t_lambda=t, d_steps_per_g=k, lr_d=lr_d, delta=delta).double()
    ref = copy.deepcopy(algo)
    mb = double(batches(3))
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    adam = torch.optim.Adam(list(ref.featurizer.parameters()) + list(ref.classifier.parameters()), lr=LR)
    loss = F.cross_entropy(ref.classifier(ref.featurizer(x)), y)
    loss.backward()
    adam.step()
    adam.zero_grad(set_to_none=True)
    (t * gap_by_hand(ref.featurizer, ref.adv_classifier, mb)).backward()
    adam.step()
    adv = copy.deepcopy(ref.classifier)
    for _ in range(k):
        gap = gap_by_hand(ref.featurizer, adv, mb)
        grads = torch.autograd.grad(-t * gap, list(adv.parameters()))
        with torch.no_grad():
            for p, g in zip(adv.parameters(), grads):
                p -= lr_d * g
            diff = [p - q for p, q in zip(adv.parameters(), ref.classifier.parameters())]
            norm = math.sqrt(sum((d**2).sum().item() for d in diff))
            if norm > delta:
                for p, q, dd in zip(adv.parameters(), ref.classifier.parameters(), diff):
                    p.copy_(q + delta / norm * dd)
    out = algo.update(mb)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert out["gap"] == pytest.approx(t * gap.item(), rel=1e-10)
    assert_same_params(algo.featurizer, ref.featurizer, atol=1e-12)
    assert_same_params(algo.classifier, ref.classifier, atol=1e-12)
    assert_same_params(algo.adv_classifier, adv, atol=1e-12)
    reached = network_distance(algo.adv_classifier, algo.classifier).item()
    assert reached == pytest.approx(delta, rel=1e-9) if delta < 1 else reached < delta


@pytest.mark.usefixtures("tiny")
def test_transfer_with_gda_never_trains_the_model_as_in_domainbed():
    algo = build(Transfer, gda=True, d_steps_per_g=1)
    before = [p.detach().clone() for p in list(algo.featurizer.parameters()) + list(algo.classifier.parameters())]
    algo.update(batches(2))
    after = list(algo.featurizer.parameters()) + list(algo.classifier.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(algo.adv_classifier.parameters(), algo.classifier.parameters()))


@pytest.mark.parametrize("cls", [TRM, Transfer], ids=lambda c: c.__name__)
def test_update_on_mnist_cnn_changes_every_model_parameter(cls):
    kw = {"iters": 0} if cls is TRM else {}
    algo = build(cls, shape=(2, 28, 28), num_classes=2, **kw)
    model = list(algo.featurizer.parameters()) + list(algo.classifier.parameters())
    before = [p.detach().clone() for p in model]
    out = algo.update(batches(shape=(2, 28, 28), num_classes=2))
    assert all(type(v) is float and math.isfinite(v) for v in out.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, model))


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,hparams", [("TRM", '{"batch_size": 8, "iters": 1}'), ("Transfer", '{"batch_size": 8, "d_steps_per_g": 2}')]
)
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, spec, hparams):
    record = train_by_spec(run_cli, tiny_mnist_dir, tmp_path / "run", f"domaingrad.algorithms.transfer:{spec}", hparams)
    keys = ("nll", "trm_loss") if spec == "TRM" else ("loss", "gap")
    assert all(math.isfinite(record[k]) for k in keys)


@pytest.mark.usefixtures("tiny")
def test_trm_resumes_exactly_with_its_domain_weights():
    """alpha is a buffer (DomainBed's is not saved): a model restored from the training
    state after two TRM steps continues exactly like the original."""
    algo = build(TRM, num_domains=3, iters=0, groupdro_eta=0.5).double()
    for step in range(2):
        algo.update(double(batches(3, seed=step)))
    assert not torch.allclose(algo.alpha, (1 - torch.eye(3, dtype=torch.float64)) / 2)
    fresh = build(TRM, num_domains=3, iters=0, groupdro_eta=0.5, seed=7).double()
    fresh.load_training_state(copy.deepcopy(algo.training_state()))
    mb = double(batches(3, seed=5))
    algo.update(mb)
    fresh.update(mb)
    assert torch.equal(fresh.alpha, algo.alpha)
    assert_same_params(fresh, algo, atol=0)
