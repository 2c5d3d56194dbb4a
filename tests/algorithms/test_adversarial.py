"""URM (Krishnamachari et al., TMLR 2024) and ADRMX (Demirel, Aptoula, Ozkan, 2023),
DomainBed's versions: each step against the objective written out by hand, the contrastive
loss against a per-anchor loop, the discriminator/generator alternation, and CLI runs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domaingrad import models
from domaingrad.algorithms.adversarial import ADRMX, URM, supcon_lambda_loss, urm_discriminator
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import TinyFeaturizer, batches, build

LR = 1e-3


@pytest.fixture
def tiny(monkeypatch):
    """TinyFeaturizer (tanh of one linear layer) in place of the real featurizer."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams, *a, **k: TinyFeaturizer(input_shape))


def _first_adam_step(params, grads, lr):
    """Adam's first step from zero moments, any betas: p - lr * g / (|g| + eps)."""
    return [p.detach() - lr * g / (g.abs() + 1e-8) for p, g in zip(params, grads)]


def _bce(logits, target):
    """Mean binary cross-entropy with logits, written out: t softplus(-l) + (1 - t) softplus(l)."""
    return (target * F.softplus(-logits) + (1 - target) * F.softplus(logits)).mean()


def _clone(generator):
    g = torch.Generator()
    g.set_state(generator.get_state())
    return g


# -- URM ------------------------------------------------------------------------------------


def test_urm_discriminator_has_domainbeds_module_names():
    d = urm_discriminator(7, 2)
    assert [n for n, _ in d.named_children()] == ["dense1", "act1", "dense2", "act22", "dense3", "act23", "output"]
    assert d(torch.zeros(3, 7)).shape == (3, 1)


@pytest.mark.parametrize("output,low,high", [("tanh", -1.0, 1.0), ("relu", 0.0, 1.0)])
def test_urm_update_is_the_generator_step_then_the_discriminator_step(tiny, output, low, high):
    algo = build(URM, urm_generator_output=output, urm_adv_lambda=0.3, urm_discriminator_lr=2e-3)
    act = torch.tanh if output == "tanh" else torch.relu
    featurizer, classifier = copy.deepcopy(algo.featurizer), copy.deepcopy(algo.classifier)
    disc = copy.deepcopy(algo.discriminator)
    g = _clone(algo.generator)
    mb = batches(2, n=5)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])

    feats = act(featurizer(x))
    loss = F.cross_entropy(classifier(feats), y) + 0.3 * _bce(disc(feats).squeeze(1), torch.ones(10))
    gen_params = list(featurizer.parameters()) + list(classifier.parameters())
    expected_gen = _first_adam_step(gen_params, torch.autograd.grad(loss, gen_params), LR)
    noise = (high - low) * torch.rand(tuple(feats.shape), generator=g) + low
    d_loss = _bce(disc(noise).squeeze(1), torch.ones(10)) + 0.3 * _bce(disc(feats.detach()).squeeze(1), torch.zeros(10))
    disc_params = list(disc.parameters())
    expected_disc = _first_adam_step(disc_params, torch.autograd.grad(d_loss, disc_params), 2e-3)

    out = algo.update(mb)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    got = list(algo.featurizer.parameters()) + list(algo.classifier.parameters())
    for p, q in zip(got + list(algo.discriminator.parameters()), expected_gen + expected_disc):
        assert torch.allclose(p, q, atol=1e-7, rtol=0)
    assert torch.equal(algo.generator.get_state(), g.get_state())
    z = torch.randn(4, *x.shape[1:])
    assert torch.allclose(algo.predict(z), algo.classifier(act(algo.featurizer(z))))
    if output == "relu":
        assert noise.min() >= 0  # the interval [0, 1) of a ReLU's output


def test_urm_label_smoothing_draws_soft_targets_after_the_noise(tiny):
    algo = build(URM, urm_discriminator_label_smoothing=0.2)
    feats = torch.rand(6, TinyFeaturizer.n_outputs) * 2 - 1
    g = _clone(algo.generator)
    noise = 2 * torch.rand((6, 5), generator=g) - 1
    true_y = 0.2 * torch.rand((6,), generator=g) + 0.8
    fake_y = 0.2 * torch.rand((6,), generator=g)
    d = algo.discriminator
    expected = _bce(d(noise).squeeze(1), true_y) + 0.1 * _bce(d(feats).squeeze(1), fake_y)
    assert algo.discriminator_loss(feats).item() == pytest.approx(expected.item(), rel=1e-6)
    assert true_y.min() >= 0.8 and fake_y.max() <= 0.2


def test_urm_sgd_discriminator_optimizer(tiny):
    algo = build(URM, urm_discriminator_optimizer="sgd", urm_discriminator_lr=0.01)
    assert isinstance(algo.discriminator_opt, torch.optim.SGD)
    assert algo.discriminator_opt.param_groups[0]["momentum"] == 0.9


def test_urm_defaults_and_searches():
    small = {s.name: s for s in URM.hparam_specs(True)}
    large = {s.name: s for s in URM.hparam_specs(False)}
    assert {k: s.default for k, s in small.items()} == {
        "urm": "adversarial",
        "urm_adv_lambda": 0.1,
        "urm_discriminator_label_smoothing": 0.0,
        "urm_discriminator_optimizer": "adam",
        "urm_discriminator_hidden_layers": 1,
        "urm_generator_output": "tanh",
        "urm_discriminator_lr": 1e-3,
    }
    assert large["urm_discriminator_lr"].default == 5e-5
    rs = [np.random.RandomState(i) for i in range(60)]
    assert {small["urm_generator_output"].draw(r) for r in rs} == {"tanh", "relu"}
    assert {small["urm_discriminator_hidden_layers"].draw(r) for r in rs} == {1, 2, 3}
    lrs = [small["urm_discriminator_lr"].draw(r) for r in rs]
    assert all(10**-5.5 <= v <= 10**-3.5 for v in lrs)
    assert all(10**-6 <= large["urm_discriminator_lr"].draw(r) <= 10**-4.5 for r in rs)
    assert all(0 <= small["urm_adv_lambda"].draw(r) <= 0.2 for r in rs)


# -- ADRMX ----------------------------------------------------------------------------------


def _supcon_by_loop(features, labels, domains, lamda=0.5, t=0.07):
    """DomainBed's per-anchor loop, written out with Python lists."""
    z = F.normalize(features, dim=1)
    b = len(labels)
    total, skipped = 0.0, 0
    for i in range(b):
        e = {
            j: (lamda if domains[j] == domains[i] else 1 - lamda) * math.exp(float(z[j] @ z[i]) / t)
            for j in range(b)
            if j != i
        }
        denom = sum(e.values()) + 1e-5
        pos = [j for j in e if labels[j] == labels[i]]
        if not pos:
            skipped += 1
            continue
        total += sum(math.log(e[j] / denom + 1e-5) for j in pos) / len(pos)
    return -total / (b - skipped + 1)


def test_supcon_lambda_loss_matches_the_per_anchor_loop():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 1])  # class 2 has one example: an anchor without positives
    domains = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    for lamda in (0.5, 0.8):
        got = supcon_lambda_loss(features, labels, domains, lamda=lamda)
        want = _supcon_by_loop(features, labels.tolist(), domains.tolist(), lamda=lamda)
        assert got.item() == pytest.approx(want, rel=1e-10)
    # differentiable without NaN gradients from the skipped anchor
    f = features.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(supcon_lambda_loss(f, labels, domains), f)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_adrmx_remix_pairs_by_rule(tiny):
    y = torch.tensor([2, 0, 2, 1, 2, 0, 0, 2])
    algo = build(ADRMX, num_classes=3)
    g = _clone(algo.generator)
    first, second = algo.remix_pairs(y)
    expected_first, expected_second = [], []
    for k in range(3):
        idx = torch.where(y == k)[0]
        perm = torch.randperm(len(idx), generator=g)
        if len(perm) >= 2:
            expected_first.append(int(idx[perm[0]]))
            expected_second.append(int(idx[perm[1]]))
    assert first.tolist() == expected_first and second.tolist() == expected_second
    assert all(y[a] == y[b] for a, b in zip(first, second)) and len(first) == 2  # class 1 has one example
    algo = build(ADRMX, num_classes=3, adrmx_remix_pairs="domainbed")
    g = _clone(algo.generator)
    first, _ = algo.remix_pairs(y)
    perms = [torch.randperm(int((y == k).sum()), generator=g) for k in range(3)]
    assert first.tolist() == [int(p[0]) for p in perms if len(p) >= 2]  # batch positions, as DomainBed indexes


def test_adrmx_alternates_discriminator_and_generator_steps(tiny):
    algo = build(ADRMX, num_domains=2)
    kinds = []
    for step in range(5):
        disc_before = [p.detach().clone() for p in algo.discriminator.parameters()]
        rest_before = [p.detach().clone() for p in algo.opt.param_groups[0]["params"]]
        out = algo.update(batches(2, seed=step, n=6))
        disc_moved = any(not torch.equal(a, b) for a, b in zip(disc_before, algo.discriminator.parameters()))
        rest_moved = any(not torch.equal(a, b) for a, b in zip(rest_before, algo.opt.param_groups[0]["params"]))
        kinds.append("disc" if set(out) == {"loss_disc"} else "gen")
        assert (disc_moved, rest_moved) == ((True, False) if kinds[-1] == "disc" else (False, True))
    # update_count % 3 < 2 is a discriminator step: counts 1, 3, 4 (d_steps_per_g_step 2)
    assert kinds == ["disc", "gen", "disc", "disc", "gen"]


def test_adrmx_generator_step_is_adam_on_the_hand_written_objective(tiny):
    algo = build(ADRMX, num_domains=2, num_classes=3, lr=1e-3)
    algo.update(batches(2, seed=0, n=6))  # update 1: a discriminator step
    ref = copy.deepcopy(algo)
    g = _clone(algo.generator)
    mb = batches(2, seed=1, n=6)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    d = torch.tensor([0] * 6 + [1] * 6)
    fl, fd = ref.featurizer_label(x), ref.featurizer_domain(x)
    fi = fl - fd
    remix, n_pairs = 0.0, 0
    for k in range(3):
        idx = torch.where(y == k)[0]
        perm = torch.randperm(len(idx), generator=g)
        if len(perm) < 2:
            continue
        i1, i2 = idx[perm[0]], idx[perm[1]]
        remix = remix + F.cross_entropy(ref.classifier_label_1((fi[i1] + fd[i2]).view(1, -1)), y[i1].view(1))
        n_pairs += 1
    assert n_pairs >= 2
    objective = (
        F.cross_entropy(ref.classifier_label_1(fl), y)
        + F.cross_entropy(ref.classifier_label_2(fi), y)
        + 1.0 * F.cross_entropy(ref.classifier_domain(fd), d)
        + 1.0 * remix / 3
        + 1.0 * (_supcon_torch(fl, y, d) + _supcon_torch(fi, y, d))
        - 0.75 * F.cross_entropy(ref.discriminator(fi), d)
    )
    params = list(ref.opt.param_groups[0]["params"])
    expected = _first_adam_step(params, torch.autograd.grad(objective, params), 1e-3)
    out = algo.update(mb)
    assert out["loss_total"] == pytest.approx(objective.item(), rel=1e-6)
    for p, q in zip(algo.opt.param_groups[0]["params"], expected):
        assert torch.allclose(p, q, atol=1e-7, rtol=0)
    assert torch.allclose(algo.predict(x), algo.classifier_label_1(algo.featurizer_label(x)))


def _supcon_torch(features, labels, domains):
    """The per-anchor loop in differentiable torch (for the objective's gradient)."""
    z = F.normalize(features, dim=1)
    b = len(labels)
    total, skipped = 0, 0
    for i in range(b):
        w = torch.where(domains == domains[i], 0.5, 0.5)
        e = w * torch.exp(z @ z[i] / 0.07)
        others = torch.arange(b) != i
        denom = e[others].sum() + 1e-5
        pos = others & (labels == labels[i])
        if not pos.any():
            skipped += 1
            continue
        total = total + torch.log(e[pos] / denom + 1e-5).sum() / pos.sum()
    return -total / (b - skipped + 1)


def test_adrmx_defaults_and_lr_override():
    specs = {s.name: s for s in ADRMX.hparam_specs(True)}
    assert {k: s.default for k, s in specs.items()} == {
        "cnt_lambda": 1.0,
        "dclf_lambda": 1.0,
        "disc_lambda": 0.75,
        "rmxd_lambda": 1.0,
        "d_steps_per_g_step": 2,
        "beta1": 0.5,
        "mlp_width": 256,
        "mlp_depth": 9,
        "mlp_dropout": 0.0,
        "adrmx_remix_pairs": "class",
    }
    rs = [np.random.RandomState(i) for i in range(40)]
    assert {specs["mlp_depth"].draw(r) for r in rs} == {8, 9, 10}
    (small,) = ADRMX.common_overrides(True)
    (large,) = ADRMX.common_overrides(False)
    assert (small.name, small.default, large.default) == ("lr", 3e-3, 3e-5)
    assert {small.draw(r) for r in rs} == {5e-4, 1e-3, 2e-3, 3e-3}
    assert {large.draw(r) for r in rs} == {2e-5, 3e-5, 4e-5, 5e-5}


def test_adrmx_classifiers_are_nonlinear_and_optimizers_hold_domainbeds_parameters(tiny):
    algo = build(ADRMX, num_domains=3)
    for head in (algo.classifier_label_1, algo.classifier_label_2, algo.classifier_domain):
        assert isinstance(head, torch.nn.Sequential) and len(head) == 5
    assert algo.classifier_domain[-1].out_features == 3
    disc = {id(p) for p in algo.discriminator.parameters()}
    assert {id(p) for p in algo.disc_opt.param_groups[0]["params"]} == disc
    rest = {id(p) for p in algo.parameters()} - disc
    assert {id(p) for p in algo.opt.param_groups[0]["params"]} == rest
    assert algo.opt.param_groups[0]["betas"] == (0.5, 0.9) and algo.opt.param_groups[0]["weight_decay"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["URM", "ADRMX"])
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, name):
    out = tmp_path / "run"
    record = train_by_spec(
        run_cli, tiny_mnist_dir, out, f"domaingrad.algorithms.adversarial:{name}", '{"batch_size": 8}'
    )
    logged = [k for k in record if k.startswith("loss") and isinstance(record[k], float)]
    assert logged and all(math.isfinite(record[k]) for k in logged)
