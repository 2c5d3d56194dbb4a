"""Gradient-surgery algorithms: one gradient per training domain, combined by a rule.

Each step computes the gradient of every training domain's mean loss, each domain's
batch forwarded and backpropagated separately (Mansilla, Echeveste, Milone, Ferrante,
"Domain Generalization via Gradient Surgery", ICCV 2021, Sec. 3), combines them with a
rule of :mod:`domaingrad.gradients.surgery`, writes the result into ``.grad`` and takes
one Adam step. The rule's statistics (agreement fraction, conflicting pairs,
modification frequency and ratio) are returned by ``update`` and so land in every
results.jsonl record, with the modification statistics of the same gradients at the two
granularities CorGrad compares itself with (:func:`granularity_stats`: ``coarse_mod_freq``,
``coarse_mod_ratio``, ``fine_mod_freq``).

Hyperparameter ``surgery_batches`` (every surgery algorithm): ``"domain"`` (default, the
papers' method) gives the rule one batch per training domain; ``"mixed"`` is the
control experiment of Mansilla et al. (Sec. 4.3, Fig. 4, in the variant this project
measures): the step's D batches are pooled and dealt out again at random as D batches of
the same sizes (:func:`mixed_minibatches`), so every "domain gradient" mixes domains.

Hyperparameter defaults follow the papers; where a paper gives no search range the
random search keeps the paper's choice fixed (``lambda r: default``), so a sweep
explores the optimizer hyperparameters around the published rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..gradients.per_domain import per_domain_gradients
from ..gradients.surgery import SurgeryResult, agr_rand, agr_sum, and_mask, corgrad, pcgrad, sand_mask
from ..hparams import HParam
from ..rng import seed_hash
from .base import Minibatches, concat_minibatches
from .erm import ERM

_REDUCTION = HParam(
    "surgery_reduction",
    "sum",
    lambda r: "sum",
    "combine domain gradients by their sum (the papers) or mean (domaingrad's option)",
    choices=("sum", "mean"),
)

_BATCHES = HParam(
    "surgery_batches",
    "domain",
    lambda r: "domain",
    "'domain': one batch per training domain (the papers' method); 'mixed': the step's batches pooled "
    "and dealt out at random in the same sizes (control experiment, Mansilla et al. ICCV 2021, Fig. 4)",
    choices=("domain", "mixed"),
)

#: Elements per block of the element-wise count of :func:`granularity_stats`.
_FINE_CHUNK = 1 << 18


def mixed_minibatches(minibatches: Minibatches, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's D batches pooled and dealt out again at random, in the same sizes.

    The control of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via
    Gradient Surgery", ICCV 2021 (Sec. 4.3, Fig. 4) asks whether surgery helps through
    inter-domain agreement or as a mere regulariser; with mixed batches every "domain
    gradient" averages samples of all domains. (The paper's own control draws all D
    batches from one randomly chosen domain; this variant keeps the data of the step and
    only removes the domain structure of the batches.) Each mixed batch is a uniform draw
    without replacement from the pooled samples of the step: one permutation of all
    ``sum_d B_d`` samples, cut into pieces of sizes ``B_1, ..., B_D``.

    Args:
        minibatches: D pairs ``(x_d, y_d)``, x of shape ``(B_d, *input_shape)``, y of
            shape ``(B_d,)``, on one device.
        generator: a CPU ``torch.Generator``; one ``torch.randperm`` per call (so a run
            that saves the generator resumes exactly, on any device).

    Returns:
        D pairs ``(x'_d, y'_d)`` with the shapes of the input's; together they hold every
        input sample exactly once.
    """
    sizes = [int(y.shape[0]) for _, y in minibatches]
    x, y = concat_minibatches(minibatches)
    order = torch.randperm(sum(sizes), generator=generator).to(y.device)
    return [(x[idx], y[idx]) for idx in order.split(sizes)]


def granularity_stats(grads: Sequence[torch.Tensor]) -> dict[str, float]:
    """PCGrad's modification statistics of the same per-domain gradients at the two
    granularities CorGrad is compared with (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking
    Domain Generalization from Perspective of Gradient Granularity", ECAI 2024, Sec. 1,
    Figs. 6-7).

    * coarse (Fig. 6): PCGrad on the whole network, every parameter flattened into one
      vector: :func:`~domaingrad.gradients.surgery.pcgrad` with the domains in index
      order (so no random number is drawn and training is unchanged).
      ``coarse_mod_freq`` = projections / (D (D - 1)), ``coarse_mod_ratio`` = mean
      ``|cos|`` of the projections (0 without any).
    * fine (Fig. 7): the same sequential PCGrad on pieces of ONE element, with exact
      projections (``eps = 0``): domain ``i``'s component is projected once (to zero)
      exactly when another domain's component has the opposite sign, so ``fine_mod_freq``
      = (number of (domain, element) pairs with an opposite-signed component in another
      domain) / (D (D - 1) x elements), the paper's eq. (3) on one-element pieces. (The
      element-wise rule's result is then the sum over domains where all nonzero signs
      agree: Agr-Sum up to exact zeros; its modification ratio is always 1.) Under
      independent random signs this is ``(1 - 2^-(D-1)) / (D - 1)``.

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)`` (the per-domain gradients).

    Returns:
        ``coarse_mod_freq``, ``coarse_mod_ratio`` and ``fine_mod_freq`` as floats.

    Cost: one float64 Gram pass and one combination pass (the coarse rule) and three
    element-wise reductions, blocked; about 1% of a MNIST_CNN step of 2 or 5 domains on
    this project's CPU (``benchmarks/bench_algorithms.py``).
    """
    num_domains = int(grads[0].shape[0])
    coarse = pcgrad(grads, order=range(num_domains)).stats
    count = torch.zeros((), dtype=torch.int64, device=grads[0].device)
    elements = 0
    for g in grads:
        flat = g.reshape(num_domains, -1)
        elements += flat.shape[1]
        for a in range(0, flat.shape[1], _FINE_CHUNK):
            block = flat[:, a : a + _FINE_CHUNK]
            opposed = (block.amax(0) > 0) & (block.amin(0) < 0)
            count += ((block != 0).sum(0) * opposed).sum()
    pairs = num_domains * (num_domains - 1) * elements
    return {
        "coarse_mod_freq": coarse["mod_freq"],
        "coarse_mod_ratio": coarse["mod_ratio"],
        "fine_mod_freq": int(count.item()) / pairs if pairs else 0.0,
    }


class GradientSurgery(ERM):
    """Base of the surgery methods: ERM's network and Adam, with a combined gradient.

    Subclasses implement :meth:`combine` and list :meth:`hparam_specs` after this
    class's (``surgery_batches``). ``update_count`` (a buffer, so saved with the
    model) counts the updates, for rules with a schedule. ``update`` returns the loss,
    the rule's statistics and :func:`granularity_stats` of the step's gradients.

    With ``surgery_batches`` "mixed" the batches are dealt out by
    :func:`mixed_minibatches` from ``batch_generator``, a generator of its own (seeded
    from ``generator``'s seed, saved in checkpoints), so the rule's random draws are
    those of the "domain" run with the same seed.
    """

    update_count: torch.Tensor

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return [_BATCHES]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("update_count", torch.tensor(0, dtype=torch.long))
        self.surgery_params = [p for p in self.network.parameters() if p.requires_grad]
        # drawn from the global generator, which the run seeds with --seed
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        self.mixed_batches = self.hparams.get("surgery_batches", "domain") == "mixed"
        if self.mixed_batches:
            seed = seed_hash(self.generator.initial_seed(), "surgery_batches")
            self.batch_generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: list[torch.Tensor]) -> SurgeryResult:
        """Combine per-domain gradients, each (D, *param.shape), into one per parameter."""
        raise NotImplementedError

    def update(self, minibatches: Minibatches, unlabeled=None) -> dict[str, float]:
        if self.mixed_batches:
            minibatches = mixed_minibatches(minibatches, self.batch_generator)
        per_domain = per_domain_gradients(self.network, minibatches, params=self.surgery_params)
        stats = granularity_stats(per_domain.grads)
        result = self.combine(per_domain.grads)
        for param, grad in zip(self.surgery_params, result.grads):
            param.grad = grad
        self.optimizer.step()
        self.update_count += 1
        return {"loss": float(per_domain.losses.mean()), **result.stats, **stats}


class AgrSum(GradientSurgery):
    """Agr-Sum (Mansilla et al. ICCV 2021, eq. 3): sum of the domain gradients on the
    components where all domains agree in sign, zero elsewhere."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return super().hparam_specs(small_images) + [
            _REDUCTION,
            HParam(
                "agreement_rule",
                "paper",
                lambda r: "paper",
                "'paper': all signs equal; 'official': an exact zero disagrees",
                choices=("paper", "official"),
            ),
        ]

    def combine(self, grads):
        return agr_sum(grads, rule=self.hparams["agreement_rule"], reduction=self.hparams["surgery_reduction"])


class AgrRand(AgrSum):
    """Agr-Rand (Mansilla et al. ICCV 2021, eq. 4): Agr-Sum with Gaussian noise of scale
    mean |agreeing component| on the disagreeing components (guarded against NaN).

    The noise comes from :func:`~domaingrad.gradients.surgery.agr_rand`'s ``"counter"``
    stream; a run checkpointed on an earlier stream (``"parallel"``, or ``"sequential"``
    for checkpoints that name none) resumes on it, so it ends as it would have."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        #: agr_rand's noise stream (a resumed older run keeps the one it started with)
        self.noise_stream = "counter"

    def combine(self, grads):
        return agr_rand(
            grads,
            generator=self.generator,
            rule=self.hparams["agreement_rule"],
            reduction=self.hparams["surgery_reduction"],
            noise=self.noise_stream,
        )

    def training_state(self):
        state = super().training_state()
        state["agr_rand_noise"] = self.noise_stream
        return state

    def load_training_state(self, state):
        super().load_training_state(state)
        self.noise_stream = state.get("agr_rand_noise", "sequential")


class PCGrad(GradientSurgery):
    """PCGrad, domain version (Yu et al. NeurIPS 2020; Mansilla et al. ICCV 2021, eq. 5):
    project each domain gradient off the others it conflicts with, in a random order per
    step, against the original gradients."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return super().hparam_specs(small_images) + [
            _REDUCTION,
            HParam(
                "pcgrad_reference",
                "original",
                lambda r: "original",
                "'original' (paper) or 'projected' references",
                choices=("original", "projected"),
            ),
        ]

    def combine(self, grads):
        return pcgrad(
            grads,
            generator=self.generator,
            reference=self.hparams["pcgrad_reference"],
            reduction=self.hparams["surgery_reduction"],
        )


#: Module types whose parameters the authors' CorGrad code sends through the surgery
#: (``get_conv_grads``: ``torch.nn.Conv2d`` and ``torch.nn.Linear``, weights and biases).
_CONV_LINEAR = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


class CorGrad(GradientSurgery):
    """CorGrad (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
    Perspective of Gradient Granularity", ECAI 2024; sections 3.4-3.7, Algorithm 1):
    per-layer (L), per-slice (S) projection of conflicting domain gradients, then smoothing of dominant
    domain gradients (D), summed. See :func:`domaingrad.gradients.surgery.corgrad`.

    Defaults are the paper's rule, and the same as the function's: every parameter
    tensor is a unit, slices chosen from each unit's size inside the paper's [5, 100]
    (``corgrad_slices`` 0) with at least ``corgrad_min_slice`` (16) elements a slice,
    sequential PCGrad projections against the ORIGINAL gradients with the other domains
    in a random order per domain and step (``corgrad_order`` "random", drawn from the
    algorithm's generator, which is seeded by ``--seed`` and saved in checkpoints, so
    runs are reproducible and resume exactly), one-sided smoothing of dominant domains
    with alpha decaying from ``corgrad_alpha`` (paper: initially in [0.5, 1]) to 0 over
    the run.

    The authors' code (libzwo/CorGrad) is reachable option by option, and all at once with
    ``--hparams`` set to :data:`OFFICIAL_HPARAMS`: ``corgrad_slices`` 10 with
    ``corgrad_min_slice`` 1 and ``corgrad_slicing`` "dim0" (``torch.chunk`` along dim 0),
    ``corgrad_order`` "index" with ``corgrad_reference`` "projected" (its aliasing
    slice views), ``corgrad_smoothing`` "two_sided" (outliers on both sides, mixed with
    the mean of the others), ``corgrad_alpha`` 0.6 with ``corgrad_alpha_schedule``
    "constant", and ``corgrad_params`` "conv_linear": only Conv and Linear parameters
    (weights and biases) go through the surgery, every other parameter (BatchNorm and
    GroupNorm affine parameters) takes the LAST training domain's gradient alone.
    ``corgrad_projection`` "simultaneous" is neither rule (see the function) and never
    a default. Set ``corgrad_layerwise`` False, ``corgrad_slices`` 1 or
    ``corgrad_smoothing`` "none" for the paper's L / L+S / L+S+D ablation.

    With two training domains (ColoredMNIST) smoothing never fires under either rule:
    the larger of two norms is exactly mean + std, never above it.
    """

    #: hyperparameters reproducing the authors' code (pass as ``--hparams``)
    OFFICIAL_HPARAMS: dict[str, Any] = {
        "corgrad_slices": 10,
        "corgrad_min_slice": 1,
        "corgrad_slicing": "dim0",
        "corgrad_order": "index",
        "corgrad_reference": "projected",
        "corgrad_smoothing": "two_sided",
        "corgrad_alpha": 0.6,
        "corgrad_alpha_schedule": "constant",
        "corgrad_params": "conv_linear",
    }

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return super().hparam_specs(small_images) + [
            _REDUCTION,
            HParam("corgrad_layerwise", True, lambda r: True, "L: one unit per parameter tensor"),
            HParam(
                "corgrad_slices",
                0,
                lambda r: int(r.choice([0, 5, 10, 20, 50, 100])),
                "S: slices per unit; 0 = automatic inside the paper's [5, 100], 1 = no slicing",
            ),
            HParam(
                "corgrad_min_slice",
                16,
                lambda r: 16,
                "fewest elements a slice may hold (small tensors get fewer slices; 1 = official)",
            ),
            HParam(
                "corgrad_slicing",
                "flat",
                lambda r: "flat",
                "'flat': equal pieces of the flattened unit (paper); 'dim0': torch.chunk (official)",
                choices=("flat", "dim0"),
            ),
            HParam(
                "corgrad_projection",
                "sequential",
                lambda r: "sequential",
                "'sequential' PCGrad projections (paper, official); 'simultaneous' is "
                "neither and not a projection (domaingrad's option, never a default)",
                choices=("sequential", "simultaneous"),
            ),
            HParam(
                "corgrad_order",
                "random",
                lambda r: "random",
                "order of the other domains: 'random' per domain and step (paper) or 'index' (official)",
                choices=("random", "index"),
            ),
            HParam(
                "corgrad_reference",
                "original",
                lambda r: "original",
                "references of the projections: 'original' (paper) or 'projected' (official aliasing)",
                choices=("original", "projected"),
            ),
            HParam(
                "corgrad_smoothing",
                "dominant",
                lambda r: "dominant",
                "D: 'dominant' (paper), 'two_sided' (official) or 'none'",
                choices=("dominant", "two_sided", "none"),
            ),
            HParam(
                "corgrad_alpha",
                0.75,
                lambda r: float(r.uniform(0.5, 1.0)),
                "initial smoothing weight of the dominant gradient (paper: [0.5, 1])",
            ),
            HParam(
                "corgrad_alpha_schedule",
                "decay",
                lambda r: "decay",
                "'decay': alpha * (1 - log(t+1)/log(T)) down to 0 (paper); 'constant' (official)",
                choices=("decay", "constant"),
            ),
            HParam(
                "corgrad_params",
                "all",
                lambda r: "all",
                "'all' parameters go through the surgery (paper); 'conv_linear': only Conv/Linear "
                "ones, the others take the last domain's gradient (official)",
                choices=("all", "conv_linear"),
            ),
        ]

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict[str, Any]):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        if self.hparams["corgrad_params"] == "conv_linear":
            chosen = {
                id(p)
                for m in self.network.modules()
                if isinstance(m, _CONV_LINEAR)
                for p in m.parameters(recurse=False)
            }
        else:
            chosen = {id(p) for p in self.surgery_params}
        self.in_surgery = [id(p) in chosen for p in self.surgery_params]
        if not any(self.in_surgery):
            raise ValueError(
                "corgrad_params='conv_linear' needs Conv or Linear layers with trainable "
                "parameters in the network; use corgrad_params='all'"
            )

    def combine(self, grads):
        hp = self.hparams
        step = int(self.update_count)
        schedule = hp["corgrad_alpha_schedule"]
        if schedule == "decay" and self.total_steps is None and step > 0:
            raise ValueError(
                "CorGrad's corgrad_alpha_schedule 'decay' needs the run length: set "
                "algorithm.total_steps (domaingrad train does), or use 'constant'"
            )
        chosen = [g for g, keep in zip(grads, self.in_surgery) if keep]
        result = corgrad(
            chosen,
            generator=self.generator,
            order="index" if hp["corgrad_order"] == "index" else None,
            layerwise=hp["corgrad_layerwise"],
            slices="auto" if hp["corgrad_slices"] == 0 else hp["corgrad_slices"],
            min_slice=hp["corgrad_min_slice"],
            slicing=hp["corgrad_slicing"],
            projection=hp["corgrad_projection"],
            reference=hp["corgrad_reference"],
            smoothing=None if hp["corgrad_smoothing"] == "none" else hp["corgrad_smoothing"],
            alpha=hp["corgrad_alpha"],
            alpha_schedule=schedule,
            step=step,
            total_steps=None if self.total_steps is None else max(self.total_steps, 2),
            reduction=hp["surgery_reduction"],
        )
        if len(chosen) == len(grads):
            return result
        combined = iter(result.grads)
        # the official code leaves these parameters with the last domain's backward pass
        out = [next(combined) if keep else g[-1].clone() for g, keep in zip(grads, self.in_surgery)]
        return SurgeryResult(out, result.stats)


class ANDMask(GradientSurgery):
    """AND-mask (Parascandolo et al. ICLR 2021; DomainBed): keep the mean gradient where
    at least a fraction ``tau`` of domains agree in sign, rescaled by the kept fraction."""

    @classmethod
    def hparam_specs(cls, small_images: bool) -> list[HParam]:
        return super().hparam_specs(small_images) + [
            HParam("tau", 1.0, lambda r: float(r.uniform(0.5, 1.0)), "agreement threshold (DomainBed)")
        ]

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
        return super().hparam_specs(small_images) + [
            HParam("tau", 1.0, lambda r: float(r.uniform(0.0, 1.0)), "agreement threshold (DomainBed)"),
            HParam("k", 1e1, lambda r: float(10 ** r.uniform(-3, 5)), "mask sharpness (DomainBed)"),
        ]

    def combine(self, grads):
        return sand_mask(grads, tau=self.hparams["tau"], k=self.hparams["k"])
