"""Gradient-surgery algorithms: one gradient per training domain, combined by a rule.

Each step computes the gradient of every training domain's mean loss, each domain's
batch forwarded and backpropagated separately (seed 002, Mansilla et al. ICCV 2021,
Sec. 3), combines them with a rule of :mod:`domaingrad.gradients.surgery`, writes the
result into ``.grad`` and takes one Adam step. The rule's statistics (agreement
fraction, conflicting pairs, modification frequency and ratio) are returned by
``update`` and so land in every results.jsonl record.

Hyperparameter defaults follow the papers; where a paper gives no search range the
random search keeps the paper's choice fixed (``lambda r: default``), so a sweep
explores the optimizer hyperparameters around the published rule.
"""
from __future__ import annotations

from typing import Any

import torch

from ..gradients.per_domain import per_domain_gradients
from ..gradients.surgery import SurgeryResult, agr_rand, agr_sum, and_mask, corgrad, pcgrad, sand_mask
from ..hparams import HParam
from .base import Minibatches
from .erm import ERM

_REDUCTION = HParam(
    "surgery_reduction", "sum", lambda r: "sum",
    "combine domain gradients by their sum (the papers) or mean (domaingrad's option)",
    choices=("sum", "mean"))


class GradientSurgery(ERM):
    """Base of the surgery methods: ERM's network and Adam, with a combined gradient.

    Subclasses implement :meth:`combine`. ``update_count`` (a buffer, so saved with the
    model) counts the updates, for rules with a schedule.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int,
                 hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.surgery_params = [p for p in self.network.parameters() if p.requires_grad]
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))

    def combine(self, grads: list[torch.Tensor]) -> SurgeryResult:
        """Combine per-domain gradients, each (D, *param.shape), into one per parameter."""
        raise NotImplementedError

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        per_domain = per_domain_gradients(self.network, minibatches, params=self.surgery_params)
        result = self.combine(per_domain.grads)
        for param, grad in zip(self.surgery_params, result.grads):
            param.grad = grad
        self.optimizer.step()
        self.update_count += 1
        return {"loss": float(per_domain.losses.mean()), **result.stats}


class AgrSum(GradientSurgery):
    """Agr-Sum (Mansilla et al. ICCV 2021, eq. 3): sum of the domain gradients on the
    components where all domains agree in sign, zero elsewhere."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [_REDUCTION, HParam("agreement_rule", "paper", lambda r: "paper",
                                   "'paper': all signs equal; 'official': an exact zero disagrees",
                                   choices=("paper", "official"))]

    def combine(self, grads):
        return agr_sum(grads, rule=self.hparams["agreement_rule"], reduction=self.hparams["surgery_reduction"])


class AgrRand(AgrSum):
    """Agr-Rand (Mansilla et al. ICCV 2021, eq. 4): Agr-Sum with Gaussian noise of scale
    mean |agreeing component| on the disagreeing components (guarded against NaN)."""

    def combine(self, grads):
        return agr_rand(grads, generator=self.generator, rule=self.hparams["agreement_rule"],
                        reduction=self.hparams["surgery_reduction"])


class PCGrad(GradientSurgery):
    """PCGrad, domain version (Yu et al. NeurIPS 2020; Mansilla et al. ICCV 2021, eq. 5):
    project each domain gradient off the others it conflicts with, in a random order per
    step, against the original gradients."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [_REDUCTION, HParam("pcgrad_reference", "original", lambda r: "original",
                                   "'original' (paper) or 'projected' references",
                                   choices=("original", "projected"))]

    def combine(self, grads):
        return pcgrad(grads, generator=self.generator, reference=self.hparams["pcgrad_reference"],
                      reduction=self.hparams["surgery_reduction"])


class CorGrad(GradientSurgery):
    """CorGrad (seed 004): per-layer (L), per-slice (S) conflict projection against the
    original gradients, then smoothing of dominant domain gradients (D), summed.

    Defaults are the paper's rule: layers on, slices chosen automatically inside
    [5, 100] (``corgrad_slices`` 0), one-sided smoothing of dominant domains with alpha
    decaying from ``corgrad_alpha`` (paper: initially in [0.5, 1]) to 0 over the run,
    and order-free simultaneous projections. The official code's behaviour is
    reachable: ``corgrad_slices`` 10, ``corgrad_slicing`` "dim0",
    ``corgrad_projection`` "sequential" with ``corgrad_reference`` "projected",
    ``corgrad_smoothing`` "two_sided" and ``corgrad_alpha_schedule`` "constant".
    Set ``corgrad_layerwise`` False, ``corgrad_slices`` 1 or ``corgrad_smoothing``
    "none" for the seed's L / L+S / L+S+D ablation.

    With two training domains (ColoredMNIST) smoothing never fires under either rule:
    the larger of two norms is exactly mean + std, never above it.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [
            _REDUCTION,
            HParam("corgrad_layerwise", True, lambda r: True, "L: one unit per parameter tensor"),
            HParam("corgrad_slices", 0, lambda r: int(r.choice([0, 5, 10, 20, 50, 100])),
                   "S: slices per unit; 0 = automatic inside the paper's [5, 100], 1 = no slicing"),
            HParam("corgrad_slicing", "flat", lambda r: "flat",
                   "'flat': equal pieces of the flattened unit; 'dim0': torch.chunk (official)",
                   choices=("flat", "dim0")),
            HParam("corgrad_projection", "simultaneous", lambda r: "simultaneous",
                   "'simultaneous' (order-free) or 'sequential' (official, index order)",
                   choices=("simultaneous", "sequential")),
            HParam("corgrad_reference", "original", lambda r: "original",
                   "references of sequential projections: 'original' or 'projected' (official aliasing)",
                   choices=("original", "projected")),
            HParam("corgrad_smoothing", "dominant", lambda r: "dominant",
                   "D: 'dominant' (paper), 'two_sided' (official) or 'none'",
                   choices=("dominant", "two_sided", "none")),
            HParam("corgrad_alpha", 0.75, lambda r: float(r.uniform(0.5, 1.0)),
                   "initial smoothing weight of the dominant gradient (paper: [0.5, 1])"),
            HParam("corgrad_alpha_schedule", "decay", lambda r: "decay",
                   "'decay': alpha * (1 - log(t+1)/log(T)) down to 0 (paper); 'constant' (official)",
                   choices=("decay", "constant")),
        ]

    def combine(self, grads):
        hp = self.hparams
        schedule = hp["corgrad_alpha_schedule"] if self.total_steps else "constant"
        return corgrad(
            grads, layerwise=hp["corgrad_layerwise"],
            slices="auto" if hp["corgrad_slices"] == 0 else hp["corgrad_slices"],
            slicing=hp["corgrad_slicing"], projection=hp["corgrad_projection"],
            reference=hp["corgrad_reference"],
            smoothing=None if hp["corgrad_smoothing"] == "none" else hp["corgrad_smoothing"],
            alpha=hp["corgrad_alpha"], alpha_schedule=schedule, step=int(self.update_count),
            total_steps=max(self.total_steps or 1, 2), reduction=hp["surgery_reduction"])


class ANDMask(GradientSurgery):
    """AND-mask (Parascandolo et al. ICLR 2021; DomainBed): keep the mean gradient where
    at least a fraction ``tau`` of domains agree in sign, rescaled by the kept fraction."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [HParam("tau", 1.0, lambda r: float(r.uniform(0.5, 1.0)), "agreement threshold (DomainBed)")]

    def combine(self, grads):
        return and_mask(grads, tau=self.hparams["tau"])


class SANDMask(GradientSurgery):
    """SAND-mask (Shahtalebi et al. 2021; DomainBed): a smooth AND-mask,
    tanh(k * (agreement - tau) / variance), clipped at 0.

    DomainBed's default ``tau`` 1.0 is kept, and with it the mask is zero everywhere
    (agreement never exceeds 1), so the default update is zero: set ``tau`` below 1, as
    the random search does (U(0, 1)), for the method to learn.
    """

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [HParam("tau", 1.0, lambda r: float(r.uniform(0.0, 1.0)), "agreement threshold (DomainBed)"),
                HParam("k", 1e1, lambda r: float(10 ** r.uniform(-3, 5)), "mask sharpness (DomainBed)")]

    def combine(self, grads):
        return sand_mask(grads, tau=self.hparams["tau"], k=self.hparams["k"])
