"""Marginal transfer learning: MTL, DomainBed's neural version of Blanchard, Deshmukh,
Dogan, Lee and Scott, "Domain Generalization by Marginal Transfer Learning", JMLR 22,
2021 (arXiv:1711.07910).

Definition, hyperparameter name, default and random-search distribution follow
DomainBed (``domainbed/algorithms.py`` ``MTL``, ``domainbed/hparams_registry.py``;
Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import models
from ..errors import DomainGradError
from ..hparams import Bounds, HParam
from .base import Algorithm, Minibatches

#: ``mtl_embedding`` values: the paper's marginal embedding, or DomainBed's code
MTL_EMBEDDINGS = ("mean", "domainbed")


class MTL(Algorithm):
    """Marginal Transfer Learning (Blanchard, Deshmukh, Dogan, Lee, Scott, "Domain
    Generalization by Marginal Transfer Learning", JMLR 22, 2021): the classifier sees
    each example's features next to an embedding of its domain's marginal distribution
    (the paper's kernel on pairs (P_X, x), with the kernel mean embedding of P_X replaced,
    as in DomainBed, by the mean of the learned features).

    For a batch x (B, *input_shape) of one domain with features f (B, F): the embedding
    e = mean_i f_i (F,); in training, for domain d, e = ``mtl_ema`` * e + (1 - ``mtl_ema``)
    * E_d, and the buffer ``embeddings`` (D, F) row d becomes e (detached). Note that the
    weight ``mtl_ema`` multiplies the *current* batch mean (DomainBed's convention), so
    ``mtl_ema`` 1 uses the batch mean alone. Logits = classifier([f_i, e]) on (B, 2F).
    Loss = the *sum* over domains of each domain's mean cross-entropy (DomainBed), one
    Adam step on featurizer and classifier. At test time (``predict(x)``, no domain) e
    is the mean features of the batch itself, so every batch given to ``predict`` must
    come from one domain: :func:`domaingrad.run.evaluation.accuracy` evaluates each
    environment's split on its own, in consecutive batches, of :attr:`eval_batch_size`
    = 64 examples under ``--eval-batch-size auto`` (DomainBed's evaluation batches, so
    the test-time embeddings are DomainBed's; another size changes them).

    ``mtl_embedding`` selects the embedding the classifier receives:

    * ``"mean"`` (default, the paper's rule): e as above; its gradient reaches the
      featurizer through the batch mean.
    * ``"domainbed"``: DomainBed's code, which calls ``.normal_()`` on the repeated
      embedding, so that the classifier receives N(0, 1) noise (B, F) in place of e,
      in training and at test time (DomainBed issue #159); the noise is drawn from the
      global torch generator on the embedding's device, as DomainBed does, and the
      ``embeddings`` buffer is still updated. This is the variant behind DomainBed's
      MTL numbers.

    Hyperparameters (DomainBed ``hparams_registry``): ``mtl_ema`` 0.99, search choice
    [0.5, 0.9, 0.99, 1]; ``mtl_embedding`` (domaingrad's) "mean", not searched.

    Attributes (DomainBed's names, so weights map one to one): ``featurizer``,
    ``classifier`` (Linear(2F, num_classes), or DomainBed's MLP with
    ``nonlinear_classifier``), ``optimizer`` (Adam over featurizer then classifier
    parameters, ``lr``, ``weight_decay``), buffer ``embeddings`` (D, F).
    """

    embeddings: torch.Tensor  # (D, F) buffer, registered in __init__
    #: evaluation batch of ``--eval-batch-size auto``: DomainBed's 64, since the batch mean is the embedding
    eval_batch_size = 64

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "mtl_ema",
                0.99,
                lambda r: float(r.choice([0.5, 0.9, 0.99, 1.0])),
                "weight of the current batch mean in the domain embedding (DomainBed: 0.99, "
                "choice [0.5, 0.9, 0.99, 1])",
                bounds=Bounds(0.0, 1.0),
            ),
            HParam(
                "mtl_embedding",
                "mean",
                lambda r: "mean",
                "mean: the classifier sees the domain's mean features (the paper); domainbed: "
                "DomainBed's code, which replaces them by N(0, 1) noise",
                choices=MTL_EMBEDDINGS,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["mtl_embedding"] not in MTL_EMBEDDINGS:
            raise DomainGradError(
                f"mtl_embedding must be one of {list(MTL_EMBEDDINGS)}, got {self.hparams['mtl_embedding']!r}"
            )
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        n_features = self.featurizer.n_outputs
        self.classifier = models.classifier(2 * n_features, num_classes, self.hparams["nonlinear_classifier"])
        self.optimizer = torch.optim.Adam(
            list(self.featurizer.parameters()) + list(self.classifier.parameters()),
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
        )
        self.register_buffer("embeddings", torch.zeros(num_domains, n_features))

    def domain_embedding(self, features: torch.Tensor, env: int | None = None) -> torch.Tensor:
        """The (F,) embedding of a batch's domain from its features (B, F): the batch mean,
        and for a training domain ``env`` its EMA with the stored row, which is then
        replaced by the result (detached)."""
        embedding = features.mean(0)
        if env is not None:
            ema = self.hparams["mtl_ema"]
            embedding = ema * embedding + (1 - ema) * self.embeddings[env]
            self.embeddings[env] = embedding.detach()
        return embedding

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        losses = [F.cross_entropy(self.predict(x, env), y) for env, (x, y) in enumerate(minibatches)]
        loss = losses[0]
        for value in losses[1:]:
            loss = loss + value
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor, env: int | None = None) -> torch.Tensor:
        """Logits (B, num_classes) for a batch x (B, *input_shape) of one domain: training
        domain ``env`` (its embedding is updated), or None (the batch's own mean)."""
        features = self.featurizer(x)
        embedding = self.domain_embedding(features, env).view(1, -1).repeat(len(features), 1)
        if self.hparams["mtl_embedding"] == "domainbed":
            embedding = torch.empty_like(embedding).normal_()
        return self.classifier(torch.cat((features, embedding), 1))
