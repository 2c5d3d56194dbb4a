"""torchvision backbones: stage names and shapes, DomainBed's choice, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from domaingrad import models
from domaingrad.errors import DomainGradError

pytestmark = pytest.mark.usefixtures("single_thread")


def _stages(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    seen: dict[str, tuple[int, ...]] = {}

    def record(name, out):
        seen[name] = tuple(out.shape)
        return out

    return net(x, stage_fn=record), seen


def test_resnet18_stages_and_output():
    net = models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}).eval()
    x = torch.randn(2, 3, 32, 32)
    out, seen = _stages(net, x)
    assert seen == {
        "layer1": (2, 64, 8, 8),
        "layer2": (2, 128, 4, 4),
        "layer3": (2, 256, 2, 2),
        "layer4": (2, 512, 1, 1),
    }
    assert list(seen) == list(net.stage_names) and out.shape == (2, net.n_outputs) == (2, 512)
    assert all(seen[n][1] == net.stage_channels[n] for n in seen)
    assert torch.equal(out, net(x))
    # the output is the pooled layer4 map, i.e. torchvision's fc input
    tv = net.network
    h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    h = tv.layer4(tv.layer3(tv.layer2(tv.layer1(h))))
    assert torch.allclose(out, torch.flatten(tv.avgpool(h), 1), atol=1e-6)
    zeroed = net(x, stage_fn=lambda name, h: h * 0 if name == "layer4" else h)
    assert torch.equal(zeroed, torch.zeros(2, 512))


def test_resnet50_stage_channels():
    net = models.featurizer_for((3, 32, 32), {"backbone": "resnet50"}).eval()
    out, seen = _stages(net, torch.randn(1, 3, 32, 32))
    assert {n: s[1] for n, s in seen.items()} == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert seen == {n: (1, c, *s) for (n, c), s in zip(net.stage_channels.items(), [(8, 8), (4, 4), (2, 2), (1, 1)])}
    assert out.shape == (1, 2048) == (1, net.n_outputs)


def test_alexnet_stages_and_output():
    net = models.featurizer_for((3, 64, 64), {"backbone": "alexnet"}).eval()
    x = torch.randn(2, 3, 64, 64)
    out, seen = _stages(net, x)
    assert seen == {
        "conv1": (2, 64, 7, 7),
        "conv2": (2, 192, 3, 3),
        "conv3": (2, 384, 3, 3),
        "conv4": (2, 256, 3, 3),
        "conv5": (2, 256, 1, 1),
        "pool5": (2, 9216),
        "fc6": (2, 4096),
    }
    assert tuple(seen) == net.stage_names and out.shape == (2, 4096)
    tv = net.network  # torchvision's AlexNet without fc8 gives the same features in eval mode
    assert torch.allclose(out, tv(x), atol=1e-5)
    fc6 = {}
    net(x, stage_fn=lambda name, h: fc6.setdefault(name, h) if name == "fc6" else h)
    assert torch.allclose(out, torch.relu(net.fc7(fc6["fc6"])), atol=1e-6)  # fc6 stage = fc7 input
    assert (fc6["fc6"] >= 0).all()
    assert isinstance(net.drop6, nn.Dropout) and net.drop7.p == 0.5
    with pytest.raises(DomainGradError, match="at least 64x64"):
        models.featurizer_for((3, 32, 32), {"backbone": "alexnet"})


def test_domainbed_choice_of_featurizer():
    assert models.backbone_name((1, 28, 28), {}) == "mnist_cnn"
    assert models.backbone_name((3, 224, 224), {"backbone": "auto", "resnet18": False}) == "resnet50"
    assert models.backbone_name((3, 64, 64), {"resnet18": True}) == "resnet18"
    assert models.backbone_name((3, 28, 28), {"backbone": "resnet18"}) == "resnet18"
    with pytest.raises(DomainGradError, match="unknown backbone 'vgg'"):
        models.backbone_name((3, 64, 64), {"backbone": "vgg"})


def test_resnet_dropout_and_channel_adaptation():
    net = models.featurizer_for((2, 32, 32), {"backbone": "resnet18", "resnet_dropout": 0.5})
    assert net.dropout.p == 0.5 and net.network.conv1.in_channels == 2
    out = net(torch.randn(4, 2, 32, 32))
    assert out.shape == (4, 512) and (out == 0).float().mean() > 0.3  # dropout active in train mode


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_batchnorm_keeps_running_statistics(freeze):
    net = models.featurizer_for((3, 32, 32), {"backbone": "resnet18", "freeze_bn": freeze})
    net.train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training != freeze for m in bns)
    before = [m.running_mean.clone() for m in bns]
    net(3 + torch.randn(4, 3, 32, 32))
    changed = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns)]
    assert all(changed) if not freeze else not any(changed)
    # the affine parameters still get gradients when frozen (DomainBed trains them)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert bns[0].weight.grad is not None and net.training
