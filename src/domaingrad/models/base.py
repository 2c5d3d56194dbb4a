"""The featurizer interface shared by every backbone of :mod:`domaingrad.models`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: ``stage_fn(name, output) -> output``, called on each named stage of a featurizer, or None
StageFn = Callable[[str, torch.Tensor], torch.Tensor] | None


class Featurizer(nn.Module):
    """Base class of the featurizers: an ``nn.Module`` mapping (B, *input_shape) to
    (B, n_outputs) features (DomainBed's ``networks.Featurizer`` interface, Gulrajani &
    Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021), extended with
    named stages.

    It adds no parameters, buffers or behaviour; it declares the attributes that
    subclasses set (as class attributes or in ``__init__``) so that they are typed
    rather than resolved through ``nn.Module.__getattr__``.

    Attributes:
        n_outputs: number of output features.
        stage_names: the named intermediate outputs, in network order.
        stage_channels: stage name -> channels (conv maps) or features (flat outputs).
    """

    n_outputs: int
    stage_names: tuple[str, ...]
    stage_channels: dict[str, int]

    def forward(self, x: torch.Tensor, stage_fn: StageFn = None) -> torch.Tensor:
        """(B, *input_shape) -> (B, n_outputs); calls ``stage_fn(name, output)`` on each
        stage in ``stage_names`` order and continues with what it returns.

        Raises:
            NotImplementedError: always; subclasses implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, stage_fn=None)")
