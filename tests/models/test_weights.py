"""Initial weights: a saved state dict, the torchvision cache (imagenet), and the errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from domaingrad import models
from domaingrad.errors import DomainGradError

pytestmark = pytest.mark.usefixtures("single_thread")


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        net.bn1.running_mean.uniform_()  # buffers travel too
    return net.state_dict()


def test_state_dict_file_is_loaded(tmp_path):
    state = _resnet18_state(1)
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    net = models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights=str(path))
    got = net.network.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))
    fresh = models.featurizer_for((3, 32, 32), {"backbone": "resnet18"})
    assert not torch.equal(fresh.network.conv1.weight, state["conv1.weight"])


def test_wrapped_and_prefixed_state_dicts_and_channel_adaptation(tmp_path):
    state = _resnet18_state(2)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    net = models.featurizer_for((2, 32, 32), {"backbone": "resnet18"}, weights=str(path))
    # DomainBed's adaptation: input channel i takes the RGB filter i % 3
    assert torch.equal(net.network.conv1.weight, state["conv1.weight"][:, [0, 1]])
    assert torch.equal(net.network.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_alexnet_and_mnist_cnn_state_dicts(tmp_path):
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(alex, tmp_path / "alex.pt")
    net = models.featurizer_for((3, 64, 64), {"backbone": "alexnet"}, weights=str(tmp_path / "alex.pt"))
    assert torch.equal(net.fc7.weight, alex["classifier.4.weight"])
    cnn = models.MNIST_CNN((2, 28, 28)).state_dict()
    torch.save(cnn, tmp_path / "cnn.pt")
    loaded = models.featurizer_for((2, 28, 28), {}, weights=str(tmp_path / "cnn.pt"))
    assert torch.equal(loaded.conv4.weight, cnn["conv4.weight"])


def test_wrong_keys_and_shapes_are_named(tmp_path):
    state = _resnet18_state(3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.bn1.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(DomainGradError) as info:
        models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights=str(tmp_path / "bad.pt"))
    text = str(info.value)
    assert "missing: layer1.0.bn1.bias" in text and "unexpected: extra.weight" in text
    assert "conv1.weight (file (64, 3, 3, 3), ResNet-18 (64, 3, 7, 7))" in text
    # a ResNet-50 file given to ResNet-18 also fails with names, not a torch traceback
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(DomainGradError, match="does not fit ResNet-18"):
        models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights=str(tmp_path / "r50.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DomainGradError, match="cannot read"):
        models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights=str(tmp_path / "junk.pt"))
    with pytest.raises(DomainGradError, match="no such file"):
        models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights=str(tmp_path / "nope.pt"))


def test_imagenet_reads_the_torchvision_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert models.imagenet_file("resnet18") == expected
    with pytest.raises(DomainGradError) as info:
        models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights="imagenet")
    text = str(info.value)
    assert "resnet18-f37072fd.pth" in text and str(expected.parent) in text and "--weights none" in text
    assert not expected.exists()
    state = _resnet18_state(4)
    expected.parent.mkdir(parents=True)
    torch.save(state, expected)
    net = models.featurizer_for((3, 32, 32), {"backbone": "resnet18"}, weights="imagenet")
    assert torch.equal(net.network.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    with pytest.raises(DomainGradError, match="no ImageNet weights for mnist_cnn"):
        models.featurizer_for((1, 28, 28), {}, weights="imagenet")
