"""Adaptive risk minimisation: ARM-CML, a context network that adapts the model to each
batch's domain (Zhang, Marklund, Dhawan, Gupta, Levine, Finn, "Adaptive Risk
Minimization: Learning to Adapt to Domain Shift", NeurIPS 2021).

Definition, hyperparameters and networks follow DomainBed (``domainbed/algorithms.py``
``ARM``, ``domainbed/networks.py`` ``ContextNet``, ``domainbed/hparams_registry.py``;
Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DomainGradError
from ..hparams import AT_LEAST_ONE, HParam
from .base import Minibatches
from .erm import ERM


class ContextNet(nn.Module):
    """DomainBed's ``networks.ContextNet``: three 5x5 convolutions with padding 2
    (C -> 64 -> 64 -> 1), the first two followed by BatchNorm2d(64) and ReLU.

    Input (B, C, H, W); output (B, 1, H, W), one context channel per example.

    Attributes:
        context_net: the ``nn.Sequential`` (DomainBed's name, so that parameter names
            are ``context_net.0.weight`` ... ``context_net.6.bias`` on both sides).
    """

    def __init__(self, input_shape: tuple[int, ...]):
        super().__init__()
        channels = input_shape[0]
        self.context_net = nn.Sequential(
            nn.Conv2d(channels, 64, 5, padding=2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 5, padding=2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 1, 5, padding=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context_net(x)


def context_groups(batch_size: int, support_size: int) -> list[int]:
    """DomainBed's test-time split of a batch of ``batch_size`` examples into contexts:
    groups of ``support_size`` when it divides ``batch_size``, else one group of all.

    Returns:
        The group sizes, in order (they sum to ``batch_size``).
    """
    if batch_size % support_size == 0:
        return [support_size] * (batch_size // support_size)
    return [batch_size]


class ARM(ERM):
    """Adaptive Risk Minimization with a contextual meta-learner, ARM-CML (Zhang, Marklund,
    Dhawan, Gupta, Levine, Finn, "Adaptive Risk Minimization: Learning to Adapt to Domain
    Shift", NeurIPS 2021), DomainBed's version.

    A :class:`ContextNet` maps each example x (C, H, W) to one channel (1, H, W); the
    context of a group of examples is the mean of their channels; each example is
    classified as ``network([x, context])`` (C + 1 input channels; the featurizer's
    first layer is built for C + 1 channels, a ResNet's by cycling its RGB filters).

    * In ``update`` each domain's minibatch is one group (DomainBed groups the
      concatenated batch by ``batch_size``, i.e. by domain, since every training batch
      has ``batch_size`` examples). The context network runs once on the concatenated
      batch (its BatchNorm statistics are those of all domains, as in DomainBed), then
      loss = mean cross-entropy over all examples and one Adam step.
    * In ``predict(x)`` the batch is the context: DomainBed's :func:`context_groups`
      (groups of ``batch_size`` when that divides the batch, else the whole batch).
      Every batch given to ``predict`` must therefore hold examples of one domain. This
      holds in training runs: :func:`domaingrad.run.evaluation.accuracy` evaluates each
      environment's split on its own, in consecutive batches, so no context mixes
      domains. Those batches have :attr:`eval_batch_size` = 64 examples (the last one
      fewer) under ``--eval-batch-size auto``, DomainBed's evaluation batches, so the
      test-time contexts are DomainBed's: groups of ``batch_size`` when that divides the
      batch, else the whole batch. Another ``--eval-batch-size`` changes the contexts
      (larger ones whenever ``batch_size`` does not divide it) and so the accuracies.

    ``arm_train_context`` selects what the Adam step trains:

    * True (default, the paper's rule: the context network is meta-trained with the
      model): Adam over the network's then the context network's parameters.
    * False (DomainBed's code, the variant behind its ARM numbers): DomainBed builds the
      Adam of ``ERM.__init__`` before the context network exists, so the context network
      keeps its random initial weights (its BatchNorm running statistics still follow
      the training batches).

    Hyperparameters: none of DomainBed's own; the support size is the common
    ``batch_size``, which DomainBed fixes at 8 (search: 8) for ARM on the large-image
    datasets (:meth:`common_overrides`; 64, int(2**U(3, 9)) on small images as for every
    algorithm). ``arm_train_context`` is domaingrad's, not searched.

    Attributes (DomainBed's names): ``featurizer`` (C + 1 input channels),
    ``classifier``, ``network``, ``context_net`` (:class:`ContextNet` on C channels),
    ``optimizer``, ``support_size``.

    Raises:
        DomainGradError: for inputs that are not images (C, H, W).
    """

    #: evaluation batch of ``--eval-batch-size auto``: DomainBed's 64, since the batch is the context
    eval_batch_size = 64

    @classmethod
    def common_overrides(cls, small_images: bool, dataset: str | None = None) -> list[HParam]:
        """DomainBed's ARM value of a common hyperparameter: ``batch_size`` 8, search 8,
        on large images; none on small images."""
        if small_images:
            return []
        return [
            HParam(
                "batch_size",
                8,
                lambda r: 8,
                "examples per domain per step, also ARM's context size (DomainBed's ARM: 8, search 8)",
                bounds=AT_LEAST_ONE,
            )
        ]

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "arm_train_context",
                True,
                lambda r: True,
                "train the context network with the model (the paper); false: DomainBed's code, "
                "whose Adam never sees it",
            )
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        if len(input_shape) != 3:
            raise DomainGradError(
                f"ARM needs image inputs (C, H, W) for its context network, got input shape {tuple(input_shape)}"
            )
        super().__init__((input_shape[0] + 1, *input_shape[1:]), num_classes, num_domains, hparams)
        self.input_shape = tuple(input_shape)
        self.context_net = ContextNet(input_shape)
        self.support_size = int(self.hparams["batch_size"])
        if self.hparams["arm_train_context"]:
            self.optimizer = self.make_optimizer(list(self.network.parameters()) + list(self.context_net.parameters()))

    def contextualize(self, x: torch.Tensor, groups: list[int]) -> torch.Tensor:
        """x (B, C, H, W) with its context channel appended, (B, C + 1, H, W): the
        context net runs on all of x, then its output is averaged within each group of
        consecutive examples (sizes ``groups``, summing to B)."""
        context = self.context_net(x)
        sizes = torch.tensor(groups, device=x.device)
        means = torch.stack([part.mean(0) for part in torch.split(context, groups)])
        return torch.cat([x, torch.repeat_interleave(means, sizes, dim=0)], dim=1)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        logits = self.network(self.contextualize(all_x, [len(x) for x, _ in minibatches]))
        loss = F.cross_entropy(logits, all_y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of a batch x (B, C, H, W) of one domain, the batch
        grouped into contexts by :func:`context_groups`."""
        return self.network(self.contextualize(x, context_groups(len(x), self.support_size)))
