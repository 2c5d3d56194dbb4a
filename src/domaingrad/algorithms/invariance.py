"""Invariance penalties on top of ERM: IRM, V-REx and Spectral Decoupling.

Definitions, hyperparameter names, defaults and random-search distributions follow
DomainBed (``domainbed/algorithms.py`` and ``domainbed/hparams_registry.py``,
Gulrajani & Lopez-Paz, ICLR 2021).

Like DomainBed, IRM and V-REx forward all domains in one concatenated batch and slice
the logits per domain (the MNIST featurizer uses GroupNorm, so this equals per-domain
forwards), and both *re-create* Adam at the anneal step, because the penalty weight
jumps there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import autograd

from ..hparams import HParam
from .base import Minibatches
from .erm import ERM


def _split_logits(logits: torch.Tensor, minibatches: Minibatches) -> list[torch.Tensor]:
    """Slice (sum_d B_d, C) logits of the concatenated batch back into per-domain
    (B_d, C) blocks, in minibatch order."""
    return list(torch.split(logits, [x.shape[0] for x, _ in minibatches]))


class _AnnealedPenalty(ERM):
    """ERM plus a penalty whose weight is 1.0 for the first ``anneal_iters`` updates and
    ``lambda`` afterwards; Adam is re-created at update ``anneal_iters`` (DomainBed's
    IRM and VREx). ``update_count`` is a buffer, so it is saved with the model."""

    #: names of the (weight, anneal iterations) hyperparameters, set by subclasses
    _lambda_name: str
    _anneal_name: str
    update_count: torch.Tensor  # () long buffer, registered in __init__

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))

    def penalty_weight(self) -> float:
        """1.0 before the anneal step, the penalty weight from it on (DomainBed)."""
        if int(self.update_count) >= self.hparams[self._anneal_name]:
            return float(self.hparams[self._lambda_name])
        return 1.0

    def step(self, loss: torch.Tensor) -> None:
        """Re-create Adam at the anneal step (DomainBed: "Adam doesn't like the sharp
        jump in gradient magnitudes"), then one step on ``loss``; counts the update."""
        if int(self.update_count) == self.hparams[self._anneal_name]:
            self.optimizer = self.make_optimizer(self.network.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1


class IRM(_AnnealedPenalty):
    """Invariant Risk Minimization, IRMv1 (Arjovsky et al. 2019, arXiv:1907.02893), as in
    DomainBed.

    Loss = mean_d CE_d + w * mean_d P_d, with P_d the unbiased estimate of the squared
    gradient of the domain risk wrt a dummy classifier scale s = 1: the product of
    d CE(logits[::2] * s)/ds and d CE(logits[1::2] * s)/ds (``create_graph`` so the
    penalty is differentiated). w = 1.0 for the first ``irm_penalty_anneal_iters``
    updates, then ``irm_lambda``; Adam is re-created at the anneal step.

    Hyperparameters (DomainBed ``hparams_registry``): ``irm_lambda`` 1e2, search
    10**U(-1, 5); ``irm_penalty_anneal_iters`` 500, search int(10**U(0, 4)).
    """

    _lambda_name = "irm_lambda"
    _anneal_name = "irm_penalty_anneal_iters"

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "irm_lambda",
                1e2,
                lambda r: float(10 ** r.uniform(-1, 5)),
                "IRM penalty weight after annealing (DomainBed: 1e2, 10**U(-1,5))",
            ),
            HParam(
                "irm_penalty_anneal_iters",
                500,
                lambda r: int(10 ** r.uniform(0, 4)),
                "updates with penalty weight 1.0 before irm_lambda (DomainBed: 500, int(10**U(0,4)))",
            ),
        ]

    @staticmethod
    def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """IRMv1 penalty of one domain (DomainBed ``IRM._irm_penalty``).

        Args:
            logits: (B, C) logits of the domain's batch.
            y: (B,) int64 labels.

        Returns:
            Scalar: grad_s CE(logits[::2] * s) * grad_s CE(logits[1::2] * s) at s = 1,
            differentiable wrt ``logits``.
        """
        scale = torch.tensor(1.0, device=logits.device, dtype=logits.dtype, requires_grad=True)
        loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
        loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
        grad_1 = autograd.grad(loss_1, [scale], create_graph=True)[0]
        grad_2 = autograd.grad(loss_2, [scale], create_graph=True)[0]
        return torch.sum(grad_1 * grad_2)

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        weight = self.penalty_weight()
        all_logits = self.network(torch.cat([x for x, _ in minibatches]))
        nll = all_logits.new_zeros(())
        penalty = all_logits.new_zeros(())
        for logits, (_, y) in zip(_split_logits(all_logits, minibatches), minibatches):
            nll = nll + F.cross_entropy(logits, y)
            penalty = penalty + self.irm_penalty(logits, y)
        nll = nll / len(minibatches)
        penalty = penalty / len(minibatches)
        loss = nll + weight * penalty
        self.step(loss)
        return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


class VREx(_AnnealedPenalty):
    """Variance Risk Extrapolation, V-REx (Krueger et al. ICML 2021, arXiv:2003.00688),
    as in DomainBed.

    With L_d the mean cross-entropy of domain d (a (D,) vector): loss = mean(L) +
    w * mean((L - mean(L))**2) (the biased variance over domains). w = 1.0 for the
    first ``vrex_penalty_anneal_iters`` updates, then ``vrex_lambda``; Adam is
    re-created at the anneal step.

    Hyperparameters (DomainBed ``hparams_registry``): ``vrex_lambda`` 1e1, search
    10**U(-1, 5); ``vrex_penalty_anneal_iters`` 500, search int(10**U(0, 4)).

    Deviation: DomainBed logs as ``nll`` the *last* domain's loss (a leftover loop
    variable); here ``nll`` is mean(L). The optimised loss is unchanged.
    """

    _lambda_name = "vrex_lambda"
    _anneal_name = "vrex_penalty_anneal_iters"

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "vrex_lambda",
                1e1,
                lambda r: float(10 ** r.uniform(-1, 5)),
                "V-REx variance weight after annealing (DomainBed: 1e1, 10**U(-1,5))",
            ),
            HParam(
                "vrex_penalty_anneal_iters",
                500,
                lambda r: int(10 ** r.uniform(0, 4)),
                "updates with penalty weight 1.0 before vrex_lambda (DomainBed: 500, int(10**U(0,4)))",
            ),
        ]

    @staticmethod
    def vrex_objective(losses: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, mean, penalty) for the (D,) vector of domain losses: mean + weight *
        biased variance."""
        mean = losses.mean()
        penalty = ((losses - mean) ** 2).mean()
        return mean + weight * penalty, mean, penalty

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        weight = self.penalty_weight()
        all_logits = self.network(torch.cat([x for x, _ in minibatches]))
        losses = torch.stack(
            [F.cross_entropy(logits, y) for logits, (_, y) in zip(_split_logits(all_logits, minibatches), minibatches)]
        )
        loss, mean, penalty = self.vrex_objective(losses, weight)
        self.step(loss)
        return {"loss": loss.item(), "nll": mean.item(), "penalty": penalty.item()}


class SD(ERM):
    """Spectral Decoupling (Pezeshki et al. NeurIPS 2021, "Gradient Starvation",
    arXiv:2011.09468), as in DomainBed.

    On the concatenated batch with logits (B, C): loss = CE + ``sd_reg`` *
    mean(logits**2) (the L2 penalty on the logits, averaged over all entries).

    Hyperparameters (DomainBed ``hparams_registry``): ``sd_reg`` 0.1, search
    10**U(-5, -1).
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            HParam(
                "sd_reg",
                0.1,
                lambda r: float(10 ** r.uniform(-5, -1)),
                "weight of mean(logits**2) (DomainBed: 0.1, 10**U(-5,-1))",
            )
        ]

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        all_x = torch.cat([x for x, _ in minibatches])
        all_y = torch.cat([y for _, y in minibatches])
        logits = self.predict(all_x)
        loss = F.cross_entropy(logits, all_y)
        penalty = (logits**2).mean()
        objective = loss + self.hparams["sd_reg"] * penalty
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}
