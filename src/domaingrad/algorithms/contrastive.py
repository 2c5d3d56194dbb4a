"""Contrastive regularisers on top of ERM: SelfReg, CAD and CondCAD.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` ``SelfReg``, ``AbstractCAD``, ``CAD``,
``CondCAD``; ``domainbed/hparams_registry.py``; Gulrajani & Lopez-Paz, ICLR 2021).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..hparams import NON_NEGATIVE, POSITIVE, HParam
from .base import Algorithm, Minibatches, concat_minibatches
from .erm import ERM


class SelfReg(ERM):
    """Self-supervised contrastive regularisation (Kim, Yoo, Park, Kim, Lee,
    "SelfReg: Self-supervised Contrastive Regularization for Domain Generalization",
    ICCV 2021), DomainBed's ``SelfReg``.

    The concatenated batch is sorted by label (``torch.sort``); z = featurizer(x)
    (B, F), p = cdpl(z) (B, F) with the projection ``cdpl`` (Linear-BN-ReLU,
    Linear-BN-ReLU, Linear-BN; hidden width F if F = 2048, else 2F), o = classifier(z).
    Within each run of equal labels two random permutations pi_1, pi_2 pair every
    example with others of its class; lam ~ Beta(0.5, 0.5);
    o2 = o[pi_1], p2 = p[pi_1], o3 = lam o2 + (1 - lam) o[pi_2], p3 = lam p2 + (1 - lam) p[pi_2].
    With MSE the mean squared error and c = min(CE(o, y), 1) (a constant):
    loss = CE + c * (lam (MSE(o, o2) + 0.3 MSE(z, p2)) + (1 - lam) (MSE(o, o3) + 0.3 MSE(z, p3))).
    Logged: ``loss`` (DomainBed's key).

    Deviations:

    * Kept from DomainBed (differs from the paper, whose projection is trained): the
      optimizer is ERM's Adam over the network only, so ``cdpl``'s weights never move
      (its BatchNorm running statistics do); the feature terms compare z with the
      *projected* p of the partner, as DomainBed writes them.
    * Randomness: lam and the permutations come from ``self.generator`` (a
      ``torch.Generator`` seeded from the global torch RNG at construction, saved by
      ``training_state``) through :meth:`draw_lambda` and :meth:`permutation`; DomainBed
      uses numpy's global ``np.random.beta`` and torch's global ``torch.randperm``.
      For a parity run replace those two methods by ``np.random.beta(0.5, 0.5)`` and
      ``torch.randperm(n)``: the call order is DomainBed's (lam first, then pi_1, pi_2
      per label run in increasing label order).

    Parity: ``featurizer``, ``classifier``, ``network``, ``cdpl``, ``optimizer`` as in
    DomainBed.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        width = self.featurizer.n_outputs
        hidden = width if width == 2048 else 2 * width
        #: DomainBed's class-discriminative projection (not in the optimizer, as there)
        self.cdpl = nn.Sequential(
            nn.Linear(width, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, width),
            nn.BatchNorm1d(width),
        )
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))

    def draw_lambda(self) -> float:
        """lam ~ Beta(0.5, 0.5), deterministic given ``self.generator``."""
        seed = int(torch.randint(2**31, (1,), generator=self.generator))
        return float(np.random.RandomState(seed).beta(0.5, 0.5))

    def permutation(self, n: int) -> torch.Tensor:
        """A random permutation of range(n) (CPU int64), from ``self.generator``."""
        return torch.randperm(n, generator=self.generator)

    def partner_indices(self, sorted_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two index vectors (B,) that permute positions within each run of equal labels
        of the sorted (B,) labels (pi_1 and pi_2, drawn per run in order)."""
        _, counts = torch.unique_consecutive(sorted_y, return_counts=True)
        first, second, start = [], [], 0
        for count in counts.tolist():
            first.append(self.permutation(count) + start)
            second.append(self.permutation(count) + start)
            start += count
        return torch.cat(first).to(sorted_y.device), torch.cat(second).to(sorted_y.device)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x, all_y = concat_minibatches(minibatches)
        lam = self.draw_lambda()
        all_y, order = torch.sort(all_y)
        all_x = all_x[order]
        pi_1, pi_2 = self.partner_indices(all_y)

        feat = self.featurizer(all_x)
        proj = self.cdpl(feat)
        output = self.classifier(feat)
        output_2, proj_2 = output[pi_1], proj[pi_1]
        output_3 = lam * output_2 + (1 - lam) * output[pi_2]
        proj_3 = lam * proj_2 + (1 - lam) * proj[pi_2]

        ind = F.mse_loss(output, output_2) + 0.3 * F.mse_loss(feat, proj_2)
        hdl = F.mse_loss(output, output_3) + 0.3 * F.mse_loss(feat, proj_3)
        cl_loss = F.cross_entropy(output, all_y)
        scale = min(cl_loss.item(), 1.0)
        loss = cl_loss + scale * (lam * ind + (1 - lam) * hdl)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}


def _masked_logsumexp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{j: mask_ij} exp(values_ij) of (N, M) values; -inf for an empty row."""
    return torch.logsumexp(values.masked_fill(~mask, float("-inf")), dim=1)


def _finite_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries of a 1-D tensor; 0 when there are none (DomainBed)."""
    finite = torch.isfinite(values)
    if not bool(finite.any()):
        return values.new_zeros(())
    return torch.where(finite, values, torch.zeros_like(values)).sum() / finite.sum()


class _AbstractCAD(Algorithm):
    """DomainBed's ``AbstractCAD``: loss = CE(classifier(z), y) + ``lmbda`` *
    :meth:`bn_loss` (z, y, d) on the concatenated batch, one Adam(``lr``,
    ``weight_decay``) step over the featurizer, the classifier and (with
    ``is_project``) the projection head. Like DomainBed's it has ``featurizer``,
    ``classifier`` and ``optimizer`` and no ``network``."""

    #: True for CondCAD (the bottleneck conditioned on the label)
    is_conditional = False
    #: SupCon's base temperature (DomainBed's ``base_temperature``)
    base_temperature = 0.07

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "lmbda",
                1e-1,
                lambda r: float(r.choice([1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2])),
                "weight of the bottleneck loss (DomainBed: 0.1, choice [1e-4,1e-3,1e-2,0.1,1,10,100])",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "temperature",
                0.1,
                lambda r: float(r.choice([0.05, 0.1])),
                "contrastive temperature (DomainBed: 0.1, choice [0.05,0.1])",
                bounds=POSITIVE,
            ),
            HParam(
                "is_normalized",
                False,
                lambda r: False,
                "L2-normalise the representation in the bottleneck loss (DomainBed: False)",
            ),
            HParam(
                "is_project",
                False,
                lambda r: False,
                "apply a projection head F -> F -> 128 before the bottleneck loss (DomainBed: False)",
            ),
            HParam(
                "is_flipped",
                True,
                lambda r: True,
                "minimise -log(1 - p) instead of maximising log p (DomainBed: True, 'more stable')",
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = models.featurizer_for(input_shape, self.hparams)
        self.classifier = models.classifier(
            self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"]
        )
        params = list(self.featurizer.parameters()) + list(self.classifier.parameters())
        if self.hparams["is_project"]:
            width = self.featurizer.n_outputs
            self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 128))
            params += list(self.project.parameters())
        self.optimizer = torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def bn_loss(self, z: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The contrastive domain-bottleneck loss (a SupCon variant; Khosla et al.,
        "Supervised Contrastive Learning", NeurIPS 2020), DomainBed's ``bn_loss``.

        With s_ij = z_i . z_j / T for j != i and s_ii = 0, minus the row maximum
        (detached), and c = T / 0.07:

        * CAD (unconditional), over rows with another example of the same label:
          log p_ij = s_ij - log sum_{k != i} exp s_ik; flipped (default):
          -c log sum_{j: d_j != d_i} p_ij, else c log sum_{j: d_j = d_i} p_ij (j = i
          included, as DomainBed's mask).
        * CondCAD, over rows with a same-label example of another domain (flipped) or
          of the same domain (not flipped), j ranging over the same label only:
          log p_ij = s_ij - log sum_{k != i, y_k = y_i} exp s_ik; flipped:
          -c log sum_{j != i, y_j = y_i, d_j != d_i} p_ij, else
          c log sum_{j != i, y_j = y_i, d_j = d_i} p_ij.

        The result is the mean of the finite per-row values (0 if none).

        Args:
            z: (B, F) features; y: (B,) labels; d: (B,) domain indices.

        Returns:
            Scalar tensor.
        """
        same_y = y[:, None] == y[None, :]
        same_d = d[:, None] == d[None, :]
        not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        pos = same_y & not_self
        if self.hparams["is_project"]:
            z = self.project(z)
        if self.hparams["is_normalized"]:
            z = F.normalize(z, dim=1)
        temperature = self.hparams["temperature"]
        logits = (z @ z.T) / temperature * not_self.to(z.dtype)
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        scale = temperature / self.base_temperature
        flipped = self.hparams["is_flipped"]
        if not self.is_conditional:
            log_prob = logits - _masked_logsumexp(logits, not_self)[:, None]
            valid = pos.any(dim=1)
            log_prob, same_d = log_prob[valid], same_d[valid]
            if flipped:
                loss = -scale * _masked_logsumexp(log_prob, ~same_d)
            else:
                loss = scale * _masked_logsumexp(log_prob, same_d)
        else:
            target = pos & (~same_d if flipped else same_d)
            valid = target.any(dim=1)
            logits, pos, target = logits[valid], pos[valid], target[valid]
            log_prob = logits - _masked_logsumexp(logits, pos)[:, None]
            loss = (-scale if flipped else scale) * _masked_logsumexp(log_prob, target)
        return _finite_mean(loss)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x, all_y = concat_minibatches(minibatches)
        all_d = torch.cat(
            [torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device) for i, (x, _) in enumerate(minibatches)]
        )
        all_z = self.featurizer(all_x)
        bn_loss = self.bn_loss(all_z, all_y, all_d)
        clf_loss = F.cross_entropy(self.classifier(all_z), all_y)
        total_loss = clf_loss + self.hparams["lmbda"] * bn_loss
        self.optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        self.optimizer.step()
        return {"clf_loss": clf_loss.item(), "bn_loss": bn_loss.item(), "total_loss": total_loss.item()}


class CAD(_AbstractCAD):
    """Contrastive Adversarial Domain bottleneck (Ruan, Dubois, Maddison, "Optimal
    Representations for Covariate Shift", ICLR 2022), DomainBed's ``CAD``: minimises
    I(D; Z) with the unconditional contrastive bottleneck of :meth:`bn_loss` (needs
    domain labels, not task labels, in the bottleneck term).

    Hyperparameters (DomainBed ``hparams_registry``): ``lmbda`` 0.1, search choice
    [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100]; ``temperature`` 0.1, choice [0.05, 0.1];
    ``is_normalized`` False; ``is_project`` False; ``is_flipped`` True (fixed in the
    search). Logged: ``clf_loss``, ``bn_loss``, ``total_loss`` (DomainBed's keys).

    Deviations: DomainBed's ``is_project`` branch refers to an undefined
    ``feature_dim`` and fails; here the head is Linear(F, F)-ReLU-Linear(F, 128) with F
    the featurizer's width, trained with the rest. Empty rows of the masked
    log-sum-exps are -inf before they are dropped by the finite mean, as in DomainBed.
    Parity: ``featurizer``, ``classifier``, ``optimizer`` (and ``project``) as in
    DomainBed. No randomness.
    """


class CondCAD(_AbstractCAD):
    """Conditional Contrastive Adversarial Domain bottleneck (Ruan, Dubois, Maddison,
    "Optimal Representations for Covariate Shift", ICLR 2022), DomainBed's
    ``CondCAD``: minimises I(D; Z | Y) with the label-conditional contrastive
    bottleneck of :meth:`bn_loss` (needs domain and task labels).

    Hyperparameters, logged keys, deviations and parity: as :class:`CAD`.
    """

    is_conditional = True
