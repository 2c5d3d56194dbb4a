"""DomainBed's MNIST_CNN featurizer (Gulrajani & Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021; ``domainbed/networks.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Featurizer, StageFn


class MNIST_CNN(Featurizer):
    """Four 3x3 convolutions (64, 128 stride 2, 128, 128), each followed by ReLU then
    GroupNorm(8), then global average pooling (DomainBed ``networks.MNIST_CNN``).

    Input (B, C, 28, 28); output (B, 128) features.

    Stages (the featurizer interface of :mod:`domaingrad.models`): ``stage_names`` are
    the outputs of the four conv blocks (after their GroupNorm), of shapes (B, 64, 28, 28),
    (B, 128, 14, 14), (B, 128, 14, 14), (B, 128, 14, 14). ``forward(x, stage_fn)`` calls
    ``stage_fn(name, output)`` on each and continues with what it returns, so methods can
    read, mask or drop intermediate activations.
    """

    n_outputs = 128
    stage_names: tuple[str, ...] = ("conv1", "conv2", "conv3", "conv4")
    stage_channels: dict[str, int] = {"conv1": 64, "conv2": 128, "conv3": 128, "conv4": 128}

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, 64)
        self.bn1 = nn.GroupNorm(8, 128)
        self.bn2 = nn.GroupNorm(8, 128)
        self.bn3 = nn.GroupNorm(8, 128)

    def forward(self, x: torch.Tensor, stage_fn: StageFn = None) -> torch.Tensor:
        for name, conv, norm in (
            ("conv1", self.conv1, self.bn0),
            ("conv2", self.conv2, self.bn1),
            ("conv3", self.conv3, self.bn2),
            ("conv4", self.conv4, self.bn3),
        ):
            x = norm(F.relu(conv(x)))
            if stage_fn is not None:
                x = stage_fn(name, x)
        return x.mean(dim=(2, 3))
