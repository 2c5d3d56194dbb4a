"""Agr-Rand (Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient
Surgery", ICCV 2021, eq. (4)): Agr-Sum with N(0, sigma^2) noise at the disagreeing
components, and its three seeded noise streams."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from torch import Tensor

from . import _native
from ._agreement import _agreement_pass, _masked_domain_sum
from ._noise import draw_keys
from ._plumbing import (
    AgreementRule,
    Reduction,
    SurgeryResult,
    _check_generator,
    _check_option,
    _Group,
    _make_groups,
    _Rule,
    _scale,
    _Scratch,
    _segment_sums,
    _unpack,
    _validate,
)

#: Agr-Rand's noise streams: "counter" (default), "parallel" and "sequential" (earlier
#: defaults, kept for bit-identical reruns of earlier runs).
NoiseStream = Literal["counter", "parallel", "sequential"]
_NOISE_STREAMS = ("counter", "parallel", "sequential")
#: Lanes of the parallel stream: independent generators, each drawing every
#: ``_NOISE_LANES``-th chunk. Fixed, so the noise does not depend on the thread count;
#: at most this many threads draw at once.
_NOISE_LANES = 8
#: Elements per chunk of the parallel stream, counted over all tensors in input order.
_NOISE_CHUNK = 1 << 18


def agr_rand(
    grads: Sequence[Tensor],
    *,
    generator: torch.Generator,
    rule: AgreementRule = "paper",
    reduction: Reduction = "sum",
    noise: NoiseStream = "counter",
) -> SurgeryResult:
    """Agr-Rand consensus of Mansilla et al. (ICCV 2021), eq. (4).

    As :func:`agr_sum`, but every disagreeing component is drawn from
    ``N(0, sigma^2)`` with ``sigma = mean_{p in A} |g*_p|``, ``A`` the agreeing components
    of the WHOLE network (all tensors together; with ``rule="paper"`` the all-zero
    components are in ``A``).

    Guard (domaingrad's choice): the official code computes sigma as 0/0 = NaN when no
    component agrees. Here sigma is then 0, i.e. the update is all zeros (there is no
    consensus to follow and no scale for the noise); the result is never NaN for finite
    input. When ``sigma == 0`` (or NaN, from NaN input) the disagreeing components are
    zero, NaN sums staying NaN.

    Noise: the disagreeing components get independent ``N(0, sigma^2)`` values, from one
    of three streams of standard-normal draws. All are reproducible: the same generator
    state and gradients give the same result, whatever the number of threads and
    however the tensors are packed or blocked. ``generator`` must be on the tensors'
    device.

    * ``noise="counter"`` (default): domaingrad's counter stream (see
      ``domaingrad.gradients.surgery._noise``): two keys are drawn from ``generator``
      (``torch.randint(0, 2**62, (2,))``) at every call, and the network's component
      ``i`` (all tensors in input order) gets the ``i``-th value of the stream, a
      float32 ziggurat draw from SplitMix64 words addressed by ``i`` (the noise of a
      float64 gradient is float32-exact too). Its values are the same on every device
      and thread count. On CPU float32/float64 tensors a native kernel
      (compiled on first use, see ``_native``) fuses the draw with the agreement pass;
      elsewhere, or without a C compiler, torch operations compute the same values
      (``sigma`` may differ in the last bit, its sum being taken in another order).
    * ``noise="parallel"`` (the previous default): the network's components, all
      tensors in input order, are cut into chunks of ``2**18``; chunk ``c`` is drawn by lane ``c mod 8``
      (``out.normal_(generator=lane)`` on each tensor's part of the chunk, in order), the
      8 lanes being fresh generators seeded by ``torch.randint(0, 2**63 - 1, (8,),
      generator=generator)`` at every call. Up to 8 threads draw at once (as many as
      ``torch.get_num_threads()``; one on other devices than the CPU), so the noise,
      which costs more than the rule itself on a CPU (torch draws normal values one
      thread at a time), costs less as threads are added. torch seeds its CPU
      generator with the low 32 bits, so two lanes of a long run may start from the
      same seed and repeat each other's values: about ``(8 * calls)**2 / 2**33`` such
      pairs in a run (0.2 in 5,000 steps, each pair one eighth of the network in two
      steps); on CUDA the seeds have 63 bits.
    * ``noise="sequential"``: the stream of domaingrad 0.1.0, for bit-identical results
      with runs made before the parallel stream. For each tensor with at least one
      disagreeing component, in order, one standard-normal draw per component
      (``torch.randn(param.shape, generator=generator, dtype=param.dtype)``, of which the
      disagreeing positions are used), one thread at a time.

    With ``reduction="mean"`` the whole result, noise included, is divided by ``D``
    (equivalently, sigma is computed from the averaged consensus).

    Returns:
        grads of shapes ``param_t.shape``; stats ``agree_frac`` and ``sigma`` (the
        standard deviation used, after the reduction).

    Raises:
        ValueError: for an option outside its documented values, a generator that is
            not a ``torch.Generator``, or malformed ``grads``.
    """
    tensors, num_domains = _validate(grads)
    _check_option(rule, ("paper", "official"), "rule")
    _check_option(noise, _NOISE_STREAMS, "noise")
    scale = _scale(reduction, num_domains)
    _check_generator(generator, optional=False)
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
        if noise == "counter":
            agree, total, sigma = _agr_rand_counter(groups, generator, rule, scale)
        elif noise == "parallel":
            agree, total, sigma = _agr_rand_parallel(groups, len(tensors), generator, rule, scale)
        else:
            agree, total, sigma = _agr_rand_sequential(groups, generator, rule, scale)
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"agree_frac": agree / total if total else 1.0, "sigma": sigma})


def _agr_rand_counter(
    groups: list[_Group], generator: torch.Generator, rule: str, scale: float
) -> tuple[float, int, float]:
    """The counter stream: one agreement pass that leaves the sums at the agreeing
    components and the stream's standard-normal values at the others; then those are
    multiplied by sigma. Returns (agreeing, total, sigma)."""
    keys = draw_keys(generator)
    scratch = _Scratch(groups)
    agree, l1, keeps = _agreement_pass(groups, scratch, rule, keys=keys)
    total = sum(grp.out.numel() for grp in groups)
    sigma = scale * l1 / agree if agree > 0 else 0.0
    if agree < total:
        # sigma 0, or NaN from NaN input: the disagreeing components are 0 (NaN stays NaN)
        factor = sigma if sigma > 0.0 else 0.0
        native: list[tuple[Tensor, Tensor]] = []
        for grp, keep in zip(groups, keeps):
            assert keep is not None
            if _native.usable(grp.out):
                native.append((grp.out, keep))
            else:
                _scale_noise([grp], [keep], factor, scale, scratch)
        _native_scale(native, scale, factor)
    elif scale != 1.0:
        for grp in groups:
            grp.out.mul_(scale)
    return agree, total, sigma


def _native_scale(pairs: list[tuple[Tensor, Tensor]], kept_factor: float, other_factor: float) -> None:
    """``out *= where(keep, kept_factor, other_factor)`` for every ``(out, keep)`` pair, on
    the native kernel (all pairs' ranges in one parallel run)."""
    tasks = []
    for out, keep in pairs:
        fn = _native.kernel("dg_scale", out.dtype)
        item, ptr, keep_ptr = out.element_size(), out.data_ptr(), keep.data_ptr()
        tasks += [(fn, ptr + a * item, keep_ptr + a, m) for a, m in _native.ranges(out.numel())]
    _native.run_ranges(tasks, lambda t: t[0](t[1], t[2], t[3], kept_factor, other_factor))


def _agr_rand_parallel(
    groups: list[_Group], num_tensors: int, generator: torch.Generator, rule: str, scale: float
) -> tuple[float, int, float]:
    """The parallel stream: standard-normal noise first, drawn into the outputs by the
    lanes; then the blocked masked sum keeps it at the disagreeing components only;
    last, those are multiplied by sigma. Returns (agreeing, total, sigma)."""
    scratch = _Scratch(groups)
    _draw_lanes(groups, num_tensors, generator)
    l1 = [0.0]
    agree = 0.0
    total = 0
    keeps: list[Tensor] = []
    for grp in groups:
        n = grp.out.numel()
        keep = torch.empty(n, dtype=torch.bool, device=grp.out.device)
        agree += _masked_domain_sum(grp.flat, grp.out, scratch, rule, keep=keep, l1=l1, noise_in_out=True)
        keeps.append(keep)
        total += n
    sigma = scale * l1[0] / agree if agree > 0 else 0.0
    if agree < total:
        # sigma 0, or NaN from NaN input: the disagreeing components are 0 (NaN stays NaN)
        _scale_noise(groups, keeps, sigma if sigma > 0.0 else 0.0, scale, scratch)
    elif scale != 1.0:
        for grp in groups:
            grp.out.mul_(scale)
    return agree, total, sigma


def _lane_pieces(groups: list[_Group], num_tensors: int) -> list[list[Tensor]]:
    """The output slices each lane draws, in order: tensor ``t``'s part of chunk ``c``
    goes to lane ``c % _NOISE_LANES``, chunks counted over all tensors in input order
    (so the pieces depend on the tensors' sizes only, not on the packing)."""
    where: list[tuple[Tensor, int, int]] = [(torch.empty(0), 0, 0)] * num_tensors
    for grp in groups:
        for t, o, n in zip(grp.members, grp.offsets, grp.sizes):
            where[t] = (grp.out, o, n)
    lanes: list[list[Tensor]] = [[] for _ in range(_NOISE_LANES)]
    start = 0
    for out, o, n in where:
        a = 0
        while a < n:
            c = (start + a) // _NOISE_CHUNK
            e = min(n, (c + 1) * _NOISE_CHUNK - start)
            lanes[c % _NOISE_LANES].append(out[o + a : o + e])
            a = e
        start += n
    return lanes


def _draw_lanes(groups: list[_Group], num_tensors: int, generator: torch.Generator) -> None:
    """Standard-normal values into every group's output, lane by lane (see agr_rand).

    On the CPU up to ``torch.get_num_threads()`` threads, the calling one included, take
    the lanes in turn (thread ``w`` of ``W`` draws lanes ``w, w + W, ...``; ``normal_``
    runs on one thread per call and releases the GIL). Each lane is drawn whole, in
    order, by one thread, so the values do not depend on the number of threads.
    """
    device = generator.device
    seeds = torch.randint(0, 2**63 - 1, (_NOISE_LANES,), generator=generator, device=device).tolist()
    lanes = [(seed, pieces) for seed, pieces in zip(seeds, _lane_pieces(groups, num_tensors)) if pieces]

    def draw(mine: list[tuple[int, list[Tensor]]]) -> None:
        for seed, pieces in mine:
            lane = torch.Generator(device=device)
            lane.manual_seed(seed)
            for piece in pieces:
                piece.normal_(generator=lane)

    workers = min(len(lanes), torch.get_num_threads()) if device.type == "cpu" else 1
    if workers <= 1:
        draw(lanes)
        return
    with ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="agr_rand") as pool:
        helpers = [pool.submit(draw, lanes[w::workers]) for w in range(1, workers)]
        draw(lanes[0::workers])
        for helper in helpers:
            helper.result()


def _scale_noise(groups: list[_Group], keeps: list[Tensor], sigma: float, scale: float, scratch: _Scratch) -> None:
    """Blocked ``out *= scale`` where ``keep``, ``out *= sigma`` elsewhere: the
    standard-normal noise left at the disagreeing components becomes ``N(0, sigma^2)``.

    The factor is ``scale + (keep - 1) * (scale - sigma)``: exactly ``scale`` where
    ``keep`` (so the agreeing sums are those of Agr-Sum), ``sigma`` up to one rounding
    elsewhere (arithmetic on the 0/1 mask is cheaper than ``torch.where`` on a CPU).
    """
    for grp, keep in zip(groups, keeps):
        out = grp.out
        n = out.numel()
        for a in range(0, n, scratch.chunk):
            e = min(n, a + scratch.chunk)
            (factor,) = scratch.get(out.dtype, e - a, 1)
            factor.copy_(keep[a:e].view(torch.uint8))  # from uint8: far cheaper than from bool
            factor.sub_(1.0).mul_(scale - sigma).add_(scale)
            out[a:e].mul_(factor)


def _agr_rand_sequential(
    groups: list[_Group], generator: torch.Generator, rule: str, scale: float
) -> tuple[float, int, float]:
    """The sequential stream (domaingrad 0.1.0): Agr-Sum first, then the noise drawn
    tensor by tensor from ``generator``. Returns (agreeing, total, sigma)."""
    l1 = [0.0]
    agree = 0.0
    total = 0
    scratch = _Scratch(groups)
    keeps: list[Tensor] = []
    place: dict[int, tuple[int, int, int, bool]] = {}  # tensor -> group, offset, size, noisy
    for gi, grp in enumerate(groups):
        n = grp.out.numel()
        keep = torch.empty(n, dtype=torch.bool, device=grp.out.device)
        kept = _masked_domain_sum(grp.flat, grp.out, scratch, rule, keep=keep, l1=l1)
        if scale != 1.0:
            grp.out.mul_(scale)
        keeps.append(keep)
        agree += kept
        total += n
        counts = _segment_sums(keep, grp.sizes) if grp.packed else [kept]
        for t, o, size, c in zip(grp.members, grp.offsets, grp.sizes, counts):
            place[t] = (gi, o, size, c < size)
    sigma = scale * l1[0] / agree if agree > 0 else 0.0
    if sigma > 0.0 and agree < total:
        _draw_noise(groups, place, keeps, sigma, generator, scratch)
    return agree, total, sigma


def _draw_noise(
    groups: list[_Group],
    place: dict[int, tuple[int, int, int, bool]],
    keeps: list[Tensor],
    sigma: float,
    generator: torch.Generator,
    scratch: _Scratch,
) -> None:
    """Agr-Rand's sequential noise, added in place at the disagreeing components.

    Drawn tensor by tensor in the input order (the stream of ``torch.randn(param.shape,
    generator=generator)`` for each tensor with at least one disagreeing component),
    then added at the disagreeing components. ``place[t]`` is ``(group, offset, size,
    noisy)`` of tensor ``t``; ``keeps[g]`` the agreement mask of group ``g``.
    """
    noise = [torch.zeros_like(grp.out) if grp.packed else None for grp in groups]
    big: dict[torch.dtype, Tensor] = {}
    for t in range(len(place)):
        gi, o, size, noisy = place[t]
        if not noisy:
            continue
        grp = groups[gi]
        buf = noise[gi]
        if buf is not None:  # packed: draw into its slice, add below in one go
            buf[o : o + size].normal_(generator=generator)
            continue
        dtype = grp.out.dtype
        if dtype not in big:
            largest = max(gr.out.numel() for gr in groups if gr.out.dtype == dtype)
            big[dtype] = torch.empty(largest, dtype=dtype, device=grp.out.device)
        z = big[dtype][:size]
        z.normal_(generator=generator)  # same values as torch.randn(size, generator)
        _add_noise(grp.out, z, keeps[gi], sigma, scratch)
    for grp, buf, keep in zip(groups, noise, keeps):
        if buf is not None:
            _add_noise(grp.out, buf, keep, sigma, scratch)


def _add_noise(out: Tensor, noise: Tensor, keep: Tensor, sigma: float, scratch: _Scratch) -> None:
    """``out += sigma * noise`` where ``keep`` is False (blocked; ``noise`` is clobbered).

    ``out`` is exactly zero at those components (Agr-Sum), so this sets them to the noise.
    """
    n = out.numel()
    for a in range(0, n, scratch.chunk):
        e = min(n, a + scratch.chunk)
        (dis,) = scratch.get(out.dtype, e - a, 1)
        dis.copy_(keep[a:e].view(torch.uint8))  # from uint8: far cheaper than from bool
        dis.sub_(1.0)  # 0 where agreeing, -1 where not
        z = noise[a:e].mul_(dis)
        out[a:e].sub_(z, alpha=sigma)


class AgrRand(_Rule):
    """Agr-Rand as a configured object: ``AgrRand(generator=g, **options)(grads)`` is
    :func:`agr_rand` ``(grads, generator=g, **options)``, with the same defaults.

    The generator is kept and advanced by every call (so consecutive calls draw fresh
    noise and a seeded generator makes a run reproducible).

    Args:
        generator: source of the noise (required, as for the function), on the tensors'
            device.
        rule: ``"paper"`` (default) or ``"official"`` agreement, see :func:`agreement_mask`.
        reduction: ``"sum"`` (default, the paper) or ``"mean"`` (divide by D).
        noise: ``"counter"`` (default), ``"parallel"`` or ``"sequential"`` (earlier
            defaults, bit-identical with earlier runs), see :func:`agr_rand`.

    Raises:
        ValueError: for an option outside its documented values (when constructed).

    Example (only component 0 agrees; its sum 4 is kept and sets the noise scale
    sigma = mean |agreeing sums| = 4 of the two others):

    >>> import torch
    >>> from domaingrad.gradients.surgery import AgrRand
    >>> rule = AgrRand(generator=torch.Generator().manual_seed(0))
    >>> result = rule([torch.tensor([[1.0, 2.0, -1.0], [3.0, -1.0, 1.0]])])
    >>> result.grads[0][0].item(), result.stats["sigma"]
    (4.0, 4.0)
    >>> rule
    AgrRand(generator=torch.Generator(device='cpu'), rule='paper', reduction='sum', noise='counter')
    """

    _options = ("generator", "rule", "reduction", "noise")

    def __init__(
        self,
        *,
        generator: torch.Generator,
        rule: AgreementRule = "paper",
        reduction: Reduction = "sum",
        noise: NoiseStream = "counter",
    ) -> None:
        _check_generator(generator, optional=False)
        _check_option(rule, ("paper", "official"), "rule")
        _check_option(reduction, ("sum", "mean"), "reduction")
        _check_option(noise, _NOISE_STREAMS, "noise")
        self.generator = generator
        self.rule = rule
        self.reduction = reduction
        self.noise = noise

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`agr_rand` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return agr_rand(grads, generator=self.generator, rule=self.rule, reduction=self.reduction, noise=self.noise)
