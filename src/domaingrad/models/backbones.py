"""torchvision backbones as featurizers: ResNet-18, ResNet-50 and AlexNet.

Each featurizer follows the interface of :mod:`domaingrad.models` (see
:class:`~domaingrad.models.mnist_cnn.MNIST_CNN`): ``n_outputs``, ``stage_names``,
``stage_channels`` and ``forward(x, stage_fn=None)``, where ``stage_fn(name, output)``
is called on each named intermediate output and the forward pass continues with what
it returns (DMG masks, RSC and GSNR-DropBlock act there).

The ResNets are DomainBed's ``networks.ResNet``: torchvision's network without its
``fc`` layer, dropout (hparam ``resnet_dropout``) on the pooled features, BatchNorm
layers kept in eval mode during training (``freeze_bn``), and a first convolution
adapted to inputs with other than 3 channels by cycling the RGB filters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DomainGradError
from .base import Featurizer, StageFn


def _apply(stage_fn: StageFn, name: str, x: torch.Tensor) -> torch.Tensor:
    return x if stage_fn is None else stage_fn(name, x)


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (height, width) size attribute, typed as the pair it always is."""
    height, width = size
    return height, width


def adapt_input_channels(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """DomainBed's channel adaptation of a first convolution: a new convolution with
    ``channels`` inputs whose filter for input channel i is the old one's for i % 3.

    Returns ``conv`` itself when it already has ``channels`` inputs.
    """
    if conv.in_channels == channels:
        return conv
    padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        kernel_size=_pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, torch.arange(channels) % conv.in_channels])
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class ResNetFeaturizer(Featurizer):
    """ResNet-18 or ResNet-50 (He et al. 2016; torchvision) as DomainBed's featurizer.

    Input (B, C, H, W) with H, W >= 32 (ImageNet-normalised images); output (B, 512) for
    ResNet-18 or (B, 2048) for ResNet-50: the globally average-pooled ``layer4`` output
    (the input of torchvision's ``fc``) after ``nn.Dropout(dropout)``.

    Stages: ``layer1`` .. ``layer4``, outputs (B, C_k, H/4, W/4), (B, 2 C_k, H/8, W/8),
    (B, 4 C_k, H/16, W/16), (B, 8 C_k, H/32, W/32) with C_k = 64 (ResNet-18) or 256
    (ResNet-50), spatial sizes rounded up.

    Args:
        depth: 18 or 50.
        input_shape: (C, H, W) of one input.
        dropout: DomainBed's ``resnet_dropout``.
        freeze_bn: keep every BatchNorm layer in eval mode (running statistics fixed,
            affine parameters still trained), as DomainBed's ``ResNet.freeze_bn``.
        state_dict: torchvision-named weights to load before the channel adaptation
            (see :mod:`domaingrad.models.weights`), or None for random initialisation.

    Attributes:
        network: the torchvision ResNet (``fc`` replaced by ``nn.Identity``).
        dropout: the ``nn.Dropout`` on the pooled features.
    """

    def __init__(
        self,
        depth: int,
        input_shape: tuple[int, ...],
        dropout: float = 0.0,
        freeze_bn: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if depth not in (18, 50):
            raise ValueError(f"ResNet depth must be 18 or 50, got {depth}")
        if min(input_shape[1:]) < 32:
            raise DomainGradError(
                f"ResNet-{depth} needs images of at least 32x32, got input shape "
                f"{tuple(input_shape)}; for image folders raise --image-size, else "
                f"choose another backbone"
            )
        import torchvision  # imported here: torchvision takes seconds to import

        self.network = (torchvision.models.resnet18 if depth == 18 else torchvision.models.resnet50)(weights=None)
        if state_dict is not None:
            from .weights import load_backbone_state

            load_backbone_state(self.network, state_dict, f"ResNet-{depth}", ignore_prefixes=("fc.",))
        self.network.conv1 = adapt_input_channels(self.network.conv1, input_shape[0])
        self.network.fc = nn.Identity()
        self.n_outputs = 512 if depth == 18 else 2048
        width = 64 if depth == 18 else 256
        self.stage_names: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
        self.stage_channels: dict[str, int] = {name: width * 2**k for k, name in enumerate(self.stage_names)}
        self.dropout = nn.Dropout(dropout)
        self.freeze_bn = freeze_bn
        self.train()

    def forward(self, x: torch.Tensor, stage_fn: StageFn = None) -> torch.Tensor:
        net = self.network
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for name in self.stage_names:
            x = _apply(stage_fn, name, getattr(net, name)(x))
        return self.dropout(torch.flatten(net.avgpool(x), 1))

    def train(self, mode: bool = True) -> ResNetFeaturizer:
        super().train(mode)
        if self.freeze_bn:
            for module in self.network.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class AlexNetFeaturizer(Featurizer):
    """AlexNet (Krizhevsky et al. 2012; torchvision's single-GPU variant) up to fc7.

    Input (B, C, H, W) with H, W >= 64; output (B, 4096): the fc7 output after ReLU, the
    input of fc8 (the classifier). torchvision's dropouts before fc6 and fc7 are kept as
    ``drop6`` and ``drop7`` (p = 0.5); set their ``p`` to 0 to turn them off (DMG trains
    AlexNet without dropout).

    Stages, in order (shapes at 224x224): ``conv1`` (B, 64, 27, 27) and ``conv2``
    (B, 192, 13, 13) after conv, ReLU and max-pool; ``conv3`` (B, 384, 13, 13) and
    ``conv4`` (B, 256, 13, 13) after conv and ReLU; ``conv5`` (B, 256, 6, 6) after conv,
    ReLU and max-pool; ``pool5`` (B, 9216), the adaptive-average-pooled and flattened
    fc6 input (before ``drop6``); ``fc6`` (B, 4096), the fc6 output after ReLU (the fc7
    input, before ``drop7``).

    Args:
        input_shape: (C, H, W) of one input.
        state_dict: torchvision-named weights (``features.*``, ``classifier.*``), or None.

    Attributes:
        network: the torchvision AlexNet (``classifier.6``, fc8, replaced by ``nn.Identity``).
    """

    n_outputs = 4096
    stage_names: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6")
    stage_channels: dict[str, int] = {
        "conv1": 64,
        "conv2": 192,
        "conv3": 384,
        "conv4": 256,
        "conv5": 256,
        "pool5": 9216,
        "fc6": 4096,
    }
    #: torchvision ``features`` indices (exclusive ends) closing each conv stage
    _CONV_ENDS = {"conv1": 3, "conv2": 6, "conv3": 8, "conv4": 10, "conv5": 13}

    def __init__(self, input_shape: tuple[int, ...], state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if min(input_shape[1:]) < 64:
            raise DomainGradError(
                f"AlexNet needs images of at least 64x64 (its max-pools shrink smaller "
                f"ones to nothing), got input shape {tuple(input_shape)}; for image folders "
                f"raise --image-size"
            )
        import torchvision

        self.network = torchvision.models.alexnet(weights=None)
        if state_dict is not None:
            from .weights import load_backbone_state

            load_backbone_state(self.network, state_dict, "AlexNet", ignore_prefixes=("classifier.6.",))
        self.network.features[0] = adapt_input_channels(self.network.features[0], input_shape[0])
        self.network.classifier[6] = nn.Identity()

    # properties, not attributes, so the state dict keeps torchvision's names only once
    drop6 = property(lambda self: self.network.classifier[0])
    fc6 = property(lambda self: self.network.classifier[1])
    drop7 = property(lambda self: self.network.classifier[3])
    fc7 = property(lambda self: self.network.classifier[4])

    def forward(self, x: torch.Tensor, stage_fn: StageFn = None) -> torch.Tensor:
        start = 0
        for name, end in self._CONV_ENDS.items():
            x = _apply(stage_fn, name, self.network.features[start:end](x))
            start = end
        x = _apply(stage_fn, "pool5", torch.flatten(self.network.avgpool(x), 1))
        x = _apply(stage_fn, "fc6", torch.relu(self.fc6(self.drop6(x))))
        return torch.relu(self.fc7(self.drop7(x)))
