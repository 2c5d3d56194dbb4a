"""Empirical risk minimisation (Vapnik 1998), the Deep-All / Aggregate baseline."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from .base import Algorithm, Minibatches


class ERM(Algorithm):
    """ERM as in DomainBed: concatenate the per-domain minibatches, mean cross-entropy,
    one Adam step (DomainBed's ``ERM``).

    Attributes:
        featurizer: (B, *input_shape) -> (B, n_outputs) features.
        classifier: features -> (B, num_classes) logits.
        network: ``nn.Sequential(featurizer, classifier)``.
        optimizer: Adam with ``lr`` and ``weight_decay`` from the hparams.

    Trains under ``--amp fp16`` (its step goes through :meth:`backward_step`).
    """

    supports_fp16 = True

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        self.classifier = models.classifier(
            self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"]
        )
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = self.make_optimizer(self.network.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """DomainBed's optimizer: Adam(lr, weight_decay) from the hparams."""
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(all_x), all_y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_step(loss, self.optimizer)
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)
