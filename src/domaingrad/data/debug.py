"""DomainBed's ``Debug28`` and ``Debug224``: three environments of 16 random inputs
each, for fast tests of the protocol (not for measuring anything)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import MultipleDomainDataset, TensorEnvironment


class _Debug(MultipleDomainDataset):
    """3 environments x 16 random ``INPUT_SHAPE`` inputs (standard normal) with random
    binary labels (DomainBed ``datasets.Debug``), drawn from a generator seeded with
    ``seed``: per environment, first the inputs, then the labels.

    DomainBed draws from the global generator; domaingrad from its own, so building the
    dataset leaves the global random state alone.
    """

    ENVIRONMENTS = ["0", "1", "2"]
    INPUT_SHAPE: ClassVar[tuple[int, int, int]]
    environments: list[TensorEnvironment]

    def __init__(self, data_dir: str | None = None, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.environments = [
            TensorEnvironment(
                name,
                torch.randn(16, *self.INPUT_SHAPE, generator=generator),
                torch.randint(0, 2, (16,), generator=generator),
            )
            for name in self.ENVIRONMENTS
        ]
        self.input_shape = self.INPUT_SHAPE
        self.num_classes = 2
        side = self.INPUT_SHAPE[-1]
        self.source = f"{type(self).__name__}: random tensors (3 envs x 16 of 3x{side}x{side})"


class Debug28(_Debug):
    """3 environments x 16 random (3, 28, 28) inputs with random binary labels
    (DomainBed ``datasets.Debug28``), drawn from a generator seeded with ``seed``."""

    SMALL_IMAGES = True
    INPUT_SHAPE = (3, 28, 28)


class Debug224(_Debug):
    """3 environments x 16 random (3, 224, 224) inputs with random binary labels
    (DomainBed ``datasets.Debug224``), drawn from a generator seeded with ``seed``.

    Not a small-image dataset (DomainBed's ``SMALL_IMAGES`` lists only Debug28 and the
    MNIST datasets), so it gets the ResNet featurizer and the image hyperparameters."""

    INPUT_SHAPE = (3, 224, 224)
