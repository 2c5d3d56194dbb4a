"""DomainBed's ``Debug28``: three environments of 16 random inputs each, for fast tests
of the protocol (not for measuring anything)."""

from __future__ import annotations

import torch

from .base import MultipleDomainDataset, TensorEnvironment


class Debug28(MultipleDomainDataset):
    """3 environments x 16 random (3, 28, 28) inputs with random binary labels
    (DomainBed ``datasets.Debug28``), drawn from a generator seeded with ``seed``."""

    ENVIRONMENTS = ["0", "1", "2"]
    SMALL_IMAGES = True
    INPUT_SHAPE = (3, 28, 28)
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
        self.source = "Debug28: random tensors (3 envs x 16)"
