"""CDANN, CausIRL_CORAL and CausIRL_MMD: each update checked against the method's formula
written out by hand, and a short CLI run on Colored MNIST each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from domaingrad import models
from domaingrad.algorithms.alignment import (
    CDANN,
    CausIRL_CORAL,
    CausIRL_MMD,
    class_balance_weights,
    coral_distance,
)
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import (
    TinyFeaturizer,
    _coral_by_hand,
    _mmd_by_hand,
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


# -- CDANN ----------------------------------------------------------------------------------


def test_class_balance_weights_on_small_label_vectors():
    # counts (3, 1, 1), K = max + 1 = 3: w = 1 / (n_y * K)
    got = class_balance_weights(torch.tensor([0, 0, 2, 1, 0]))
    assert got.tolist() == pytest.approx([1 / 9, 1 / 9, 1 / 3, 1 / 3, 1 / 9])
    # only label 1 present: K = 2 (one_hot's width), n_1 = 2 -> 1/4 each, summing to 1/2
    assert class_balance_weights(torch.tensor([1, 1])).tolist() == pytest.approx([0.25, 0.25])


def _cdann_disc_loss_by_hand(algo, mb, grad_penalty):
    """sum_i w_i CE(D(z_i + e(y_i)), d_i) + gp * mean_i ||d sum_j CE_j / d input_i||**2."""
    x, y = torch.cat([x for x, _ in mb]), torch.cat([y for _, y in mb])
    d = torch.cat([torch.full((len(xb),), i) for i, (xb, _) in enumerate(mb)])
    inp = algo.featurizer(x) + algo.class_embeddings.weight[y]
    out = algo.discriminator(inp)
    counts = torch.bincount(y)
    w = 1.0 / (counts[y] * (int(y.max()) + 1)).float()
    ce = F.cross_entropy(out, d, reduction="none")
    (grad,) = autograd.grad(ce.sum(), inp, create_graph=True)
    return (w * ce).sum() + grad_penalty * grad.pow(2).sum(1).mean(), x, y, inp


def test_cdann_discriminator_step_is_class_balanced_and_trains_the_embeddings(tiny):
    algo = build(CDANN, num_domains=3, d_steps_per_g_step=2, grad_penalty=0.5)
    mb = batches(3, n=5)
    expected, *_ = _cdann_disc_loss_by_hand(algo, mb, 0.5)
    emb, gen = params_of(algo.class_embeddings), params_of(nn.ModuleList([algo.featurizer, algo.classifier]))
    out = algo.update(mb)  # update_count 1: 1 % 3 < 2, a discriminator step
    assert out["disc_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(emb[0], algo.class_embeddings.weight)  # in disc_opt
    for old, new in zip(gen, nn.ModuleList([algo.featurizer, algo.classifier]).parameters()):
        assert torch.equal(old, new)


def test_cdann_generator_loss_uses_the_conditional_discriminator(tiny):
    algo = build(CDANN, num_domains=2, **{"lambda": 0.3})
    mb = batches(2, n=6)
    disc_loss, x, y, _ = _cdann_disc_loss_by_hand(algo, mb, 0.0)
    with torch.no_grad():
        ce = F.cross_entropy(algo.classifier(algo.featurizer(x)), y)
    emb = params_of(algo.class_embeddings)
    out = algo.update(mb)  # update_count 1: 1 % 2 < 1 is false, a generator step
    assert out["gen_loss"] == pytest.approx((ce - 0.3 * disc_loss).item(), rel=1e-5)
    assert torch.equal(emb[0], algo.class_embeddings.weight)  # not in gen_opt


def test_cdann_keeps_dann_hyperparameters_and_domainbed_attribute_names():
    assert [s.name for s in CDANN.hparam_specs(True)] == [
        "lambda",
        "weight_decay_d",
        "d_steps_per_g_step",
        "grad_penalty",
        "beta1",
        "mlp_width",
        "mlp_depth",
        "mlp_dropout",
        "lr_g",
        "lr_d",
        "weight_decay_g",
    ]
    large = {s.name: s for s in CDANN.hparam_specs(False)}
    assert large["lr_g"].default == 5e-5 and large["lr_d"].default == 5e-5
    draws = [large["weight_decay_g"].draw(np.random.RandomState(s)) for s in range(20)]
    assert all(1e-6 <= d <= 1e-2 for d in draws)


# -- CausIRL --------------------------------------------------------------------------------


def test_causirl_split_penalty_on_small_features():
    f1 = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    f2 = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 5.0]])
    # cuts 1 and 2: heads [f1[0], f2[0], f2[1]], tails [f1[1], f1[2], f2[2]]
    heads = torch.stack([f1[0], f2[0], f2[1]])
    tails = torch.stack([f1[1], f1[2], f2[2]])
    got = CausIRL_CORAL.split_penalty([f1, f2], [1, 2])
    assert got.item() == pytest.approx(_coral_by_hand(heads, tails).item(), rel=1e-6)
    # a side with fewer than 2 rows: no penalty
    assert CausIRL_CORAL.split_penalty([f1, f2], [0, 1]).item() == 0.0
    assert coral_distance(heads, tails).item() > 0


@pytest.mark.parametrize(
    "cls,distance", [(CausIRL_CORAL, _coral_by_hand), (CausIRL_MMD, _mmd_by_hand)], ids=["CORAL", "MMD"]
)
def test_causirl_update_is_adam_on_ce_plus_split_distance(cls, distance, tiny):
    algo, ref = build(cls, num_domains=3, mmd_gamma=2.0), build(cls, num_domains=3)
    mb = batches(3, n=5)
    mb[1] = (mb[1][0][:4], mb[1][1][:4])
    g = torch.Generator()
    g.set_state(algo.generator.get_state())
    cuts = [int(torch.randint(len(x), (1,), generator=g)) for x, _ in mb]
    heads = [x[:c] for (x, _), c in zip(mb, cuts)]
    tails = [x[c:] for (x, _), c in zip(mb, cuts)]
    assert sum(len(h) for h in heads) > 1 and sum(len(t) for t in tails) > 1, cuts

    def objective(net):
        ce = sum(F.cross_entropy(net(x) + 1e-16, y) for x, y in mb) / 3
        feats = lambda parts: net[0](torch.cat(parts))  # noqa: E731
        return ce + 2.0 * distance(feats(heads), feats(tails))

    adam_step(ref.network, objective)
    out = algo.update(mb)
    assert out["penalty"] > 0
    assert_same_params(algo.network, ref.network)
    # the cuts came from algo.generator: it is now where the copy is
    assert torch.equal(algo.generator.get_state(), g.get_state())


def test_causirl_resume_continues_identically(tiny):
    a = build(CausIRL_MMD, num_domains=3)
    for step in range(2):
        a.update(batches(3, seed=step))
    b = build(CausIRL_MMD, num_domains=3, seed=9)
    b.load_training_state(a.training_state())
    for step in range(2, 4):
        assert a.update(batches(3, seed=step)) == b.update(batches(3, seed=step))


# -- CLI ------------------------------------------------------------------------------------


def train_through_cli(tmp_path, run_cli, tiny_mnist_dir, spec: str) -> dict:
    """Three steps of ``spec`` on Colored MNIST through ``domaingrad train`` (the shared run)."""
    return train_by_spec(run_cli, tiny_mnist_dir, tmp_path / "run", spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CDANN", "CausIRL_CORAL", "CausIRL_MMD"])
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir, name):
    record = train_through_cli(tmp_path, run_cli, tiny_mnist_dir, f"domaingrad.algorithms.alignment:{name}")
    if name.startswith("CausIRL"):
        assert math.isfinite(record["penalty"])
