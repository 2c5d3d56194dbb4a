"""Shared by the tests of the stage-dropping algorithms (RSC, DropBlock, GSNR-DropBlock,
Meta-GSNR): a small staged featurizer, builders of algorithms and minibatches, and the
checks every such algorithm passes. The ``staged_cnn`` fixture (tests/algorithms/conftest.py)
puts StagedCNN in place of the real featurizer."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from domaingrad.hparams import common_hparams

SHAPE = (2, 9, 9)  # input shape of StagedCNN


class StagedCNN(nn.Module):
    """A small featurizer with the stage interface of MNIST_CNN: three 3x3 convolutions
    (4, 6 stride 2, 6 channels), each ReLU then GroupNorm(2); stage maps (B, 4, 9, 9),
    (B, 6, 5, 5), (B, 6, 5, 5); output the spatial mean (B, 6)."""

    n_outputs = 6
    stage_names = ("conv1", "conv2", "conv3")
    stage_channels = {"conv1": 4, "conv2": 6, "conv3": 6}

    def __init__(self, input_shape):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(input_shape[0], 4, 3, padding=1),
                nn.Conv2d(4, 6, 3, 2, padding=1),
                nn.Conv2d(6, 6, 3, padding=1),
            ]
        )
        self.norms = nn.ModuleList([nn.GroupNorm(2, 4), nn.GroupNorm(2, 6), nn.GroupNorm(2, 6)])

    def blocks(self):
        return zip(self.stage_names, self.convs, self.norms)

    def forward(self, x, stage_fn=None):
        for name, conv, norm in self.blocks():
            x = norm(F.relu(conv(x)))
            if stage_fn is not None:
                x = stage_fn(name, x)
        return x.mean(dim=(2, 3))


def build(cls, num_domains=2, seed=0, num_classes=3, **overrides):
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    assert set(overrides) <= set(hp)
    hp.update(overrides)
    torch.manual_seed(seed)
    return cls(SHAPE, num_classes, num_domains, hp)


def batches(num_domains=2, seed=0, n=3, num_classes=3, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))
        for _ in range(num_domains)
    ]


def concat(mbs):
    return torch.cat([x for x, _ in mbs]), torch.cat([y for _, y in mbs])


def check_round_trip(cls, overrides: dict) -> None:
    """An update changes every parameter; a training state saved after one update and loaded
    into a differently seeded copy continues identically; predict is the network."""
    a = build(cls, **overrides)
    before = [p.detach().clone() for p in a.network.parameters()]
    a.update(batches(seed=0))
    assert all(not torch.equal(p, q) for p, q in zip(before, a.network.parameters()))
    buf = io.BytesIO()
    torch.save(a.training_state(), buf)
    buf.seek(0)
    b = build(cls, seed=99, **overrides)
    b.load_training_state(torch.load(buf, weights_only=False))
    for i in (1, 2):
        out_a, out_b = a.update(batches(seed=i)), b.update(batches(seed=i))
        assert out_a == out_b and all(math.isfinite(v) for v in out_a.values())
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    a.eval()
    with torch.no_grad():
        assert torch.equal(a.predict(batches()[0][0]), a.network(batches()[0][0]))


def check_trains_on_mnist_cnn(cls, overrides: dict) -> None:
    """DomainBed's MNIST_CNN with ColoredMNIST-shaped inputs (2, 28, 28), 2 per domain."""
    hp = {s.name: s.default for s in common_hparams(True) + cls.hparam_specs(True)}
    hp.update(overrides)
    torch.manual_seed(0)
    algo = cls((2, 28, 28), 2, 2, hp)
    before = [p.detach().clone() for p in algo.network.parameters()]
    out = algo.update(batches(n=2, num_classes=2, shape=(2, 28, 28)))
    assert all(math.isfinite(v) for v in out.values())
    assert all(not torch.equal(p, q) for p, q in zip(before, algo.network.parameters()))
    assert algo.predict(torch.zeros(3, 2, 28, 28)).shape == (3, 2)


def check_hparams_registered(name: str) -> None:
    """The algorithm's hyperparameters are new names (none shadows a common one), the
    registry lists exactly common + own, and random draws keep the default's type and
    stay within the choices."""
    from domaingrad.algorithms import algorithm_class
    from domaingrad.registry import hparam_specs

    for small, dataset in ((True, "ColoredMNIST"), (False, "PACS")):
        common = {s.name for s in common_hparams(small)}
        specs = algorithm_class(name).hparam_specs(small)
        assert not {s.name for s in specs} & common
        assert set(hparam_specs(name, dataset)) == common | {s.name for s in specs}
        for spec in specs:
            draws = [spec.draw(np.random.RandomState(seed)) for seed in range(10)]
            assert all(type(d) is type(spec.default) for d in draws), spec.name
            assert spec.choices is None or (spec.default in spec.choices and set(draws) <= set(spec.choices))
