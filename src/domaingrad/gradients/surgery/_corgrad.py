"""CorGrad (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
Perspective of Gradient Granularity", ECAI 2024): conflict projection per slice on the
float64 Gram engine, smoothing of dominant gradients, and the configured object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._gram import _combine_pieces, _piece_grams, _project_sequential, _project_simultaneous
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
from ._slicing import _check_slicing, _cut_units
from ._smoothing import _alpha_value, _check_smoothing, _smoothed_coefficients


def _check_projection(
    projection: str, reference: str, generator: torch.Generator | None, order: Sequence[int] | str | None, eps: float
) -> None:
    """Raise ValueError for a projection option of corgrad outside its documented values
    (a fixed ``order`` is checked against D in _corgrad_orders)."""
    _check_option(projection, ("sequential", "simultaneous"), "projection")
    _check_option(reference, ("original", "projected"), "reference")
    _check_generator(generator, optional=True)
    if isinstance(order, str):
        _check_option(order, ("index",), "order")
    _check_eps(eps)


def _corgrad_orders(
    num_domains: int, generator: torch.Generator | None, order: Sequence[int] | None
) -> tuple[list[int], list[list[int]]]:
    """Processing order of the domains and, per domain, the order of the others."""
    if order is not None:
        resolved = _resolve_order(num_domains, None, order)
        return resolved, [[j for j in resolved if j != i] for i in range(num_domains)]
    j_orders = []
    for i in range(num_domains):
        others = [j for j in range(num_domains) if j != i]
        if len(others) > 1:
            device = generator.device if generator is not None else "cpu"
            perm = torch.randperm(len(others), generator=generator, device=device).tolist()
            others = [others[k] for k in perm]
        j_orders.append(others)
    return list(range(num_domains)), j_orders


#: Keyword options of :func:`corgrad` that reproduce the authors' code (libzwo/CorGrad,
#: ``domainbed/gradient.py::correct_grad``): ``torch.chunk`` into 10 parts along dim 0,
#: domains projected in index order against references that alias the projected
#: gradients, no epsilon, two-sided outliers mixed with the mean of the others, constant
#: alpha 0.6 (its README). Its restriction of the surgery to Conv/Linear parameters is a
#: property of the training loop: ``corgrad_params="conv_linear"`` of the CorGrad algorithm.
#: Two guards stay on: rounding-level ties are no conflicts, and a reference that earlier
#: projections reduced to rounding noise (pieces shorter than D) is a zero vector, where
#: the authors' code projects on the noise.
OFFICIAL_CORGRAD_OPTIONS: dict[str, object] = {
    "slices": 10,
    "min_slice": 1,
    "slicing": "dim0",
    "order": "index",
    "reference": "projected",
    "eps": 0.0,
    "smoothing": "two_sided",
    "alpha": 0.6,
    "alpha_schedule": "constant",
}


def corgrad(
    grads: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    order: Sequence[int] | Literal["index"] | None = None,
    layerwise: bool = True,
    slices: int | Literal["auto"] = "auto",
    min_slice: int = 16,
    slicing: Literal["flat", "dim0"] = "flat",
    projection: Literal["sequential", "simultaneous"] = "sequential",
    reference: Reference = "original",
    smoothing: Literal["dominant", "two_sided"] | None = "dominant",
    alpha: float = 0.75,
    alpha_schedule: Literal["decay", "constant"] = "decay",
    step: int = 0,
    total_steps: int | None = None,
    eps: float = 1e-12,
    reduction: Reduction = "sum",
) -> SurgeryResult:
    """CorGrad: layering, slicing, conflict projection and smoothing of dominant gradients.

    Source: Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
    Perspective of Gradient Granularity", ECAI 2024 (CorGrad), sections 3.4-3.7 and
    Algorithm 1. Every default is the paper's rule; :data:`OFFICIAL_CORGRAD_OPTIONS`
    gives the authors' code. The rule step by step (units, slicing, projection,
    smoothing, result), with the source of every option, is documented on
    :class:`CorGrad`, the configured object that calls this function (``order=None``
    here is its ``order="random"``).

    With ``layerwise=False, slices=1, smoothing=None, order=p`` this is exactly
    :func:`pcgrad` with ``order=p``.

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.
        generator: source of the random domain orders (``order=None``); must be on CPU
            or the tensors' device.
        step: position in the run, for ``alpha_schedule="decay"``.
        total_steps: length of the run, for ``alpha_schedule="decay"``; may be None only
            at ``step = 0`` (where the schedule gives ``alpha`` whatever the length).
        eps: added to ``||g_j||^2`` in the projection (``0`` = official code).

    Returns:
        grads of shapes ``param_t.shape``; stats ``conflict_pairs`` (projected
        (i, j, piece) triples), ``mod_freq`` (conflict_pairs / (D (D-1) #pieces), the
        paper's eq. (3)), ``mod_ratio`` (mean ``||projection|| / ||g_i^pc||`` = ``|cos|``
        over the projections, 0.0 if none), ``smoothed`` ((domain, unit) pairs smoothed),
        ``alpha`` (value used) and ``pieces`` (total number of pieces).

    Raises:
        ValueError: for malformed ``grads`` or an option outside its documented values,
            and for ``alpha_schedule="decay"`` at ``step > 0`` without ``total_steps``.
    """
    tensors, num_domains = _validate(grads)
    _check_slicing(layerwise, slices, min_slice, slicing)
    _check_projection(projection, reference, generator, order, eps)
    _check_smoothing(smoothing, alpha, alpha_schedule, step, total_steps)
    if isinstance(order, str):
        order = range(num_domains)
    scale = _scale(reduction, num_domains)
    alpha_t = _alpha_value(alpha, alpha_schedule, step, total_steps)
    segments, units, num_units = _cut_units(tensors, layerwise, slices, slicing, int(min_slice))
    num_pieces = int(units.numel())
    i_order, j_orders = _corgrad_orders(num_domains, generator, order)
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
        gram, elem_piece = _piece_grams(groups, segments, num_pieces, num_domains, tensors[0].device)
        if projection == "simultaneous":
            weights, count, ratio_sum = _project_simultaneous(gram, float(eps))
        else:
            weights, count, ratio_sum = _project_sequential(gram, i_order, j_orders, reference, float(eps))
        coef, is_plain, smoothed = _smoothed_coefficients(gram, weights, units, num_units, smoothing, alpha_t)
        _combine_pieces(groups, segments, elem_piece, coef, is_plain, scale)
        out = _unpack(groups, tensors)
    return SurgeryResult(out, _stats(count, ratio_sum, smoothed, alpha_t, num_pieces, num_domains))


def _stats(
    count: int, ratio_sum: float, smoothed: int, alpha: float, num_pieces: int, num_domains: int
) -> dict[str, float]:
    """corgrad's statistics (see its Returns)."""
    pairs = num_domains * (num_domains - 1) * num_pieces
    return {
        "conflict_pairs": float(count),
        "mod_freq": count / pairs if pairs else 0.0,
        "mod_ratio": ratio_sum / count if count else 0.0,
        "smoothed": float(smoothed),
        "alpha": float(alpha),
        "pieces": float(num_pieces),
    }


class CorGrad(_Rule):
    """CorGrad as a configured object, with a step counter for the alpha decay.

    ``CorGrad(**options)(grads)`` is :func:`corgrad` ``(grads, step=rule.step,
    **options)``, with the same defaults (the paper's rule; the authors' code is
    ``CorGrad(**OFFICIAL_CORGRAD_OPTIONS)``). Source: Zhou, Hu, Zhou, Guan, Jiang,
    "Rethinking Domain Generalization from Perspective of Gradient Granularity", ECAI
    2024, sections 3.4-3.7 and Algorithm 1. The rule:

    1. Units (sec. 3.4 (i), "L"; Algorithm 1 line 2): ``layerwise=True`` makes every
       parameter tensor a unit; ``layerwise=False`` makes the whole network one unit
       (all tensors flattened and concatenated; dot products over everything).
    2. Slicing (sec. 3.4 (ii), "S"): each unit is cut into at most ``n`` pieces.
       ``slices="auto"`` (default; the paper sets n "dynamically" in [5, 100], sec. 4.1):
       ``n`` from the unit's size, see :func:`auto_slices`; an int fixes ``n``;
       ``slices=1``: no slicing. ``slicing="flat"`` (paper: "split it equally into n
       vectors"): contiguous pieces of the flattened unit, ``torch.tensor_split`` sizes
       (differ by at most one). ``slicing="dim0"`` (official code): ``torch.chunk(param,
       n, dim=0)``, ceil-sized rows, so fewer than n pieces may result (with
       ``layerwise=False`` flat slicing is used).
       Tiny tensors (domaingrad's rule, the paper is silent): no piece holds fewer than
       ``min_slice`` elements (default 16). A unit of ``m`` elements gets
       ``min(n, max(1, m // min_slice))`` pieces, so units below ``2 * min_slice``
       elements (biases of small heads, say) are not sliced; with ``"dim0"`` the number
       of chunks is lowered until the last chunk also holds ``min_slice`` elements (or
       one chunk is left). Reason: the angle between two random m-vectors has density
       ``~ sin^(m-2)(theta)`` (the paper's eq. (9)); for small m it is spread over most
       of [0, pi], and a 1-element piece turns the projection into a sign test
       (mod ratio always 1). ``min_slice=1`` is the official code's behaviour.
    3. Projection (sec. 3.6, eqs. (12)-(13); sec. 3.7 steps (2)-(3); Algorithm 1 lines
       3-7), per piece, PCGrad-style: ``projection="sequential"`` (default): for each
       domain ``i`` and each other domain ``j`` in turn, if ``<g_i^pc, g_j> < 0`` then
       ``g_i^pc -= <g_i^pc, g_j> / (||g_j||^2 + eps) g_j`` (eq. (13) divides by the norm,
       not its square; the squared norm of PCGrad is what makes eq. (12) the projection
       onto the normal plane the text describes, and what the official code uses).
       Conflict = dot < 0, as the official code; the criterion listed in sec. 3.3 has the
       sign reversed. Order (Algorithm 1 line 4, "in random order"): with ``order="random"``
       (default; ``order=None`` of :func:`corgrad`) the domains ``i`` are taken in index order and, for each ``i``, the
       others in a fresh random order, one ``torch.randperm(D - 1, generator=generator)``
       per ``i`` when ``D > 2`` (global RNG when ``generator`` is None); the same order is
       used for every piece. ``order=[...]`` (a permutation) fixes both orders, as
       :func:`pcgrad`; ``order="index"`` is ``range(D)`` (official code).
       ``reference="original"`` (default, paper: project on the ORIGINAL ``g_j``) or
       ``"projected"`` (the official code, whose slice views alias: ``g_j`` already
       projected when ``j`` came earlier). ``projection="simultaneous"`` is NOT the
       paper's rule and not a projection, kept only as a labelled non-default option:
       ``g_i^pc = g_i - sum_{j: <g_i,g_j> < 0} <g_i,g_j>/(||g_j||^2 + eps) g_j`` from the
       original gradients at once; it can grow or reverse a gradient (g = [2, -1, -1]
       on a 1-element piece gives -2 where every sequential order gives 0).
       Ties: a dot product within ``1e-10`` of the scales of the two vectors (see
       :func:`pcgrad`) is no conflict, and a projected reference or corrected piece of
       rounding-level norm counts as zero, so no decision depends on summation order.
    4. Smoothing (sec. 3.5, eq. (11); sec. 3.7 steps (4)-(6); Algorithm 1 lines 8-11,
       "D"), after projection, per unit, on the L2 norms of the D corrected unit
       gradients (mean and POPULATION std across domains): ``smoothing="dominant"``
       (paper): ``norm_i - mean > std`` makes ``g_i <- alpha g_i + (1 - alpha) g_mean``,
       ``g_mean`` the mean of all D corrected gradients of the unit.
       ``smoothing="two_sided"`` (official): ``|norm_i - mean| > std``, mixed with the
       mean of the non-outlier domains. ``None``: off. A norm must exceed the threshold
       by ``1e-9 * max norm`` to count (ties are rounding noise); in particular with
       D = 2 the larger norm equals mean + std exactly, so smoothing never fires for
       two domains. ``alpha_schedule="decay"`` (default, paper sec. 4.1: alpha
       "initially ... in [0.5, 1] and gradually decays to 0"): ``alpha * (1 - log(step +
       1) / log(total_steps))`` clipped to ``[0, alpha]`` (the official code's unused
       log schedule scaled by the initial value; 0 at ``step = total_steps - 1``);
       ``"constant"`` (official code): ``alpha`` throughout.
    5. Result: sum over domains of the corrected gradients (Algorithm 1, last line);
       ``reduction="mean"`` (domaingrad's option) divides by D.

    Step counter: the attribute ``step`` (0 when constructed) is the position in the run
    given to :func:`corgrad`; every call uses it and then adds 1 (a call that raises
    leaves it unchanged). Call the object once per optimizer step and the alpha decay
    follows your training loop; pass ``total_steps``, the length of the run, for the
    default ``alpha_schedule="decay"`` (without it only the first call is allowed).
    ``reset()`` starts a new run at step 0; assign ``rule.step = s`` to resume at step
    ``s``.

    Args:
        generator: source of the random domain orders (None: torch's global generator),
            on CPU or the tensors' device; kept and advanced by every call.
        order: ``"random"`` (default), ``"index"`` (official) or a fixed permutation of
            ``range(D)``, see step 3.
        layerwise: one unit per parameter tensor (default) or the whole network, step 1.
        slices: ``"auto"`` (default) or the number of pieces per unit, step 2.
        min_slice: fewest elements a piece may hold (default 16; official 1), step 2.
        slicing: ``"flat"`` (default, paper) or ``"dim0"`` (official), step 2.
        projection: ``"sequential"`` (default) or ``"simultaneous"``, step 3.
        reference: ``"original"`` (default, paper) or ``"projected"`` (official), step 3.
        smoothing: ``"dominant"`` (default, paper), ``"two_sided"`` (official) or None,
            step 4.
        alpha: initial smoothing weight in [0, 1] (default 0.75), step 4.
        alpha_schedule: ``"decay"`` (default, paper) or ``"constant"`` (official), step 4.
        total_steps: length of the run in steps (>= 2) for ``alpha_schedule="decay"``.
        eps: added to ``||g_j||^2`` in the projection (``0`` = official code).
        reduction: ``"sum"`` (default, the paper) or ``"mean"`` (divide by D), step 5.

    Raises:
        ValueError: for an option outside its documented values (when constructed); when
            called, for malformed ``grads``, a fixed ``order`` whose length is not D, or a
            second call with ``alpha_schedule="decay"`` and no ``total_steps``.

    Example (two domains, one 4-element parameter in two pieces: the first pair of
    components conflicts and is projected as PCGrad, the second is summed; then alpha
    decays as ``0.8 (1 - log(step + 1) / log(100))``):

    >>> import torch
    >>> from domaingrad.gradients.surgery import CorGrad
    >>> g = torch.tensor([[1.0, 0.0, 1.0, 1.0], [-1.0, 1.0, 1.0, 1.0]])
    >>> rule = CorGrad(slices=2, min_slice=1, smoothing=None, eps=0.0)
    >>> rule([g]).grads[0].tolist()
    [0.5, 1.5, 2.0, 2.0]
    >>> rule.step
    1
    >>> decaying = CorGrad(alpha=0.8, total_steps=100)
    >>> [round(decaying([g]).stats["alpha"], 6) for _ in range(3)]
    [0.8, 0.679588, 0.609151]
    >>> decaying.reset()
    >>> decaying.step
    0
    """

    _options = (
        "generator",
        "order",
        "layerwise",
        "slices",
        "min_slice",
        "slicing",
        "projection",
        "reference",
        "smoothing",
        "alpha",
        "alpha_schedule",
        "total_steps",
        "eps",
        "reduction",
    )

    def __init__(
        self,
        *,
        generator: torch.Generator | None = None,
        order: Literal["random", "index"] | Sequence[int] = "random",
        layerwise: bool = True,
        slices: int | Literal["auto"] = "auto",
        min_slice: int = 16,
        slicing: Literal["flat", "dim0"] = "flat",
        projection: Literal["sequential", "simultaneous"] = "sequential",
        reference: Reference = "original",
        smoothing: Literal["dominant", "two_sided"] | None = "dominant",
        alpha: float = 0.75,
        alpha_schedule: Literal["decay", "constant"] = "decay",
        total_steps: int | None = None,
        eps: float = 1e-12,
        reduction: Reduction = "sum",
    ) -> None:
        self.order: Literal["random", "index"] | list[int]
        #: the order as corgrad takes it
        self._order: Literal["index"] | list[int] | None
        if isinstance(order, str) and order in ("random", "index"):
            self.order = order
            self._order = None if order == "random" else "index"
        else:
            self.order = self._order = _check_fixed_order(order, "'random', 'index'")
        _check_slicing(layerwise, slices, min_slice, slicing)
        _check_projection(projection, reference, generator, None, eps)
        _check_smoothing(smoothing, alpha, alpha_schedule, 0, total_steps)
        _check_option(reduction, ("sum", "mean"), "reduction")
        _alpha_value(alpha, alpha_schedule, 0, total_steps)  # e.g. decay over total_steps=1
        self.generator = generator
        self.layerwise = layerwise
        self.slices = slices
        self.min_slice = min_slice
        self.slicing = slicing
        self.projection = projection
        self.reference = reference
        self.smoothing = smoothing
        self.alpha = alpha
        self.alpha_schedule = alpha_schedule
        self.total_steps = total_steps
        self.eps = eps
        self.reduction = reduction
        #: position in the run of the next call (see the class docstring)
        self.step = 0

    def reset(self) -> None:
        """Start a new run: the next call is step 0."""
        self.step = 0

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`corgrad` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``) at
        ``step``, which then advances by one."""
        if self.alpha_schedule == "decay" and self.total_steps is None and self.step > 0:
            raise ValueError(
                f"CorGrad with alpha_schedule='decay' (the default, the paper's rule) was called at step "
                f"{self.step} without the run length: construct it with total_steps=T (the number of "
                "steps of your run), or use alpha_schedule='constant' for a fixed alpha"
            )
        result = corgrad(
            grads,
            generator=self.generator,
            order=self._order,
            layerwise=self.layerwise,
            slices=self.slices,
            min_slice=self.min_slice,
            slicing=self.slicing,
            projection=self.projection,
            reference=self.reference,
            smoothing=self.smoothing,
            alpha=self.alpha,
            alpha_schedule=self.alpha_schedule,
            step=self.step,
            total_steps=self.total_steps,
            eps=self.eps,
            reduction=self.reduction,
        )
        self.step += 1
        return result
