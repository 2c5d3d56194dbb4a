"""Fishr: invariant gradient variances across training domains."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DomainGradError
from ..gradients.per_sample import linear_cross_entropy_per_sample_gradients, per_sample_gradients
from ..hparams import HParam
from .base import Minibatches
from .erm import ERM


class Fishr(ERM):
    """Fishr (Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for
    Out-of-Distribution Generalization", ICML 2022), as DomainBed runs it.

    Every step: one forward pass of all training domains' minibatches concatenated;
    per-sample gradients, with respect to the classifier's parameters only (weight and
    bias), of each sample's own cross-entropy (reduction none, so not divided by the
    batch size); for each domain d the centred variance over its samples,
    ``var_d = mean_i (g_i - mean_i g_i)^2`` (divided by n), one value per classifier
    coordinate. Then, with the default ``fishr_penalty`` "domainbed":

    * an exponential moving average per domain, ``v_d <- ema * v_d.detach() +
      (1 - ema) * var_d`` (state starting at zero), of which ``v_d / (1 - ema)`` is used;
    * ``penalty = (1/D) * sum_d mean_over_coordinates((v_d - mean_d' v_d')^2)``;
    * ``loss = mean cross-entropy + w * penalty`` with ``w = 0`` for the first
      ``penalty_anneal_iters`` updates (the penalty and the EMA are still computed) and
      ``w = lambda`` from then on; Adam is re-created, once, at update number
      ``penalty_anneal_iters`` if that is not 0 (as in IRM / V-REx, because of the jump
      in gradient magnitude).

    ``fishr_penalty`` "irm_setup" is the normalisation of the Fishr repository's
    Colored MNIST experiments (the IRM paper's protocol): ``penalty = sum_d
    sum_over_coordinates((var_d - mean_d' var_d')^2)``, with no EMA (the ``ema``
    hyperparameter and the EMA state are then unused). It is ``D * K`` times the
    "domainbed" penalty computed with ``ema = 0`` (K = number of classifier
    coordinates, e.g. 128*C + C for MNIST_CNN), so the two options need very different
    ``lambda`` values (the repository uses 91257.186 with its own MLP and binary
    cross-entropy; only the penalty's normalisation is reproduced here, not that
    protocol's network, weight decay or loss rescaling).

    Per-sample gradients: for DomainBed's linear classifier (``nn.Linear``), the exact
    closed form ``(softmax - onehot) outer features``
    (:func:`~domaingrad.gradients.per_sample.linear_cross_entropy_per_sample_gradients`),
    which is what BackPACK computes for the authors; otherwise
    (``nonlinear_classifier``) :func:`~domaingrad.gradients.per_sample.per_sample_gradients`
    (``torch.func``). Either way the penalty backpropagates into the featurizer.

    Attributes (besides ERM's):
        update_count: buffer, number of updates done.
        ema_variances: buffer of shape (num_domains, K), the EMA state ``v_d`` (before
            the ``1/(1 - ema)`` correction), in the order of the classifier's
            ``named_parameters()``, each flattened. Being buffers, both are saved by
            :meth:`training_state`, so resuming continues exactly.
    """

    PENALTIES = ("domainbed", "irm_setup")
    update_count: torch.Tensor  # buffers, registered in __init__
    ema_variances: torch.Tensor

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "lambda",
                1000.0,
                lambda r: float(10 ** r.uniform(1.0, 4.0)),
                "penalty weight from the anneal step on (DomainBed: 1000, search 10**U(1,4))",
            ),
            HParam(
                "penalty_anneal_iters",
                1500,
                lambda r: int(r.uniform(0.0, 5000.0)),
                "updates with penalty weight 0; Adam is re-created at this step (DomainBed: "
                "1500, search int(U(0,5000)))",
            ),
            HParam(
                "ema",
                0.95,
                lambda r: float(r.uniform(0.90, 0.99)),
                "moving-average rate of the per-domain gradient variances (DomainBed: 0.95, search U(0.90,0.99))",
            ),
            HParam(
                "fishr_penalty",
                "domainbed",
                lambda r: "domainbed",
                "'domainbed': EMA, mean over domains and coordinates; 'irm_setup': the Fishr "
                "repository's Colored MNIST sum over domains and coordinates, no EMA "
                "(needs a different lambda)",
                choices=cls.PENALTIES,
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["fishr_penalty"] not in self.PENALTIES:
            raise DomainGradError(
                f"hyperparameter 'fishr_penalty' must be one of {list(self.PENALTIES)}, "
                f"got {self.hparams['fishr_penalty']!r}"
            )
        if not 0.0 <= self.hparams["ema"] < 1.0:
            raise DomainGradError(
                f"hyperparameter 'ema' must be in [0, 1) (the value used is divided by "
                f"1 - ema), got {self.hparams['ema']!r}"
            )
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.fishr_param_names = [n for n, p in self.classifier.named_parameters() if p.requires_grad]
        if not self.fishr_param_names:
            raise ValueError("Fishr needs a classifier with trainable parameters")
        named = dict(self.classifier.named_parameters())
        num_coordinates = sum(named[n].numel() for n in self.fishr_param_names)
        self.register_buffer("ema_variances", torch.zeros(num_domains, num_coordinates))

    # -- per-sample gradients ----------------------------------------------------------
    def per_sample_classifier_gradients(
        self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample gradients of each sample's cross-entropy with respect to the
        classifier's trainable parameters, flattened and concatenated in
        ``named_parameters()`` order: shape (N, K), differentiable (create_graph).

        Args:
            features: (N, F) featurizer output; logits: (N, C) = classifier(features);
            targets: (N,) class indices.
        """
        clf = self.classifier
        if isinstance(clf, nn.Linear) and clf.weight.requires_grad and (clf.bias is None or clf.bias.requires_grad):
            grad_weight, grad_bias = linear_cross_entropy_per_sample_gradients(
                features, logits, targets, has_bias=clf.bias is not None
            )
            parts = [grad_weight.flatten(1)] + ([grad_bias] if grad_bias is not None else [])
            return torch.cat(parts, dim=1)
        grads = per_sample_gradients(
            clf,
            features,
            targets,
            lambda out, y: F.cross_entropy(out, y),
            params=self.fishr_param_names,
            create_graph=True,
        )
        return torch.cat([grads[n].flatten(1) for n in self.fishr_param_names], dim=1)

    # -- penalty -----------------------------------------------------------------------
    def fishr_penalty(
        self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, domain_sizes: Sequence[int]
    ) -> torch.Tensor:
        """The Fishr penalty (scalar, differentiable) of one concatenated batch.

        Args:
            features: (N, F); logits: (N, C); targets: (N,); ``domain_sizes``: the
                number of samples of each domain, in order, summing to N.

        With ``fishr_penalty`` "domainbed" this updates the EMA state
        (``ema_variances``) as a side effect, exactly once per call.
        """
        if len(domain_sizes) != self.num_domains or sum(domain_sizes) != targets.shape[0]:
            raise ValueError(
                f"domain_sizes {list(domain_sizes)} must give one size per training domain "
                f"({self.num_domains}) summing to the batch size {targets.shape[0]}"
            )
        grads = self.per_sample_classifier_gradients(features, logits, targets)
        variances = torch.stack(
            [(g - g.mean(dim=0, keepdim=True)).pow(2).mean(dim=0) for g in grads.split(list(domain_sizes))]
        )  # (D, K)
        if self.hparams["fishr_penalty"] == "irm_setup":
            return (variances - variances.mean(dim=0, keepdim=True)).pow(2).sum()
        ema = self.hparams["ema"]
        state = ema * self.ema_variances.to(variances.dtype) + (1.0 - ema) * variances
        self.ema_variances.copy_(state.detach())
        used = state / (1.0 - ema)
        return (used - used.mean(dim=0, keepdim=True)).pow(2).mean(dim=1).mean(dim=0)

    def penalty_weight(self) -> float:
        """The weight w of the penalty for the next update: 0 before
        ``penalty_anneal_iters`` updates, ``lambda`` from then on."""
        if int(self.update_count) >= self.hparams["penalty_anneal_iters"]:
            return float(self.hparams["lambda"])
        return 0.0

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        if len(minibatches) != self.num_domains:
            raise ValueError(
                f"Fishr.update needs one minibatch per training domain ({self.num_domains}), got {len(minibatches)}"
            )
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        sizes = [int(x.shape[0]) for x, _ in minibatches]

        all_z = self.featurizer(all_x)
        all_logits = self.classifier(all_z)
        penalty = self.fishr_penalty(all_z, all_logits, all_y, sizes)
        nll = F.cross_entropy(all_logits, all_y)

        weight = self.penalty_weight()
        anneal = self.hparams["penalty_anneal_iters"]
        if anneal != 0 and int(self.update_count) == anneal:
            # re-create Adam (DomainBed, as IRM and V-REx): the gradient magnitude jumps
            self.optimizer = self.make_optimizer(self.network.parameters())
        self.update_count += 1

        objective = nll + weight * penalty
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.item(), "nll": nll.item(), "penalty": penalty.item()}
