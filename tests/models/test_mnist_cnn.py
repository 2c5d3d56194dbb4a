"""DomainBed's MNIST_CNN and the classifier head."""

from __future__ import annotations

import pytest
import torch

from domaingrad import models
from domaingrad.errors import DomainGradError


def test_mnist_cnn_architecture():
    net = models.MNIST_CNN((2, 28, 28))
    assert net(torch.randn(5, 2, 28, 28)).shape == (5, 128)
    convs = [(2, 64), (64, 128), (128, 128), (128, 128)]
    expected = sum(i * o * 9 + o for i, o in convs) + 2 * (64 + 3 * 128)  # convs + GroupNorm affine
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net.conv2.stride == (2, 2) and net.bn1.num_groups == 8


def test_group_norm_makes_samples_independent():
    net = models.MNIST_CNN((1, 28, 28))
    x = torch.randn(6, 1, 28, 28)
    alone = net(x[:1])
    together = net(torch.cat([x[:1], 100 * x[1:]]))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_featurizer_for_shape_and_classifier():
    assert isinstance(models.featurizer_for((1, 28, 28), {}), models.MNIST_CNN)
    with pytest.raises(DomainGradError, match="no featurizer for input shape"):
        models.featurizer_for((10,), {})
    assert models.classifier(128, 10)(torch.randn(4, 128)).shape == (4, 10)
    mlp = models.classifier(128, 10, nonlinear=True)
    assert mlp(torch.randn(4, 128)).shape == (4, 10) and len(mlp) == 5


def test_stage_fn_sees_every_stage_and_can_replace_it():
    net = models.MNIST_CNN((2, 28, 28))
    x = torch.randn(3, 2, 28, 28)
    seen = {}

    def record(name, out):
        seen[name] = tuple(out.shape)
        return out

    assert torch.equal(net(x, stage_fn=record), net(x))
    assert list(seen) == list(net.stage_names)
    assert all(shape[1] == net.stage_channels[name] for name, shape in seen.items())
    zeroed = net(x, stage_fn=lambda name, out: out * 0 if name == "conv4" else out)
    assert torch.equal(zeroed, torch.zeros(3, 128))
