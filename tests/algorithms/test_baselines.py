"""DomainBed's baselines (invariance, alignment, robust, mixing, meta): each update is
checked against the method's formula written out by hand in the test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad import models
from domaingrad.algorithms.alignment import CORAL, DANN, MMD, coral_distance, mmd_distance
from domaingrad.algorithms.invariance import IRM, SD, VREx
from domaingrad.algorithms.meta import MLDG, Fish, split_meta_train_test
from domaingrad.algorithms.mixing import Mixup
from domaingrad.algorithms.robust import GroupDRO
from domaingrad.hparams import common_hparams

ALL = [IRM, VREx, SD, CORAL, MMD, DANN, GroupDRO, Mixup, MLDG, Fish]
SHAPE = (2, 3, 3)  # input shape of the tiny featurizer
LR = 1e-3  # DomainBed's small-image default, used by the hand-written Adam steps


class TinyFeaturizer(nn.Module):
    """(B, *SHAPE) -> (B, 5): tanh(Linear(flatten(x)))."""

    n_outputs = 5

    def __init__(self, input_shape):
        super().__init__()
        self.lin = nn.Linear(math.prod(input_shape), self.n_outputs)

    def forward(self, x):
        return torch.tanh(self.lin(x.flatten(1)))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))


def hparams_of(cls, **overrides):
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    assert set(overrides) <= set(hp)
    hp.update(overrides)
    return hp


def build(cls, num_domains=2, seed=0, shape=SHAPE, num_classes=3, **overrides):
    torch.manual_seed(seed)
    return cls(shape, num_classes, num_domains, hparams_of(cls, **overrides))


def batches(num_domains=2, seed=0, n=4, shape=SHAPE, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))
        for _ in range(num_domains)
    ]


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_same_params(a, b, atol=1e-6):
    pa, pb = list(a.parameters()), list(b.parameters())
    assert len(pa) == len(pb)
    for p, q in zip(pa, pb):
        assert torch.allclose(p, q, atol=atol, rtol=0)


def adam_step(network, objective):
    """One step of a fresh Adam(lr) on ``objective(network)``; returns its value."""
    opt = torch.optim.Adam(network.parameters(), lr=LR)
    value = objective(network)
    opt.zero_grad()
    value.backward()
    opt.step()
    return value.item()


# -- every algorithm ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_update_returns_finite_floats_and_changes_every_parameter(cls):
    """On DomainBed's MNIST_CNN with (2, 28, 28) inputs, 4 examples per domain."""
    algo = build(cls, shape=(2, 28, 28), num_classes=2)
    before = params_of(algo)
    for step in range(2):  # two, so DANN takes a generator and a discriminator step
        out = algo.update(batches(shape=(2, 28, 28), num_classes=2, seed=step))
        assert out and all(type(v) is float and math.isfinite(v) for v in out.values()), out
    for old, new in zip(before, algo.parameters()):
        assert not torch.equal(old, new)
    assert algo.predict(torch.zeros(3, 2, 28, 28)).shape == (3, 2)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_hparam_specs_are_new_names_with_defaults_inside_their_search(cls):
    common = {s.name for s in common_hparams(True)}
    for small in (True, False):
        specs = cls.hparam_specs(small)
        names = [s.name for s in specs]
        assert len(set(names)) == len(names) and not set(names) & common
        for spec in specs:
            draws = [spec.draw(np.random.RandomState(seed)) for seed in range(20)]
            assert all(type(d) is type(spec.default) for d in draws), spec.name


@pytest.mark.parametrize(
    "name,cls,default,low,high",
    [
        ("irm_lambda", IRM, 1e2, 10**-1, 10**5),
        ("irm_penalty_anneal_iters", IRM, 500, 1, 10**4),
        ("vrex_lambda", VREx, 1e1, 10**-1, 10**5),
        ("vrex_penalty_anneal_iters", VREx, 500, 1, 10**4),
        ("sd_reg", SD, 0.1, 1e-5, 1e-1),
        ("mmd_gamma", CORAL, 1.0, 0.1, 10),
        ("mmd_gamma", MMD, 1.0, 0.1, 10),
        ("groupdro_eta", GroupDRO, 1e-2, 1e-3, 1e-1),
        ("mixup_alpha", Mixup, 0.2, 0.1, 10),
        ("mldg_beta", MLDG, 1.0, 0.1, 10),
        ("n_meta_test", MLDG, 2, 1, 2),
        ("meta_lr", Fish, 0.5, 0.05, 0.5),
        ("lambda", DANN, 1.0, 1e-2, 1e2),
        ("d_steps_per_g_step", DANN, 1, 1, 7),
        ("grad_penalty", DANN, 0.0, 1e-2, 10),
        ("beta1", DANN, 0.5, 0.0, 0.5),
        ("mlp_width", DANN, 256, 64, 1023),
        ("mlp_depth", DANN, 3, 3, 5),
        ("lr_d", DANN, 1e-3, 10**-4.5, 10**-2.5),
    ],
)
def test_domainbed_defaults_and_search_ranges(name, cls, default, low, high):
    spec = {s.name: s for s in cls.hparam_specs(True)}[name]
    assert spec.default == default
    draws = [spec.draw(np.random.RandomState(seed)) for seed in range(50)]
    assert all(low <= d <= high for d in draws) and len(set(draws)) > 1


# -- IRM ------------------------------------------------------------------------------------


def irm_penalty_by_hand(logits, y):
    """Autograd on an explicit scale variable s, then the closed form
    d/ds CE(s z, y) at s=1 = mean_i (sum_c softmax(z_i)_c z_ic - z_iy)."""
    s = torch.ones((), requires_grad=True)
    (g1,) = torch.autograd.grad(F.cross_entropy(logits[::2] * s, y[::2]), s, create_graph=True)
    (g2,) = torch.autograd.grad(F.cross_entropy(logits[1::2] * s, y[1::2]), s, create_graph=True)

    def closed(z, t):
        return ((z.softmax(1) * z).sum(1) - z.gather(1, t[:, None])[:, 0]).mean()

    closed_form = closed(logits[::2], y[::2]) * closed(logits[1::2], y[1::2])
    assert torch.allclose(g1 * g2, closed_form, atol=1e-6)
    return closed_form


def test_irm_penalty_is_the_product_of_the_two_half_batch_scale_gradients():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=g)
    penalty = IRM.irm_penalty(logits, y)
    expected = irm_penalty_by_hand(logits, y)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(penalty.item()) > 1e-4
    # differentiable (create_graph): its gradient wrt the logits is the closed form's
    (got,) = torch.autograd.grad(penalty, logits)
    (want,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(got, want, atol=1e-6) and got.abs().sum() > 0


@pytest.mark.parametrize("cls", [IRM, VREx], ids=lambda c: c.__name__)
def test_penalty_weight_anneals_and_adam_is_recreated_once(cls, tiny):
    anneal, lam = f"{cls.__name__.lower()}_penalty_anneal_iters", f"{cls.__name__.lower()}_lambda"
    algo = build(cls, num_domains=3, **{anneal: 2, lam: 7.0})
    optimizers = []
    for step in range(5):
        before = algo.optimizer
        out = algo.update(batches(3, seed=step))
        optimizers.append(algo.optimizer)
        assert (algo.optimizer is before) == (step != 2), step
        weight = 1.0 if step < 2 else 7.0
        assert out["loss"] == pytest.approx(out["nll"] + weight * out["penalty"], rel=1e-5)
    assert len({id(o) for o in optimizers}) == 2
    # the new Adam has seen exactly the updates from the anneal step on
    state = algo.optimizer.state[next(algo.network.parameters())]
    assert int(state["step"]) == 3
    assert int(algo.update_count) == 5


def test_irm_update_is_adam_on_nll_plus_penalty(tiny):
    algo, ref = build(IRM, num_domains=3), build(IRM, num_domains=3)
    mb = batches(3, n=6)

    def objective(net):
        per = [(F.cross_entropy(net(x), y), irm_penalty_by_hand(net(x), y)) for x, y in mb]
        return sum(n for n, _ in per) / 3 + 1.0 * sum(p for _, p in per) / 3

    expected = adam_step(ref.network, objective)
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_params(algo.network, ref.network)


# -- VREx, SD, CORAL, MMD, GroupDRO: formulas on small tensors and whole updates --------------


def test_vrex_objective_on_a_small_vector():
    losses = torch.tensor([0.5, 1.0, 2.1])
    mean = (0.5 + 1.0 + 2.1) / 3
    var = ((0.5 - mean) ** 2 + (1.0 - mean) ** 2 + (2.1 - mean) ** 2) / 3
    loss, m, penalty = VREx.vrex_objective(losses, 10.0)
    assert m.item() == pytest.approx(mean) and penalty.item() == pytest.approx(var)
    assert loss.item() == pytest.approx(mean + 10.0 * var)


def test_coral_distance_on_small_tensors():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    y = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    # by hand: means (2, 1) and (1, 1); covariances (n-1) [[1, -1], [-1, 1]] and [[2, 2], [2, 2]]
    mean_term = ((2 - 1) ** 2 + (1 - 1) ** 2) / 2
    cov_term = ((1 - 2) ** 2 + (-1 - 2) ** 2 + (-1 - 2) ** 2 + (1 - 2) ** 2) / 4
    assert coral_distance(x, y).item() == pytest.approx(mean_term + cov_term)
    assert np.allclose(np.cov(x.numpy(), rowvar=False), [[1, -1], [-1, 1]])


def test_mmd_distance_on_small_tensors():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.5]])
    gammas = [0.001, 0.01, 0.1, 1, 10, 100, 1000]

    def k(d2):
        return sum(math.exp(-g * d2) for g in gammas)

    kxx = (k(0) + k(1) + k(1) + k(0)) / 4
    kyy = k(0)
    kxy = (k(0.25) + k(0.25)) / 2
    assert mmd_distance(x, y).item() == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-5)


def test_group_dro_weights_on_a_small_vector():
    q = torch.tensor([0.2, 0.8])
    new = GroupDRO.reweight(q, torch.tensor([1.0, 3.0]), 0.5)
    a, b = 0.2 * math.exp(0.5), 0.8 * math.exp(1.5)
    assert new.tolist() == pytest.approx([a / (a + b), b / (a + b)])


def _pairs_mean(features, distance):
    values = [distance(features[i], features[j]) for i in range(len(features)) for j in range(i + 1, len(features))]
    return sum(values) / len(values)


def _coral_by_hand(a, b):
    return (a.mean(0) - b.mean(0)).pow(2).mean() + (torch.cov(a.T) - torch.cov(b.T)).pow(2).mean()


def _mmd_by_hand(a, b):
    def k(u, v):
        d2 = torch.cdist(u, v) ** 2
        return sum(torch.exp(-g * d2) for g in [0.001, 0.01, 0.1, 1, 10, 100, 1000]).mean()

    return k(a, a) + k(b, b) - 2 * k(a, b)


def _objective(cls, mb, hp):
    """The method's objective written out by hand, a function of ERM's network."""

    def alignment(distance):
        def f(net):
            feats = [net[0](x) for x, _ in mb]
            ce = sum(F.cross_entropy(net[1](z), y) for z, (_, y) in zip(feats, mb)) / len(mb)
            return ce + hp["mmd_gamma"] * _pairs_mean(feats, distance)

        return f

    if cls is VREx:

        def f(net):
            losses = torch.stack([F.cross_entropy(net(x), y) for x, y in mb])
            return losses.mean() + 1.0 * losses.var(unbiased=False)

        return f
    if cls is SD:

        def f(net):
            logits = net(torch.cat([x for x, _ in mb]))
            return F.cross_entropy(logits, torch.cat([y for _, y in mb])) + hp["sd_reg"] * (logits**2).mean()

        return f
    if cls is CORAL:
        return alignment(_coral_by_hand)
    if cls is MMD:
        return alignment(_mmd_by_hand)
    if cls is GroupDRO:

        def f(net):
            losses = torch.stack([F.cross_entropy(net(x), y) for x, y in mb])
            q = torch.exp(hp["groupdro_eta"] * losses.detach())
            return (q / q.sum() * losses).sum()

        return f
    raise AssertionError(cls)


@pytest.mark.parametrize("cls", [VREx, SD, CORAL, MMD, GroupDRO], ids=lambda c: c.__name__)
def test_update_is_one_adam_step_on_the_hand_written_objective(cls, tiny):
    algo, ref = build(cls, num_domains=3), build(cls, num_domains=3)
    mb = batches(3, n=5)
    expected = adam_step(ref.network, _objective(cls, mb, ref.hparams))
    out = algo.update(mb)
    if cls in (VREx, GroupDRO):  # these log the optimised loss itself
        assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_params(algo.network, ref.network)


def test_group_dro_q_accumulates_over_steps(tiny):
    algo = build(GroupDRO, num_domains=3, groupdro_eta=0.5)
    q = torch.ones(3)
    for step in range(3):
        mb = batches(3, seed=step)
        with torch.no_grad():
            losses = torch.tensor([F.cross_entropy(algo.network(x), y).item() for x, y in mb])
        q = q * torch.exp(0.5 * losses)
        q = q / q.sum()
        out = algo.update(mb)
        assert torch.allclose(algo.q, q, atol=1e-6)
        assert out["loss"] == pytest.approx(float((q * losses).sum()), rel=1e-5)
    assert not torch.allclose(algo.q, torch.full((3,), 1 / 3))


# -- DANN -----------------------------------------------------------------------------------


def test_dann_alternates_discriminator_and_generator_steps(tiny):
    algo = build(DANN, num_domains=3, d_steps_per_g_step=2, grad_penalty=0.5)
    kinds = []
    for step in range(6):
        disc, gen = params_of(algo.discriminator), params_of(nn.ModuleList([algo.featurizer, algo.classifier]))
        out = algo.update(batches(3, seed=step))
        (kind,) = out
        kinds.append(kind)
        disc_moved = any(not torch.equal(p, q) for p, q in zip(disc, algo.discriminator.parameters()))
        gen_moved = any(
            not torch.equal(p, q) for p, q in zip(gen, nn.ModuleList([algo.featurizer, algo.classifier]).parameters())
        )
        assert (disc_moved, gen_moved) == ((True, False) if kind == "disc_loss" else (False, True))
    # update_count t = 1..6: a discriminator step when t % 3 < 2
    assert kinds == ["disc_loss", "gen_loss", "disc_loss", "disc_loss", "gen_loss", "disc_loss"]


def test_dann_generator_loss_is_ce_minus_lambda_times_discriminator_loss(tiny):
    algo = build(DANN, num_domains=2, **{"lambda": 0.3})
    mb = batches(2)
    with torch.no_grad():
        z = algo.featurizer(torch.cat([x for x, _ in mb]))
        ce = F.cross_entropy(algo.classifier(z), torch.cat([y for _, y in mb]))
        d = F.cross_entropy(algo.discriminator(z), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    out = algo.update(mb)  # update_count 1: 1 % 2 < 1 is false, a generator step
    assert out["gen_loss"] == pytest.approx((ce - 0.3 * d).item(), rel=1e-5)


# -- Mixup ----------------------------------------------------------------------------------


def test_mixup_update_matches_a_hand_written_cyclic_mixup(tiny):
    algo, ref = build(Mixup, num_domains=3), build(Mixup, num_domains=3)
    mb = batches(3, n=5)
    mb[1] = (mb[1][0][:3], mb[1][1][:3])  # unequal sizes: pairs are cut to the shorter
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    perm = torch.randperm(3, generator=g).tolist()
    lams = []
    for _ in range(3):
        seed = int(torch.randint(2**31, (1,), generator=g))
        lams.append(float(np.random.RandomState(seed).beta(0.2, 0.2)))

    def objective(net):
        total = 0.0
        for k in range(3):
            (xi, yi), (xj, yj) = mb[perm[k]], mb[perm[(k + 1) % 3]]
            n, lam = min(len(xi), len(xj)), lams[k]
            out = net(lam * xi[:n] + (1 - lam) * xj[:n])
            total = total + lam * F.cross_entropy(out, yi[:n]) + (1 - lam) * F.cross_entropy(out, yj[:n])
        return total / 3

    expected = adam_step(ref.network, objective)
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_params(algo.network, ref.network)


# -- MLDG -----------------------------------------------------------------------------------


def test_domainbed_split_has_no_pair_when_all_domains_are_meta_test():
    g = torch.Generator().manual_seed(0)
    mb = batches(2)
    assert split_meta_train_test(mb, 2, g) == []  # DomainBed's default on 2 domains
    assert len(split_meta_train_test(mb, 1, g)) == 1
    assert len(split_meta_train_test(batches(3), 2, g)) == 1


def _first_adam_step(params, grads):
    """A fresh Adam's first step: lr * g / (|g| + eps) (bias corrections cancel)."""
    return [p - LR * g / (g.abs() + 1e-8) for p, g in zip(params, grads)]


@pytest.mark.parametrize("num_domains", [2, 3])
def test_mldg_update_matches_first_order_mldg_by_hand(num_domains, tiny):
    algo = build(MLDG, num_domains=num_domains)  # default n_meta_test 2
    ref = build(MLDG, num_domains=num_domains)
    mb = batches(num_domains, n=6)
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    perm = torch.randperm(num_domains, generator=g).tolist()
    # 2 domains: 1 meta-train, 1 meta-test (capped); 3 domains: 1 meta-train, 2 meta-test
    i, j = perm[0], perm[1]
    net = ref.network
    theta = [p.detach() for p in net.parameters()]
    g_i = torch.autograd.grad(F.cross_entropy(net(mb[i][0]), mb[i][1]), list(net.parameters()))
    clone = copy.deepcopy(net)
    with torch.no_grad():
        for p, new in zip(clone.parameters(), _first_adam_step(theta, g_i)):
            p.copy_(new)
    g_j = torch.autograd.grad(F.cross_entropy(clone(mb[j][0]), mb[j][1]), list(clone.parameters()))
    total = [(a + 1.0 * b) / num_domains for a, b in zip(g_i, g_j)]
    expected = _first_adam_step(theta, total)

    before = params_of(algo.network)
    out = algo.update(mb)
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    for old, p, want in zip(before, algo.network.parameters(), expected):
        assert not torch.equal(old, p)
        assert torch.allclose(p, want, atol=1e-6)


# -- Fish -----------------------------------------------------------------------------------


def test_fish_matches_domainbed_style_reference_over_two_updates(tiny):
    algo, ref = build(Fish, num_domains=3, meta_lr=0.1), build(Fish, num_domains=3)
    net = ref.network
    inner_state = None
    for step in range(2):
        mb = batches(3, seed=step)
        # DomainBed: a fresh clone and Adam, the Adam loading the previous inner state
        clone = copy.deepcopy(net)
        opt = torch.optim.Adam(clone.parameters(), lr=LR)
        if inner_state is not None:
            opt.load_state_dict(inner_state)
        for x, y in mb:
            loss = F.cross_entropy(clone(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        inner_state = copy.deepcopy(opt.state_dict())
        with torch.no_grad():
            for p, q in zip(net.parameters(), clone.parameters()):
                p.copy_(p + 0.1 * (q - p))
        before = params_of(algo.network)
        out = algo.update(mb)
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert all(not torch.equal(a, b) for a, b in zip(before, algo.network.parameters()))
        assert_same_params(algo.network, net)
    assert int(algo.optimizer_inner.state[next(algo.network_inner.parameters())]["step"]) == 6


# -- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,overrides",
    [
        (GroupDRO, {}),
        (IRM, {"irm_penalty_anneal_iters": 4}),
        (VREx, {"vrex_penalty_anneal_iters": 4}),
        (Mixup, {}),
        (MLDG, {}),
        (Fish, {}),
        (DANN, {}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_training_state_round_trip_continues_identically(cls, overrides, tiny):
    a = build(cls, num_domains=3, **overrides)
    for step in range(3):
        a.update(batches(3, seed=step))
    state = a.training_state()
    b = build(cls, num_domains=3, seed=123, **overrides)
    b.load_training_state(state)
    if cls is GroupDRO:
        assert torch.equal(b.q, a.q) and not torch.allclose(a.q, torch.full((3,), 1 / 3))
    if cls in (IRM, VREx):
        assert int(b.update_count) == 3
    for step in range(3, 6):  # crosses the anneal step of IRM and VREx
        assert a.update(batches(3, seed=step)) == b.update(batches(3, seed=step))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), name
