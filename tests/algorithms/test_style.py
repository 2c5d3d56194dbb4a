"""SagNet (style-agnostic networks): the style and content randomisations and the
three-step update, each checked against the formula written out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad.algorithms.style import SagNet, randomize
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import LR, assert_same_params, batches, build, tiny  # noqa: F401

EPS = 1e-5


def draws(seed, n):
    """DomainBed's draws of one randomisation: alpha (n, 1) then a permutation."""
    torch.manual_seed(seed)
    return torch.rand(n, 1), torch.randperm(n)


def test_style_randomisation_interpolates_each_rows_statistics_towards_a_random_row():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    alpha, perm = draws(4, 5)
    torch.manual_seed(4)
    out = randomize(x, "style")
    mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True)
    mu2 = alpha * mu + (1 - alpha) * mu[perm]
    var2 = alpha * var + (1 - alpha) * var[perm]
    assert torch.allclose(out, (x - mu) / (var + EPS).sqrt() * (var2 + EPS).sqrt() + mu2, atol=1e-10)
    # each row now has the mixed mean, and (up to eps) the mixed variance
    assert torch.allclose(out.mean(1, keepdim=True), mu2, atol=1e-10)
    assert torch.allclose(out.var(1, keepdim=True), var2 * (var2 + EPS) / var2 / (1 + EPS / var), rtol=1e-8)
    assert not torch.equal(perm, torch.arange(5))


def test_content_randomisation_puts_a_random_rows_content_in_each_rows_style_and_detaches_it():
    x = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x.requires_grad_(True)
    _, perm = draws(7, 6)
    torch.manual_seed(7)
    out = randomize(x, "content")
    flat = x.detach().reshape(6, 2, 9)
    mu, var = flat.mean(-1, keepdim=True), flat.var(-1, keepdim=True)
    content = ((flat - mu) / (var + EPS).sqrt())[perm]
    assert torch.allclose(out.detach(), (content * (var + EPS).sqrt() + mu).reshape(6, 2, 3, 3), atol=1e-10)
    # d sum(out) / d x only goes through each row's own mean and std: sum_j d out_ij / d mu_i = H*W, and the
    # variance part sum_j n_pj d sqrt(v_i+eps)/d x is the content's sum (0) times it, so the gradient is 1
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, torch.ones_like(grad), atol=1e-10)


def test_randomize_refuses_bad_input():
    with pytest.raises(ValueError, match="what must be"):
        randomize(torch.zeros(2, 3), "colour")
    with pytest.raises(ValueError, match="expected"):
        randomize(torch.zeros(2, 3, 4))


def by_hand_update(ref, mb, seed, w):
    """The three SagNet steps written out, with DomainBed's draws (seeded as the update is)."""
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    opt = {k: torch.optim.Adam(getattr(ref, k).parameters(), lr=LR) for k in ("network_f", "network_c", "network_s")}
    torch.manual_seed(seed)

    def style_mix(f):
        alpha, perm = torch.rand(len(f), 1), torch.randperm(len(f))
        mu, var = f.mean(1, keepdim=True), f.var(1, keepdim=True)
        n = (f - mu) / (var + EPS).sqrt()
        return n * (alpha * var + (1 - alpha) * var[perm] + EPS).sqrt() + alpha * mu + (1 - alpha) * mu[perm]

    def content_swap(f):
        torch.rand(len(f), 1)
        perm = torch.randperm(len(f))
        mu, var = f.mean(1, keepdim=True), f.var(1, keepdim=True)
        return ((f - mu) / (var + EPS).sqrt())[perm].detach() * (var + EPS).sqrt() + mu

    def step(loss, names):
        for o in opt.values():
            o.zero_grad()
        loss.backward()
        for name in names:
            opt[name].step()
        return loss.item()

    loss_c = step(F.cross_entropy(ref.network_c(style_mix(ref.network_f(x))), y), ["network_f", "network_c"])
    loss_s = step(F.cross_entropy(ref.network_s(content_swap(ref.network_f(x))), y), ["network_s"])
    logp = F.log_softmax(ref.network_s(content_swap(ref.network_f(x))), dim=1)
    loss_adv = step(-w * logp.mean(), ["network_f"])  # mean over classes then samples = mean of all
    return loss_c, loss_s, loss_adv


@pytest.mark.usefixtures("tiny")
def test_update_is_the_three_adam_steps_of_algorithm_1():
    algo = build(SagNet, num_domains=3, sag_w_adv=0.7).double()
    ref = copy.deepcopy(algo)
    mb = [(x.double(), y) for x, y in batches(3, n=4)]
    c_before = [p.detach().clone() for p in algo.network_c.parameters()]
    torch.manual_seed(3)
    out = algo.update(mb)
    want = by_hand_update(ref, mb, 3, 0.7)
    assert [out["loss_c"], out["loss_s"], out["loss_adv"]] == pytest.approx(list(want), rel=1e-10)
    assert_same_params(algo, ref, atol=1e-12)
    assert all(not torch.equal(a, b) for a, b in zip(c_before, algo.network_c.parameters()))
    # the adversarial loss is w * CE to the uniform distribution: >= w * log(num_classes)
    assert out["loss_adv"] >= 0.7 * math.log(3) - 1e-12


@pytest.mark.usefixtures("tiny")
def test_predict_is_content_network_on_unrandomised_features():
    algo = build(SagNet)
    x = batches(1, n=3)[0][0]
    with torch.no_grad():
        assert torch.equal(algo.predict(x), algo.network_c(algo.network_f(x)))


def test_hparams_are_domainbeds():
    (spec,) = SagNet.hparam_specs(True)
    assert (spec.name, spec.default) == ("sag_w_adv", 0.1)
    values = [spec.draw(np.random.RandomState(s)) for s in range(50)]
    assert all(1e-2 <= v <= 10 for v in values) and len(set(values)) == 50


def test_update_on_mnist_cnn_changes_every_parameter():
    algo = build(SagNet, shape=(2, 28, 28), num_classes=2)
    before = [p.detach().clone() for p in algo.parameters()]
    out = algo.update(batches(shape=(2, 28, 28), num_classes=2))
    assert all(math.isfinite(v) for v in out.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))


def test_a_single_feature_is_refused(monkeypatch):
    from domaingrad import models
    from tests.algorithms.test_baselines import TinyFeaturizer

    class One(TinyFeaturizer):
        n_outputs = 1

    monkeypatch.setattr(models, "featurizer_for", lambda shape, hp: One(shape))
    with pytest.raises(DomainGradError, match="at least 2 features"):
        build(SagNet)


@pytest.mark.slow
def test_sagnet_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    record = train_by_spec(run_cli, tiny_mnist_dir, tmp_path / "run", "domaingrad.algorithms.style:SagNet")
    assert all(math.isfinite(record[k]) for k in ("loss_c", "loss_s", "loss_adv"))
