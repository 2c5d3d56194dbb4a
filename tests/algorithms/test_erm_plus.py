"""ERM++ (Teterwak, Saito, Tsiligkaridis, Saenko, Plummer, 2023), DomainBed's version:
linear probing then full training, the moving average of the weights (a uniform mean of the
iterates from ``sma_start_iter - 1`` on), the Auto-LR plateau record, LARS, the local
weights file, and a CLI run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad import models
from domaingrad.algorithms.erm_plus import LARS, ERMPlusPlus
from domaingrad.registry import create_algorithm
from tests.algorithms.cli_runs import train_by_spec
from tests.algorithms.test_baselines import SHAPE, TinyFeaturizer, batches, build

SPEC = "domaingrad.algorithms.erm_plus:ERMPlusPlus"


@pytest.fixture
def tiny(monkeypatch):
    """TinyFeaturizer (tanh of one linear layer) in place of the real featurizer."""
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams, *a, **k: TinyFeaturizer(input_shape))


class NormedFeaturizer(nn.Module):
    """(B, *SHAPE) -> (B, 5): BatchNorm1d(Linear(flatten(x)))."""

    n_outputs = 5

    def __init__(self, input_shape):
        super().__init__()
        self.lin = nn.Linear(math.prod(input_shape), 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.lin(x.flatten(1)))


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_linear_probing_trains_only_the_classifier_for_linear_steps_plus_one_updates(tiny):
    algo = build(ERMPlusPlus, linear_steps=2, linear_lr=3e-4)
    ref = copy.deepcopy(algo.network)
    mb = batches(2, n=4)
    x, y = torch.cat([a for a, _ in mb]), torch.cat([b for _, b in mb])
    loss = F.cross_entropy(ref(x), y)
    head = list(ref[1].parameters())
    expected = [p.detach() - 3e-4 * g / (g.abs() + 1e-8) for p, g in zip(head, torch.autograd.grad(loss, head))]
    assert algo.update(mb)["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for p, q in zip(algo.classifier.parameters(), expected):
        assert torch.allclose(p, q, atol=1e-9, rtol=0)
    frozen = _params(algo.featurizer)
    for step in (1, 2):  # global_iter 1 and 2 are still <= linear_steps
        algo.update(batches(2, seed=step))
        assert all(torch.equal(a, b) for a, b in zip(frozen, algo.featurizer.parameters()))
    assert algo.optimizer.state == {} and not algo.probing
    algo.update(batches(2, seed=3))  # the fourth update trains the whole network with optimizer
    assert not any(torch.equal(a, b) for a, b in zip(frozen, algo.featurizer.parameters()))
    assert len(algo.optimizer.state) == len(list(algo.network.parameters()))


def test_moving_average_is_the_mean_of_the_iterates_from_sma_start_minus_one(tiny):
    algo = build(ERMPlusPlus, linear_steps=0)
    algo.sma_start_iter = 3
    iterates = []
    for step in range(6):
        algo.update(batches(2, seed=step))
        iterates.append(_params(algo.network))
        t = step + 1  # global_iter after this update
        if t < 3:
            want = iterates[-1]  # a copy of the network
        else:  # avg_t = (avg_{t-1} * c + theta_t) / (1 + c), c = t - 2: the mean of theta_2 .. theta_t
            window = iterates[1:]
            want = [torch.stack(ps).mean(0) for ps in zip(*window)]
        for p, q in zip(algo.network_sma.parameters(), want):
            assert torch.allclose(p, q, atol=1e-6, rtol=0), step
        assert int(algo.global_iter) == t and int(algo.sma_count) == max(0, t - 2)
    x = torch.randn(3, *SHAPE)
    assert torch.equal(algo.predict(x), algo.network_sma(x))
    assert not torch.allclose(algo.predict(x), algo.network(x))
    assert all(not p.requires_grad for p in algo.network_sma.parameters())
    assert {id(p) for g in algo.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in algo.network.parameters()
    }


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_unfrozen_batchnorm_refreshes_the_averages_statistics(monkeypatch, freeze_bn):
    monkeypatch.setattr(models, "featurizer_for", lambda input_shape, hparams, *a, **k: NormedFeaturizer(input_shape))
    algo = build(ERMPlusPlus, linear_steps=0, freeze_bn=freeze_bn)
    mb = batches(2, n=4)
    x = torch.cat([a for a, _ in mb])
    algo.update(mb)
    net_bn, sma_bn = algo.network[0].bn, algo.network_sma[0].bn
    if freeze_bn:  # a copy of the network's statistics
        assert torch.equal(sma_bn.running_mean, net_bn.running_mean)
    else:  # then one more training-mode pass of the batch: momentum 0.1 towards its mean
        batch_mean = algo.network_sma[0].lin(x.flatten(1)).mean(0)
        assert torch.allclose(sma_bn.running_mean, 0.9 * net_bn.running_mean + 0.1 * batch_mean, atol=1e-6)
        assert not torch.allclose(sma_bn.running_mean, net_bn.running_mean)


def test_plateau_record_follows_reduce_lr_on_plateau_and_ends_after_three_changes(tiny):
    algo = build(ERMPlusPlus, linear_steps=1, lr=1e-3)
    algo.update(batches(2))
    assert algo.probing and algo.plateau_step(1.0) is None and algo.lr_schedule == []
    algo.update(batches(2, seed=1))
    # constant losses, patience 1, factor 0.1: the lr drops at every second step after the first
    records = [copy.deepcopy(algo.plateau_step(1.0)) for _ in range(7)]
    lrs = [r[0] for r in records[-1]]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 0.0], rel=1e-9)
    assert lrs[-1] == 0.0 and algo.lr_schedule_changes == 3
    # the second run follows it
    other = build(ERMPlusPlus, linear_steps=1)
    schedule = records[-1][2:]
    assert other.follow_schedule(schedule) is schedule  # still probing
    other.update(batches(2))
    other.update(batches(2, seed=1))
    rest = other.follow_schedule(schedule)
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4) and rest == schedule[1:]


def test_validation_loss_is_the_mean_over_loaders_of_batch_mean_losses(tiny):
    algo = build(ERMPlusPlus)
    loaders = [batches(2, seed=1, n=3), batches(3, seed=2, n=5)]  # lists of (x, y) batches
    sma = algo.network_sma
    want = np.mean([np.mean([F.cross_entropy(sma(x), y).item() for x, y in loader]) for loader in loaders])
    assert algo.validation_loss(loaders) == pytest.approx(want, rel=1e-6)


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([2.0, 3.0])
    opt.step()
    d = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # [[1.3, 0.4]]
    d = d * (0.01 * 5.0 / d.norm())
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.5 * d)
    assert torch.allclose(b, torch.tensor([1.0, -1.0]) - 0.5 * torch.tensor([2.0, 3.0]))  # 1-D: raw gradient
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    before = w.detach().clone()
    opt.step()
    # zero gradient: d = 0.1 w scaled to 0.01 ||w|| / ||0.1 w|| = 0.1, i.e. 0.01 w; mu = 0.9 mu + d
    assert torch.allclose(w, before - 0.5 * (0.9 * d + 0.01 * before))
    assert torch.allclose(b, torch.tensor([1.0, -1.0]) - 0.5 * (1 + 0.9) * torch.tensor([2.0, 3.0]))


def test_lars_option_builds_lars_optimizers(tiny):
    algo = build(ERMPlusPlus, lars=True)
    assert isinstance(algo.optimizer, LARS) and isinstance(algo.linear_optimizer, LARS)
    algo.update(batches(2))


def test_weights_file_is_loaded_into_the_network_and_its_average(tmp_path):
    torch.manual_seed(5)
    donor = models.MNIST_CNN((2, 28, 28))
    path = tmp_path / "cnn.pt"
    torch.save(donor.state_dict(), path)
    algo = create_algorithm(SPEC, (2, 28, 28), 2, 2, weights=str(path))
    for featurizer in (algo.featurizer, algo.network_sma[0]):
        for (name, p), q in zip(featurizer.state_dict().items(), donor.state_dict().values()):
            assert torch.equal(p, q), name


def test_training_state_round_trip_keeps_the_schedule(tiny):
    a = build(ERMPlusPlus, linear_steps=0)
    for step in range(3):
        a.update(batches(2, seed=step))
        a.plateau_step(1.0)
    b = build(ERMPlusPlus, seed=9, linear_steps=0)
    b.load_training_state(a.training_state())
    assert b.lr_schedule == a.lr_schedule and b.scheduler.num_bad_epochs == a.scheduler.num_bad_epochs
    assert int(b.global_iter) == 3
    for step in range(3, 5):
        mb = batches(2, seed=step)
        assert a.update(mb) == b.update(mb)
        assert a.plateau_step(1.0) == b.plateau_step(1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_defaults():
    specs = {s.name: s for s in ERMPlusPlus.hparam_specs(False)}
    assert {k: s.default for k, s in specs.items()} == {"linear_lr": 5e-5, "linear_steps": 500, "lars": False}
    draws = [specs["linear_lr"].draw(np.random.RandomState(i)) for i in range(30)]
    assert all(1e-5 <= d <= 10**-3.5 for d in draws) and len(set(draws)) > 1
    assert ERMPlusPlus.sma_start_iter == 600


@pytest.mark.slow
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    out = tmp_path / "run"
    hparams = '{"batch_size": 8, "linear_steps": 1}'
    record = train_by_spec(run_cli, tiny_mnist_dir, out, SPEC, hparams)
    assert math.isfinite(record["loss"]) and (out / "done").exists()
