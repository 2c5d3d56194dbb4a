"""SelfReg, CAD and CondCAD: each loss checked against its formula written out by hand
(explicit loops over pairs), each update as one Adam step, and a short CLI run each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad import models
from domaingrad.algorithms.contrastive import CAD, CondCAD, SelfReg
from tests.algorithms.test_alignment import train_through_cli
from tests.algorithms.test_baselines import (
    TinyFeaturizer,
    adam_step,
    assert_same_params,
    batches,
    build,
    params_of,
)


@pytest.fixture
def tiny(monkeypatch):
    """The algorithms built here get test_baselines' TinyFeaturizer."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams: TinyFeaturizer(input_shape))


# -- SelfReg --------------------------------------------------------------------------------


def test_selfreg_partners_are_permutations_within_each_label_run(tiny):
    algo = build(SelfReg)
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    pi_1, pi_2 = algo.partner_indices(y)
    # drawn per run in order: (run 0: pi_1, pi_2), (run 1: pi_1, pi_2), (run 3: ...)
    runs = [(0, 2), (2, 5), (5, 6)]
    want_1, want_2 = [], []
    for start, end in runs:
        want_1 += (torch.randperm(end - start, generator=g) + start).tolist()
        want_2 += (torch.randperm(end - start, generator=g) + start).tolist()
    assert (pi_1.tolist(), pi_2.tolist()) == (want_1, want_2)
    for pi in (pi_1, pi_2):
        assert sorted(pi.tolist()) == list(range(6)) and torch.equal(y[pi], y)


def test_selfreg_update_is_adam_on_the_hand_written_loss(tiny):
    algo, ref = build(SelfReg, num_domains=3), build(SelfReg, num_domains=3)
    mb = batches(3, n=5)
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    lam = float(np.random.RandomState(int(torch.randint(2**31, (1,), generator=g))).beta(0.5, 0.5))
    x, y = torch.cat([x for x, _ in mb]), torch.cat([y for _, y in mb])
    y_sorted, order = torch.sort(y)
    x = x[order]
    pi_1, pi_2 = [], []
    for label in sorted(set(y_sorted.tolist())):
        idx = (y_sorted == label).nonzero()[:, 0]
        start, n = int(idx[0]), len(idx)
        pi_1 += (torch.randperm(n, generator=g) + start).tolist()
        pi_2 += (torch.randperm(n, generator=g) + start).tolist()

    def mse(a, b):
        return ((a - b) ** 2).sum() / a.numel()

    def objective(net):
        z = net[0](x)
        p = ref.cdpl(z)
        o = net[1](z)
        o2, p2 = o[pi_1], p[pi_1]
        o3, p3 = lam * o2 + (1 - lam) * o[pi_2], lam * p2 + (1 - lam) * p[pi_2]
        ce = F.cross_entropy(o, y_sorted)
        c = min(ce.item(), 1.0)
        reg = lam * (mse(o, o2) + 0.3 * mse(z, p2)) + (1 - lam) * (mse(o, o3) + 0.3 * mse(z, p3))
        return ce + c * reg

    cdpl_before = params_of(algo.cdpl)
    running_mean = algo.cdpl[1].running_mean.clone()
    expected = adam_step(ref.network, objective)
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-5)
    assert_same_params(algo.network, ref.network)
    # DomainBed's optimizer holds the network only: cdpl's weights stay, its BN statistics move
    for old, new in zip(cdpl_before, algo.cdpl.parameters()):
        assert torch.equal(old, new)
    assert not torch.equal(running_mean, algo.cdpl[1].running_mean)
    assert algo.cdpl[0].out_features == 2 * TinyFeaturizer.n_outputs


def test_selfreg_resume_continues_identically(tiny):
    a = build(SelfReg, num_domains=3)
    for step in range(2):
        a.update(batches(3, seed=step))
    b = build(SelfReg, num_domains=3, seed=7)
    b.load_training_state(a.training_state())
    for step in range(2, 4):
        assert a.update(batches(3, seed=step)) == b.update(batches(3, seed=step))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- CAD, CondCAD ---------------------------------------------------------------------------


def _lse(values):
    return math.log(sum(math.exp(v) for v in values)) if values else -math.inf


def bn_loss_by_hand(z, y, d, temperature, conditional, flipped):
    """The contrastive bottleneck with explicit loops over pairs (plain floats)."""
    n = len(z)
    s = [[(z[i] @ z[j]).item() / temperature if i != j else 0.0 for j in range(n)] for i in range(n)]
    s = [[v - max(row) for v in row] for row in s]
    c = temperature / 0.07
    losses = []
    for i in range(n):
        same_label = [j for j in range(n) if j != i and y[j] == y[i]]
        if not conditional:
            if not same_label:
                continue
            log_p = [s[i][j] - _lse([s[i][k] for k in range(n) if k != i]) for j in range(n)]
            if flipped:
                losses.append(-c * _lse([log_p[j] for j in range(n) if d[j] != d[i]]))
            else:
                losses.append(c * _lse([log_p[j] for j in range(n) if d[j] == d[i]]))
        else:
            targets = [j for j in same_label if (d[j] != d[i]) == flipped]
            if not targets:
                continue
            denominator = _lse([s[i][k] for k in same_label])
            value = _lse([s[i][j] - denominator for j in targets])
            losses.append(-c * value if flipped else c * value)
    finite = [v for v in losses if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else 0.0


@pytest.mark.parametrize("flipped", [True, False])
@pytest.mark.parametrize("cls", [CAD, CondCAD], ids=lambda c: c.__name__)
def test_bn_loss_matches_the_pairwise_formula(cls, flipped, tiny):
    algo = build(cls, is_flipped=flipped, temperature=0.5)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(7, 3, generator=g)
    y = torch.tensor([0, 1, 0, 1, 0, 2, 1])
    d = torch.tensor([0, 0, 1, 1, 1, 0, 0])  # label 2 appears once: its row is dropped
    got = algo.bn_loss(z, y, d).item()
    want = bn_loss_by_hand(z, y.tolist(), d.tolist(), 0.5, cls is CondCAD, flipped)
    assert got == pytest.approx(want, rel=1e-5) and abs(want) > 1e-3


def test_bn_loss_is_zero_when_no_row_has_a_target(tiny):
    """One domain only: CondCAD (flipped) has no same-label pair across domains."""
    algo = build(CondCAD)
    z = torch.randn(4, 3, requires_grad=True)
    loss = algo.bn_loss(z, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0


def test_bn_loss_normalises_when_asked(tiny):
    algo = build(CAD, is_normalized=True)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    y, d = torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 1, 0])
    scaled = algo.bn_loss(5 * z, y, d).item()
    want = bn_loss_by_hand(F.normalize(z, dim=1), y.tolist(), d.tolist(), 0.1, False, True)
    assert scaled == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("cls", [CAD, CondCAD], ids=lambda c: c.__name__)
def test_cad_update_is_adam_on_ce_plus_lmbda_bn_loss(cls, tiny):
    algo, ref = build(cls, num_domains=3, lmbda=0.5), build(cls, num_domains=3, lmbda=0.5)
    assert not hasattr(algo, "network")  # DomainBed's layout: featurizer and classifier only
    net, ref_net = nn.Sequential(algo.featurizer, algo.classifier), nn.Sequential(ref.featurizer, ref.classifier)
    mb = batches(3, n=5)
    y = torch.cat([y for _, y in mb])
    d = torch.repeat_interleave(torch.arange(3), 5)

    def objective(net):
        z = net[0](torch.cat([x for x, _ in mb]))
        return F.cross_entropy(net[1](z), y) + 0.5 * ref.bn_loss(z, y, d)

    expected = adam_step(ref_net, objective)
    out = algo.update(mb)
    assert out["total_loss"] == pytest.approx(expected, rel=1e-5)
    assert out["total_loss"] == pytest.approx(out["clf_loss"] + 0.5 * out["bn_loss"], rel=1e-6)
    assert_same_params(net, ref_net)
    assert algo.predict(mb[0][0]).shape == (5, 3)


def test_cad_projection_head_is_trained(tiny):
    algo = build(CAD, num_domains=2, is_project=True)
    assert algo.project[-1].out_features == 128
    before = params_of(algo.project)
    algo.update(batches(2, n=6))
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.project.parameters()))


def test_cad_hparams_are_domainbeds():
    specs = {s.name: s for s in CAD.hparam_specs(False)}
    assert {k: s.default for k, s in specs.items()} == {
        "lmbda": 0.1,
        "temperature": 0.1,
        "is_normalized": False,
        "is_project": False,
        "is_flipped": True,
    }
    lmbdas = {specs["lmbda"].draw(np.random.RandomState(s)) for s in range(100)}
    assert lmbdas == {1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2}
    assert {specs["temperature"].draw(np.random.RandomState(s)) for s in range(30)} == {0.05, 0.1}


# -- CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SelfReg", "CAD", "CondCAD"])
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, name):
    train_through_cli(tmp_path, run_cli, tiny_mnist_dir, f"domaingrad.algorithms.contrastive:{name}")
