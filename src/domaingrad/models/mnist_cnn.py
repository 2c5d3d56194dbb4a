"""DomainBed's MNIST_CNN featurizer (METHODS.md section 9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MNIST_CNN(nn.Module):
    """Four 3x3 convolutions (64, 128 stride 2, 128, 128), each followed by ReLU then
    GroupNorm(8), then global average pooling (DomainBed ``networks.MNIST_CNN``).

    Input (B, C, 28, 28); output (B, 128) features.
    """

    n_outputs = 128

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(F.relu(self.conv1(x)))
        x = self.bn1(F.relu(self.conv2(x)))
        x = self.bn2(F.relu(self.conv3(x)))
        x = self.bn3(F.relu(self.conv4(x)))
        return x.mean(dim=(2, 3))
