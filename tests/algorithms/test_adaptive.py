"""ARM-CML (adaptive risk minimisation with a context network): contexts, the update and
what the optimizer trains, each checked against the formula written out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad.algorithms.adaptive import ARM, ContextNet, context_groups
from domaingrad.errors import DomainGradError
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import SHAPE, adam_step, assert_same_params, batches, build, tiny  # noqa: F401


def test_context_groups_follow_domainbed():
    assert context_groups(12, 4) == [4, 4, 4]
    assert context_groups(4, 4) == [4]
    assert context_groups(10, 4) == [10]  # not a multiple: the whole batch is one context
    assert context_groups(3, 4) == [3]


def test_context_net_is_domainbeds_shape_preserving_cnn():
    net = ContextNet((3, 7, 7))
    assert net(torch.zeros(2, 3, 7, 7)).shape == (2, 1, 7, 7)
    names = [n for n, _ in net.named_parameters()]
    assert names[0] == "context_net.0.weight" and names[-1] == "context_net.6.bias" and len(names) == 10


def by_hand(algo, x, groups):
    """network([x, c]) with c the mean of context_net(x) over each group of consecutive examples."""
    ctx = algo.context_net(x)
    parts, start = [], 0
    for n in groups:
        parts.append(ctx[start : start + n].mean(0, keepdim=True).expand(n, -1, -1, -1))
        start += n
    return algo.network(torch.cat([x, torch.cat(parts)], 1))


@pytest.mark.usefixtures("tiny")
def test_featurizer_sees_one_more_channel_and_predict_uses_the_batch_as_context():
    algo = build(ARM, batch_size=3).eval()
    assert algo.featurizer.lin.in_features == (SHAPE[0] + 1) * 9 and algo.input_shape == SHAPE
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = algo.predict(x)
        assert torch.allclose(got, by_hand(algo, x, [3, 3]), atol=1e-6)
        # the first context ignores the second group: change it, the first three logits stay
        other = torch.cat([x[:3], x[3:] + 1])
        assert torch.allclose(algo.predict(other)[:3], got[:3], atol=1e-6)
        assert not torch.allclose(algo.predict(other)[3:], got[3:], atol=1e-4)
        # a batch of 5 (not a multiple of 3) is one context
        assert torch.allclose(algo.predict(x[:5]), by_hand(algo, x[:5], [5]), atol=1e-6)


def double(minibatches):
    """float64, so that the conv biases before BatchNorm (whose gradient is rounding noise)
    move by ~lr * noise / eps instead of an Adam step of +-lr decided by rounding."""
    return [(x.double(), y) for x, y in minibatches]


@pytest.mark.parametrize("train_context", [True, False])
@pytest.mark.usefixtures("tiny")
def test_update_is_adam_on_the_contextual_loss_over_the_right_parameters(train_context):
    """loss = CE(network([x, c_d(x)]), y), c_d the mean context of x's domain batch; Adam
    over network + context net (the paper) or over the network only (DomainBed)."""
    algo = build(ARM, num_domains=3, batch_size=4, arm_train_context=train_context).double()
    ref = copy.deepcopy(algo)
    mb = double(batches(3, n=4))
    all_x, all_y = torch.cat([x for x, _ in mb]), torch.cat([y for _, y in mb])
    context_before = [p.detach().clone() for p in algo.context_net.parameters()]
    bn_before = algo.context_net.context_net[1].running_mean.clone()
    trained = nn.ModuleList([ref.network, ref.context_net] if train_context else [ref.network])
    expected = adam_step(trained, lambda _: F.cross_entropy(by_hand(ref, all_x, [4, 4, 4]), all_y))
    out = algo.update(mb)
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    assert_same_params(algo, ref)
    moved = [not torch.equal(a, b) for a, b in zip(context_before, algo.context_net.parameters())]
    assert all(moved) if train_context else not any(moved)
    assert not torch.equal(bn_before, algo.context_net.context_net[1].running_mean)


@pytest.mark.usefixtures("tiny")
def test_update_contexts_are_per_domain_whatever_the_batch_size_hparam():
    """Domain batches of 5 with batch_size 4: still one context per domain."""
    algo = build(ARM, num_domains=2, batch_size=4).double()
    ref = copy.deepcopy(algo)
    mb = double(batches(2, n=5))
    all_x, all_y = torch.cat([x for x, _ in mb]), torch.cat([y for _, y in mb])
    trained = nn.ModuleList([ref.network, ref.context_net])
    expected = adam_step(trained, lambda _: F.cross_entropy(by_hand(ref, all_x, [5, 5]), all_y))
    assert algo.update(mb)["loss"] == pytest.approx(expected, rel=1e-6)
    assert_same_params(algo, ref)


def test_update_on_mnist_cnn_changes_every_parameter():
    algo = build(ARM, shape=(2, 28, 28), num_classes=2, batch_size=4)
    before = [p.detach().clone() for p in algo.parameters()]
    out = algo.update(batches(shape=(2, 28, 28), num_classes=2))
    assert math.isfinite(out["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))
    assert algo.predict(torch.zeros(8, 2, 28, 28)).shape == (8, 2)


@pytest.mark.usefixtures("tiny")
def test_non_image_inputs_are_refused():
    with pytest.raises(DomainGradError, match="image inputs"):
        build(ARM, shape=(10,))


@pytest.mark.slow
def test_arm_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    record = train_by_spec(run_cli, tiny_mnist_dir, tmp_path / "run", "domaingrad.algorithms.adaptive:ARM")
    assert math.isfinite(record["loss"]) and record["hparams"]["arm_train_context"] is True
    assert 0 <= record["env2_out_acc"] <= 1


def test_domainbeds_batch_size_on_large_images_and_evaluation_batches():
    """DomainBed: batch_size 8 (search 8) for ARM on large images; the common one on small
    images; evaluation in DomainBed's batches of 64 (the batch is the context)."""
    assert ARM.common_overrides(True) == []
    (spec,) = ARM.common_overrides(False)
    assert (spec.name, spec.default, spec.draw(np.random.RandomState(3))) == ("batch_size", 8, 8)
    assert ARM.eval_batch_size == 64
