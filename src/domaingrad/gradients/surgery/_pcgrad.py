"""PCGrad over domains (Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020, Alg. 1; domain version of Mansilla, Echeveste,
Milone, Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021, sec. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._gram import _combine_run, _gram_run, _native_grams, _native_rows_usable, _project_sequential
from ._plumbing import (
    Reduction,
    Reference,
    SurgeryResult,
    _check_eps,
    _check_fixed_order,
    _check_generator,
    _check_option,
    _make_groups,
    _resolve_order,
    _Rule,
    _scale,
    _unpack,
    _validate,
)


def pcgrad(
    grads: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    order: Sequence[int] | None = None,
    reference: Reference = "original",
    eps: float = 1e-12,
    reduction: Reduction = "sum",
) -> SurgeryResult:
    """PCGrad (Yu et al., NeurIPS 2020, Alg. 1) over domains, as in Mansilla et al. sec. 4.

    One permutation of the domains per call: ``order`` if given, else
    ``torch.randperm(D, generator=generator)`` (global RNG when ``generator`` is None).
    For each ``i`` in that order and each ``j != i`` in that order: if
    ``<g_i^pc, g_j> < 0`` then ``g_i^pc -= <g_i^pc, g_j> / (||g_j||^2 + eps) g_j``.
    Dot products run over ALL parameters flattened together (whole network).

    Tie tolerance (domaingrad's; the official code tests ``dot < 0``): a pair conflicts
    only when ``<g_i^pc, g_j> < -1e-10 * s_i * s_j``, ``s_v = sum_k |V_k| ||g_k||`` the
    scale of ``v = sum_k V_k g_k`` (``s_v = ||g_v||`` for an unprojected gradient). A dot
    product inside that band is zero up to rounding (e.g. a pair made orthogonal by an
    earlier projection), its sign an artefact of the summation order; its projection
    would move ``g_i^pc`` by less than 1e-10 of its scale. So neither the result nor
    ``conflict_pairs``, ``mod_freq`` and ``mod_ratio`` depend on summation order,
    tensor sizes or the torch version.
    Result ``= sum_i g_i^pc`` (``reduction="mean"``, domaingrad's option, divides by D).

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.
        reference: ``"original"`` (paper, default): ``g_j`` is the unprojected gradient.
            ``"projected"``: ``g_j`` is its current value, already projected if processed
            earlier in the order (implementations that alias their buffers). A projected
            reference whose squared norm is at rounding level (at most ``1e-10 s_j^2``)
            is treated as zero: no projection.
        eps: added to ``||g_j||^2``; ``eps=0`` reproduces the official code.

    Implementation: one pass builds the ``D x D`` Gram matrix (float64 products and sums),
    the projections run on coefficient matrices, one pass forms ``(1^T W) g``; both
    passes are batched products over parts of each tensor, which torch spreads over all
    its threads (the conflict decisions do not depend on the number of threads). When no
    pair conflicts the result is exactly ``g.sum(0)``.

    Returns:
        grads of shapes ``param_t.shape``; stats ``conflict_pairs`` (projections made),
        ``mod_freq`` (= conflict_pairs / (D (D - 1))), ``mod_ratio`` (mean over the
        projections of ``||projection|| / ||g_i^pc||``, i.e. ``|cos|``; 0.0 if none).
    """
    tensors, num_domains = _validate(grads)
    _check_option(reference, ("original", "projected"), "reference")
    eps = _check_eps(eps)
    scale = _scale(reduction, num_domains)
    _check_generator(generator, optional=True)
    resolved = _resolve_order(num_domains, generator, order)
    with torch.no_grad():
        device = tensors[0].device
        groups = _make_groups(tensors, num_domains)
        gram = torch.zeros(1, num_domains, num_domains, dtype=torch.float64, device=device)
        usable = [_native_rows_usable(grp.flat) for grp in groups]
        _native_grams([(grp.flat, 0, grp.out.numel(), 0) for grp, ok in zip(groups, usable) if ok], gram)
        for grp, ok in zip(groups, usable):
            if not ok:
                gram += _gram_run(grp.flat.unsqueeze(1))
        others = [[j for j in resolved if j != i] for i in range(num_domains)]
        weights, count, ratio_sum = _project_sequential(gram, resolved, others, reference, eps)
        coef = weights.sum(1)  # (1, D): 1^T W
        exact_sum = bool((coef == 1).all())
        coef = coef * scale
        for grp in groups:
            if exact_sum:
                torch.sum(grp.flat, 0, out=grp.out)
                if scale != 1.0:
                    grp.out.mul_(scale)
            else:
                _combine_run(grp.flat.unsqueeze(1), coef, grp.out.unsqueeze(0))
        out = _unpack(groups, tensors)
    pairs = num_domains * (num_domains - 1)
    return SurgeryResult(
        out,
        {
            "conflict_pairs": float(count),
            "mod_freq": count / pairs if pairs else 0.0,
            "mod_ratio": ratio_sum / count if count else 0.0,
        },
    )


class PCGrad(_Rule):
    """PCGrad as a configured object: ``PCGrad(**options)(grads)`` is :func:`pcgrad`
    ``(grads, **options)``, with the same defaults.

    Args:
        order: ``"random"`` (default, the paper): a fresh permutation of the domains per
            call, ``torch.randperm(D, generator=generator)``; or a fixed permutation of
            ``range(D)``, the same at every call.
        generator: source of the random orders (None: torch's global generator). It is
            kept and advanced by every call, so a seeded generator makes a run
            reproducible.
        reference: ``"original"`` (default, paper) or ``"projected"``, see :func:`pcgrad`.
        eps: added to ``||g_j||^2`` (default ``1e-12``; ``0`` is the official code).
        reduction: ``"sum"`` (default, the paper) or ``"mean"`` (divide by D).

    Raises:
        ValueError: for an option outside its documented values (when constructed), and
            for a fixed ``order`` whose length is not D (when called).

    Example (``<g_1, g_2> = -1``: each is projected off the other, ``g_1 -> (0.5, 0.5)``,
    ``g_2 -> (0, 1)``, summed):

    >>> import torch
    >>> from domaingrad.gradients.surgery import PCGrad
    >>> rule = PCGrad(order=[0, 1], eps=0.0)
    >>> result = rule([torch.tensor([[1.0, 0.0], [-1.0, 1.0]])])
    >>> result.grads[0].tolist(), result.stats["conflict_pairs"]
    ([0.5, 1.5], 2.0)
    >>> rule
    PCGrad(order=[0, 1], generator=None, reference='original', eps=0.0, reduction='sum')
    """

    _options = ("order", "generator", "reference", "eps", "reduction")

    def __init__(
        self,
        *,
        order: Literal["random"] | Sequence[int] = "random",
        generator: torch.Generator | None = None,
        reference: Reference = "original",
        eps: float = 1e-12,
        reduction: Reduction = "sum",
    ) -> None:
        self.order: Literal["random"] | list[int] = "random"
        #: the order as pcgrad takes it
        self._order: list[int] | None = None
        if not (isinstance(order, str) and order == "random"):
            self.order = self._order = _check_fixed_order(order)
        _check_generator(generator, optional=True)
        _check_option(reference, ("original", "projected"), "reference")
        _check_option(reduction, ("sum", "mean"), "reduction")
        self.generator = generator
        self.reference = reference
        self.eps = _check_eps(eps)
        self.reduction = reduction

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`pcgrad` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return pcgrad(
            grads,
            generator=self.generator,
            order=self._order,
            reference=self.reference,
            eps=self.eps,
            reduction=self.reduction,
        )
