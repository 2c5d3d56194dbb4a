"""Gradient surgery: combine per-domain gradients into one update.

Representation
--------------
Every function takes ``grads``, a sequence with one tensor per model parameter.
Tensor ``t`` has shape ``(D, *param_t.shape)``: the domain axis comes first and
``grads[t][d]`` is the gradient of domain ``d``'s mean loss with respect to parameter
``t``. ``D >= 1`` must be the same for every tensor, all tensors must be floating point
and live on one device. Every rule returns a :class:`SurgeryResult` whose ``grads`` has
one tensor of shape ``param_t.shape`` per parameter, in the input's dtype and device,
ready to be written into ``param.grad``; ``stats`` holds plain Python floats.

Rules (source in brackets)
--------------------------
* :func:`agreement_mask`, :func:`agr_sum`, :func:`agr_rand` -- sign agreement,
  Mansilla et al., "Domain Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(4).
* :func:`pcgrad` -- Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS
  2020, Alg. 1, in the domain version of Mansilla et al. (sec. 4, eq. (5)).
* :func:`corgrad` -- Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
  Perspective of Gradient Granularity", ECAI 2024 (CorGrad): layering + slicing (sec.
  3.4), conflict elimination (sec. 3.6, eqs. (12)-(13)), smoothing of dominant gradients
  (sec. 3.5, eq. (11)), Algorithm 1; statistics of eq. (3) and secs. 4.2-4.3.
* :func:`and_mask` -- Parascandolo et al., "Learning explanations that are hard to vary",
  ICLR 2021, as implemented in DomainBed (``ANDMask``).
* :func:`sand_mask` -- Shahtalebi et al., "SAND-mask", 2021, as implemented in DomainBed
  (``SANDMask``).

Paper rule (default) versus official-code behaviour (option)
------------------------------------------------------------
* Agreement (:func:`agreement_mask`, Agr-Sum, Agr-Rand): ``rule="paper"`` (default):
  all D signs equal, so a component that is zero in every domain agrees;
  ``rule="official"``: ``|sum_d sign(g_d)| == D`` (Mansilla et al.'s code), an exact zero
  disagrees.
* Agr-Rand: the official code's sigma is 0/0 = NaN when nothing agrees; domaingrad
  guards it (zero update, never NaN).
* PCGrad: ``reference="original"`` (default, paper: project on unprojected gradients);
  ``reference="projected"``: implementations whose buffers alias see already projected
  references. ``eps=1e-12`` is added to ``||g_j||^2``; ``eps=0`` is the official code.
* CorGrad: every default is the paper's rule; :data:`OFFICIAL_CORGRAD_OPTIONS` gives the
  authors' code. Slicing: ``slicing="flat"`` (paper: n equal pieces of the flattened
  layer, n from the layer's size, ``slices="auto"``) or ``"dim0"`` (official
  ``torch.chunk(param, 10, dim=0)``); no piece below ``min_slice`` elements (16;
  official: 1). Projection: sequential PCGrad per piece against the ORIGINAL gradients,
  the other domains in a random order per domain (paper, sec. 3.7 and Algorithm 1);
  ``order="index", reference="projected"`` reproduces the official code's index order
  and aliasing; ``projection="simultaneous"`` is a labelled non-default option that is
  not a projection. Smoothing: ``"dominant"`` (paper: norm > mean + std, mixed with the
  mean of all D) or ``"two_sided"`` (official: |norm - mean| > std, mixed with the mean
  of the non-outliers); alpha ``"decay"`` (paper: from alpha to 0 over the run) or
  ``"constant"`` (official).
* Ties (PCGrad, CorGrad): a dot product within ``1e-10`` of the scales of its two
  vectors is no conflict (the official codes test ``dot < 0`` and count rounding
  ties); Gram matrices are float64 whatever the input dtype, so no conflict decision
  depends on summation order, tensor sizes or the torch version.
* ANDMask / SANDMask: DomainBed's definitions (SANDMask with DomainBed's default
  ``tau = 1`` is a zero update; see :func:`sand_mask`).

Reduction: the papers SUM the domain gradients (Mansilla et al. eq. (3), CorGrad
Algorithm 1 line 12, PCGrad). ``reduction="mean"`` is domaingrad's option: the combined
gradient is divided by ``D`` (the scale of ERM on the average loss). ANDMask/SANDMask
follow DomainBed, which averages, and have no such option.

Implementation notes
--------------------
* PCGrad and CorGrad never materialise projected copies: every projected gradient is a
  linear combination of the original ones, so the rules run on small ``D x D`` Gram and
  coefficient matrices (float64 products and sums, blocked, for every input dtype and
  for packed and unpacked tensors alike) and the output comes from one weighted
  combination pass in the input dtype (float32 for half types).
* The elementwise rules run in blocks of ``_CHUNK`` elements with reused temporaries,
  and tensors smaller than ``_SMALL`` elements are concatenated and processed together.
  Consequently the output tensors of small parameters are non-overlapping views of one
  shared buffer (each is contiguous and has the parameter's shape).
* Python loops run over parameter tensors, blocks and domain pairs only, never over
  elements or slices.
* NaN in the input propagates to the output of the summing rules (a NaN component
  never counts as agreeing, but ``NaN * 0`` is NaN).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SurgeryResult",
    "agreement_mask",
    "agr_sum",
    "agr_rand",
    "pcgrad",
    "corgrad",
    "OFFICIAL_CORGRAD_OPTIONS",
    "and_mask",
    "sand_mask",
    "auto_slices",
]

Reduction = Literal["sum", "mean"]
AgreementRule = Literal["paper", "official"]
Reference = Literal["original", "projected"]

# Relative margin used when flagging norm outliers in CorGrad's smoothing; see corgrad().
_OUTLIER_RTOL = 1e-9


@dataclass
class SurgeryResult:
    """Output of a gradient-surgery rule.

    Attributes:
        grads: one tensor per parameter, shape ``param.shape``, same dtype/device as the
            corresponding input tensor.
        stats: statistics of the call as plain Python floats (keys depend on the rule:
            ``agree_frac``, ``conflict_pairs``, ``mod_freq``, ``mod_ratio``,
            ``mask_frac``, ...).
    """

    grads: list[Tensor]
    stats: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _check_option(value: object, allowed: Sequence[object], name: str) -> None:
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ValueError(f"{name} must be one of {list(allowed)!r}, got {value!r}")


def _validate(grads: Sequence[Tensor]) -> tuple[list[Tensor], int]:
    """Check the per-domain gradient list and return it as a list with its D."""
    if isinstance(grads, Tensor):
        raise ValueError(
            "grads must be a sequence of tensors (one per parameter, each of shape "
            "(D, *param.shape)), got a single tensor; wrap it in a list"
        )
    tensors = list(grads)
    if not tensors:
        raise ValueError("grads is empty: expected one tensor of shape (D, *param.shape) per parameter")
    num_domains: int | None = None
    device = None
    for t, g in enumerate(tensors):
        if not isinstance(g, Tensor):
            raise ValueError(f"grads[{t}] is a {type(g).__name__}, expected a torch.Tensor")
        if g.dim() < 1:
            raise ValueError(
                f"grads[{t}] is 0-dimensional; each tensor needs a leading domain axis, "
                "shape (D, *param.shape)"
            )
        if not g.is_floating_point():
            raise ValueError(f"grads[{t}] has dtype {g.dtype}; gradients must be floating point")
        d = int(g.shape[0])
        if d < 1:
            raise ValueError(f"grads[{t}] has D = {d} domains on axis 0; need D >= 1")
        if num_domains is None:
            num_domains, device = d, g.device
        elif d != num_domains:
            raise ValueError(
                f"inconsistent number of domains: grads[0] has D = {num_domains} on axis 0 "
                f"but grads[{t}] has D = {d}"
            )
        elif g.device != device:
            raise ValueError(f"grads[{t}] is on {g.device} but grads[0] is on {device}")
    assert num_domains is not None
    return tensors, num_domains


def _scale(reduction: str, num_domains: int) -> float:
    _check_option(reduction, ("sum", "mean"), "reduction")
    return 1.0 if reduction == "sum" else 1.0 / num_domains


# --------------------------------------------------------------------- sign agreement

# Elements per block of the blocked elementwise kernels: the temporaries of a block stay
# in cache and are reused across blocks and tensors (fresh full-size temporaries cost
# page faults and memory traffic that dominate these memory-bound rules on CPU).
_CHUNK = 1 << 18
# Tensors with fewer elements are packed (concatenated) and processed together, so
# that the per-call overhead is paid once for all the small tensors (biases, norms).
_SMALL = 1 << 14


@dataclass
class _Group:
    """Tensors processed together: one large tensor, or all small tensors of a dtype.

    ``flat`` is ``(D, N)``: the members' flattened gradients side by side (a view for a
    single tensor, a copy for a pack); ``out`` is the ``(N,)`` combined result, and
    member ``k`` occupies ``[offsets[k], offsets[k] + sizes[k])`` of both.
    """

    members: list[int]
    offsets: list[int]
    sizes: list[int]
    flat: Tensor
    out: Tensor

    @property
    def packed(self) -> bool:
        return len(self.members) > 1


def _make_groups(tensors: list[Tensor], num_domains: int) -> list[_Group]:
    groups: list[_Group] = []
    small: dict[torch.dtype, list[int]] = {}
    for t, g in enumerate(tensors):
        n = g[0].numel()
        if n < _SMALL:
            small.setdefault(g.dtype, []).append(t)
            continue
        flat = g.reshape(num_domains, n)
        groups.append(_Group([t], [0], [n], flat, torch.empty(n, dtype=g.dtype, device=g.device)))
    for dtype, members in small.items():
        sizes = [tensors[t][0].numel() for t in members]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        total = offsets[-1] + sizes[-1]
        if len(members) == 1:
            flat = tensors[members[0]].reshape(num_domains, total)
        else:
            flat = torch.cat([tensors[t].reshape(num_domains, n) for t, n in zip(members, sizes)], dim=1)
        out = torch.empty(total, dtype=dtype, device=flat.device)
        groups.append(_Group(members, offsets, sizes, flat, out))
    return groups


def _unpack(groups: list[_Group], tensors: list[Tensor]) -> list[Tensor]:
    """Per-parameter results (views of the groups' outputs), in the input order."""
    out: list[Tensor | None] = [None] * len(tensors)
    for grp in groups:
        for t, o, n in zip(grp.members, grp.offsets, grp.sizes):
            out[t] = grp.out[o : o + n].view(tensors[t].shape[1:])
    return [r for r in out if r is not None]


def _segment_sums(values: Tensor, sizes: list[int]) -> list[float]:
    """Sums of consecutive segments of ``values`` (one Python float per segment)."""
    if len(sizes) == 1:
        return [float(values.sum(dtype=torch.float64).item())]
    lengths = torch.tensor(sizes, device=values.device)
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=values.device), lengths)
    sums = torch.zeros(len(sizes), dtype=torch.float64, device=values.device)
    sums.index_add_(0, segment, values.to(torch.float64))
    return [float(v) for v in sums.tolist()]


class _Scratch:
    """Reusable temporaries, one set per dtype, of at most ``_CHUNK`` elements."""

    def __init__(self, groups: list[_Group]) -> None:
        self._size = max(1, min(_CHUNK, max((grp.out.numel() for grp in groups), default=1)))
        self._device = groups[0].out.device if groups else torch.device("cpu")
        self._bufs: dict[torch.dtype, list[Tensor]] = {}

    def get(self, dtype: torch.dtype, n: int, count: int = 2) -> list[Tensor]:
        """``count`` distinct buffers of ``n`` elements (``n <= _CHUNK``)."""
        bufs = self._bufs.setdefault(dtype, [])
        while len(bufs) < count:
            bufs.append(torch.empty(self._size, dtype=dtype, device=self._device))
        return [b[:n] for b in bufs[:count]]


def _count(mask: Tensor) -> Tensor:
    """Exact number of ones in a 0/1 float block of at most ``_CHUNK`` elements."""
    if mask.dtype in (torch.float16, torch.bfloat16):
        return mask.sum(dtype=torch.float32)
    return mask.sum()


def _masked_domain_sum(
    g2: Tensor,
    out: Tensor,
    scratch: _Scratch,
    mask_rule: str,
    tau: float = 1.0,
    keep: Tensor | None = None,
    l1: list[float] | None = None,
) -> float:
    """Blocked ``out = mask * sum_d g2[d]``; returns the number of kept components.

    Args:
        g2: ``(D, n)`` flat per-domain gradients of one tensor.
        out: ``(n,)`` output, same dtype.
        mask_rule: ``"paper"`` (all signs equal), ``"official"`` (all strictly positive
            or all strictly negative) or ``"tau"`` (DomainBed ANDMask:
            ``|mean_d sign(g_d)| >= tau``).
        keep: optional ``(n,)`` bool tensor receiving the mask.
        l1: optional one-element list to which ``sum |out|`` is added.

    All signs are equal iff the smallest and the largest value have the same sign;
    all are strictly positive or strictly negative iff ``max(min, -max) > 0``. NaN
    never passes the mask (but a NaN sum stays NaN: ``NaN * 0 = NaN``).
    """
    num_domains, n = g2.shape
    kept = torch.zeros((), dtype=torch.float64, device=g2.device)
    abs_sum = torch.zeros((), dtype=torch.float64, device=g2.device)
    for a in range(0, n, _CHUNK):
        e = min(n, a + _CHUNK)
        x = g2[:, a:e]
        s = out[a:e]
        lo, hi = scratch.get(g2.dtype, e - a)
        if num_domains == 1:
            s.copy_(x[0])
        else:
            torch.add(x[0], x[1], out=s)
            for d in range(2, num_domains):
                s.add_(x[d])
        if mask_rule == "tau":
            torch.sign(x[0], out=lo)
            for d in range(1, num_domains):
                torch.sign(x[d], out=hi)
                lo.add_(hi)
            lo.div_(num_domains).abs_()
            torch.ge(lo, tau, out=hi)
        else:
            if num_domains == 1:
                lo.copy_(x[0])
                hi.copy_(x[0])
            else:
                torch.minimum(x[0], x[1], out=lo)
                torch.maximum(x[0], x[1], out=hi)
                for d in range(2, num_domains):
                    torch.minimum(lo, x[d], out=lo)
                    torch.maximum(hi, x[d], out=hi)
            if mask_rule == "paper":
                lo.sign_()
                hi.sign_()
                torch.eq(lo, hi, out=hi)
            else:
                hi.neg_()
                torch.maximum(lo, hi, out=lo)
                torch.gt(lo, 0, out=hi)
        s.mul_(hi)
        kept += _count(hi)
        if keep is not None:
            keep[a:e].copy_(hi)
        if l1 is not None:
            acc_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
            abs_sum += torch.abs(s, out=lo).sum(dtype=acc_dtype)
    if l1 is not None:
        l1[0] += float(abs_sum.item())
    return float(kept.item())


def _agree(g: Tensor, rule: str) -> Tensor:
    """Agreement mask Phi of one tensor, ``(D, *s) -> bool (*s)`` (see _masked_domain_sum)."""
    mn, mx = g.amin(0), g.amax(0)
    if rule == "paper":
        return torch.sign(mn) == torch.sign(mx)
    return torch.maximum(mn, -mx) > 0


def agreement_mask(grads: Sequence[Tensor], *, rule: AgreementRule = "paper") -> list[Tensor]:
    """Sign-agreement indicator Phi of Mansilla et al. (ICCV 2021), eq. (2).

    Args:
        grads: per-domain gradients, tensor ``t`` of shape ``(D, *param_t.shape)``.
        rule: ``"paper"`` (default): ``Phi_k = 1`` iff ``sgn(g_k^1) = ... = sgn(g_k^D)``,
            so a component that is exactly zero in every domain agrees.
            ``"official"``: the authors' code, ``|sum_d sgn(g_k^d)| == D``, so any exact
            zero counts as disagreement. The two rules differ exactly at the components
            that are zero in every domain.

    Returns:
        One bool tensor of shape ``param_t.shape`` per parameter. NaN never agrees.
    """
    tensors, _ = _validate(grads)
    _check_option(rule, ("paper", "official"), "rule")
    with torch.no_grad():
        return [_agree(g, rule) for g in tensors]


def agr_sum(
    grads: Sequence[Tensor],
    *,
    rule: AgreementRule = "paper",
    reduction: Reduction = "sum",
) -> SurgeryResult:
    """Agr-Sum consensus of Mansilla et al. (ICCV 2021), eq. (3).

    ``g*_k = sum_d g_k^d`` where all domains agree in sign (``Phi_k = 1``, see
    :func:`agreement_mask` for ``rule``), else ``0``. The paper sums; ``reduction="mean"``
    (domaingrad's option) divides by ``D``.

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.

    Returns:
        grads of shapes ``param_t.shape``; stats ``agree_frac`` (fraction of all
        components, over the whole network, on which the domains agree). Components
        with a NaN count as disagreeing but their (NaN) sum propagates.
    """
    tensors, num_domains = _validate(grads)
    _check_option(rule, ("paper", "official"), "rule")
    scale = _scale(reduction, num_domains)
    agree = 0.0
    total = 0
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
        scratch = _Scratch(groups)
        for grp in groups:
            agree += _masked_domain_sum(grp.flat, grp.out, scratch, rule)
            if scale != 1.0:
                grp.out.mul_(scale)
            total += grp.out.numel()
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"agree_frac": agree / total if total else 1.0})


def agr_rand(
    grads: Sequence[Tensor],
    *,
    generator: torch.Generator,
    rule: AgreementRule = "paper",
    reduction: Reduction = "sum",
) -> SurgeryResult:
    """Agr-Rand consensus of Mansilla et al. (ICCV 2021), eq. (4).

    As :func:`agr_sum`, but every disagreeing component is drawn from
    ``N(0, sigma^2)`` with ``sigma = mean_{p in A} |g*_p|``, ``A`` the agreeing components
    of the WHOLE network (all tensors together; with ``rule="paper"`` the all-zero
    components are in ``A``).

    Guard (domaingrad's choice): the official code computes sigma as 0/0 = NaN when no
    component agrees. Here sigma is then 0, i.e. the update is all zeros (there is no
    consensus to follow and no scale for the noise); the result is never NaN for finite
    input. When ``sigma == 0`` no noise is drawn.

    Noise: for each tensor with at least one disagreeing component, in order, one
    standard-normal draw per component (``torch.randn(param.shape, generator=generator,
    dtype=param.dtype)``, of which the disagreeing positions are used), so the same
    generator state gives the same result. ``generator`` must be on the tensors'
    device. With ``reduction="mean"`` the whole result, noise included, is divided by
    ``D`` (equivalently, sigma is computed from the averaged consensus).

    Returns:
        grads of shapes ``param_t.shape``; stats ``agree_frac`` and ``sigma`` (the
        standard deviation used, after the reduction).
    """
    tensors, num_domains = _validate(grads)
    _check_option(rule, ("paper", "official"), "rule")
    scale = _scale(reduction, num_domains)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    l1 = [0.0]
    agree = 0.0
    total = 0
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
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
            # Draw the noise tensor by tensor in the input order (the stream of
            # torch.randn(param.shape, generator=generator) for each tensor with at least
            # one disagreeing component), then add it at the disagreeing components.
            noise = [torch.zeros_like(grp.out) if grp.packed else None for grp in groups]
            big: dict[torch.dtype, Tensor] = {}
            for t in range(len(tensors)):
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
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"agree_frac": agree / total if total else 1.0, "sigma": sigma})


def _add_noise(out: Tensor, noise: Tensor, keep: Tensor, sigma: float, scratch: _Scratch) -> None:
    """``out += sigma * noise`` where ``keep`` is False (blocked; ``noise`` is clobbered).

    ``out`` is exactly zero at those components (Agr-Sum), so this sets them to the noise.
    """
    n = out.numel()
    for a in range(0, n, _CHUNK):
        e = min(n, a + _CHUNK)
        (dis,) = scratch.get(out.dtype, e - a, 1)
        dis.copy_(keep[a:e])
        dis.sub_(1.0)  # 0 where agreeing, -1 where not
        z = noise[a:e].mul_(dis)
        out[a:e].sub_(z, alpha=sigma)


# ------------------------------------------------------ Gram-matrix machinery (PCGrad)


# Elements per domain in one block of the float64 Gram products: the float64 copy of a
# block stays in cache (measured on CPU: 2^16 beats 2^14 and 2^18 for D = 3 to 8).
_GRAM_CHUNK = 1 << 16


def _gram_run(x: Tensor) -> Tensor:
    """Per-piece Gram matrices of a uniform run. ``x: (D, P, K) -> (P, D, D)`` float64.

    Every product and every sum is formed in float64, whatever the input dtype (the
    products of float32 or half values are then exact), on blocks copied into one
    reused contiguous float64 buffer of at most ``_GRAM_CHUNK`` elements per domain.
    Packed small tensors (:func:`_segment_gram`) use the same precision, so a Gram
    matrix -- and every conflict decision taken on it -- does not depend on the size of
    a tensor or on how it is blocked, beyond float64 rounding.
    """
    num_domains, num_pieces, k = x.shape
    out = torch.zeros(num_pieces, num_domains, num_domains, dtype=torch.float64, device=x.device)
    if k == 0 or num_pieces == 0:
        return out
    if k >= _GRAM_CHUNK or num_pieces == 1:  # piece by piece, each in blocks of columns
        buf = torch.empty(num_domains, min(k, _GRAM_CHUNK), dtype=torch.float64, device=x.device)
        for p in range(num_pieces):  # at most numel / _GRAM_CHUNK pieces here
            for a in range(0, k, _GRAM_CHUNK):
                v = x[:, p, a : a + _GRAM_CHUNK]
                blk = buf[:, : v.shape[1]]
                blk.copy_(v)
                out[p] += blk @ blk.T
        return out
    per_block = max(1, _GRAM_CHUNK // k)  # whole pieces per block
    buf = torch.empty(min(per_block, num_pieces), num_domains, k, dtype=torch.float64, device=x.device)
    for p0 in range(0, num_pieces, per_block):
        xs = x[:, p0 : p0 + per_block, :]
        blk = buf[: xs.shape[1]]
        blk.copy_(xs.transpose(0, 1))  # (P', D, K), contiguous: the fast batched product
        torch.bmm(blk, blk.transpose(1, 2), out=out[p0 : p0 + xs.shape[1]])
    return out


def _combine_run(x: Tensor, coef: Tensor, out: Tensor) -> None:
    """``out[p, :] = sum_d coef[p, d] * x[d, p, :]``; x ``(D, P, K)``, coef ``(P, D)``,
    out a contiguous ``(P, K)`` view. Half types are combined in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        _combine_run(x.float(), coef, tmp)
        out.copy_(tmp)
        return
    c = coef.to(dtype=x.dtype)
    if x.shape[1] == 1:
        torch.mm(c, x[:, 0, :], out=out)
    else:
        torch.bmm(c.unsqueeze(1), x.transpose(0, 1), out=out.unsqueeze(1))


# Relative tolerances of the Gram-matrix rules. The Gram matrices are float64 (see
# _gram_run), so the rounding of a quadratic form w^T G r built from them is of order
# 1e-16 * s_w * s_r, with s_v = sum_k |V_k| ||g_k|| the scale of a vector v = sum_k V_k g_k
# given by its coefficients on the original gradients (s_v >= ||v||).
#: a conflict needs <w, r> < -_CONFLICT_RTOL * s_w * s_r: a dot product within this band of
#: zero (an exact tie such as a pair made orthogonal by an earlier projection, or a
#: |cos| below 1e-10, whose projection would change w by less than 1e-10 of its scale)
#: is no conflict, so no decision depends on summation order.
_CONFLICT_RTOL = 1e-10
#: a (projected) vector with ||v||^2 <= _ZERO_RTOL * s_v^2 is rounding noise: it counts as
#: the zero vector (no direction to project on; zero norm in the smoothing).
_ZERO_RTOL = 1e-10


def _scales(coefs: Tensor, norms: Tensor) -> Tensor:
    """``s_v = sum_k |V_k| ||g_k||`` for coefficient rows ``coefs (P, D)``, ``norms (P, D)``."""
    return (coefs.abs() * norms).sum(-1)


def _project_sequential(
    gram: Tensor, i_order: Sequence[int], j_orders: Sequence[Sequence[int]], reference: str, eps: float
) -> tuple[Tensor, int, float]:
    """Sequential PCGrad on coefficient matrices, batched over pieces.

    Args:
        gram: ``(P, D, D)`` float64 Gram matrices of the original gradients.
        i_order: order in which the domains are projected (matters only with
            ``reference="projected"``).
        j_orders: ``j_orders[i]``: the other domains, in the order domain ``i`` is
            projected against them.
        reference: ``"original"`` (g_j unprojected) or ``"projected"`` (g_j's current,
            possibly already projected, value).

    A pair conflicts when ``<g_i^pc, r> < -_CONFLICT_RTOL * s_i * s_r`` (see the
    constant); a reference of rounding-level norm (``_ZERO_RTOL``) is skipped, as an
    exactly zero one would be.

    Returns:
        W ``(P, D, D)`` with ``g_i^pc = sum_k W[p, i, k] g_k`` on piece ``p``, the number
        of projections made and the sum of their modification ratios
        ``||projection|| / ||g_i^pc||`` (clipped to 1, its exact-arithmetic bound).
    """
    num_pieces, num_domains, _ = gram.shape
    eye = torch.eye(num_domains, dtype=gram.dtype, device=gram.device)
    weights = eye.expand(num_pieces, num_domains, num_domains).clone()
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (P, D)
    count = torch.zeros((), dtype=torch.int64, device=gram.device)
    ratio = torch.zeros((), dtype=gram.dtype, device=gram.device)
    for i in i_order:
        w = weights[:, i, :].clone()
        gw = torch.bmm(gram, w.unsqueeze(-1)).squeeze(-1)  # G w, updated with w below
        for j in j_orders[i]:
            if reference == "projected":
                r = weights[:, j, :]
                gr = torch.bmm(gram, r.unsqueeze(-1)).squeeze(-1)
                rr = (r * gr).sum(-1)
                dot = (w * gr).sum(-1)
            else:  # r = e_j: G r is column j of G
                r = eye[j].expand(num_pieces, -1)
                gr = gram[:, :, j]
                rr = gram[:, j, j]
                dot = gw[:, j]
            ww = (w * gw).sum(-1)
            scale_r = _scales(r, norms)
            conflict = (dot < -_CONFLICT_RTOL * _scales(w, norms) * scale_r) & (
                rr > _ZERO_RTOL * scale_r * scale_r)
            coef = torch.where(conflict, dot / (rr + eps), torch.zeros_like(dot))
            # ||coef * g_j|| / ||g_i^pc|| (= |cos| when eps = 0)
            proj_ratio = coef.abs() * rr.clamp_min(0).sqrt() / ww.clamp_min(1e-300).sqrt()
            count += conflict.sum()
            ratio += torch.where(conflict, proj_ratio.clamp_max(1.0), torch.zeros_like(proj_ratio)).sum()
            w = w - coef.unsqueeze(1) * r
            gw = gw - coef.unsqueeze(1) * gr
        weights[:, i, :] = w
    return weights, int(count.item()), float(ratio.item())


def _project_simultaneous(gram: Tensor, eps: float) -> tuple[Tensor, int, float]:
    """Order-free variant (NOT a projection): every conflict uses ORIGINAL gradients.

    ``g_i^pc = g_i - sum_{j != i, <g_i, g_j> < -tol} <g_i, g_j> / (||g_j||^2 + eps) g_j``,
    ``tol = _CONFLICT_RTOL ||g_i|| ||g_j||``. Same returns as :func:`_project_sequential`.
    """
    num_domains = gram.shape[-1]
    eye = torch.eye(num_domains, dtype=gram.dtype, device=gram.device)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)  # (P, D): ||g_j||^2
    norms = diag.clamp_min(0).sqrt()
    norm_j = diag.unsqueeze(1)  # broadcast over i: [p, i, j] -> ||g_j||^2
    off = ~torch.eye(num_domains, dtype=torch.bool, device=gram.device)
    tol = _CONFLICT_RTOL * norms.unsqueeze(2) * norms.unsqueeze(1)
    conflict = (gram < -tol) & off & (norm_j > 0)
    coef = torch.where(conflict, gram / (norm_j + eps), torch.zeros_like(gram))
    weights = eye - coef
    norm_i = diag.unsqueeze(2).clamp_min(1e-300)
    proj_ratio = (coef.abs() * norm_j.clamp_min(0).sqrt() / norm_i.sqrt()).clamp_max(1.0)
    count = int(conflict.sum().item())
    ratio = float(torch.where(conflict, proj_ratio, torch.zeros_like(proj_ratio)).sum().item())
    return weights, count, ratio


def _resolve_order(
    num_domains: int, generator: torch.Generator | None, order: Sequence[int] | None
) -> list[int]:
    if order is not None:
        resolved = [int(i) for i in order]
        if sorted(resolved) != list(range(num_domains)):
            raise ValueError(f"order must be a permutation of range({num_domains}), got {list(order)!r}")
        return resolved
    if generator is not None:
        return torch.randperm(num_domains, generator=generator, device=generator.device).tolist()
    return torch.randperm(num_domains).tolist()


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_eps(eps: float) -> float:
    if not (_is_real(eps) and float(eps) >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


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
    the projections run on coefficient matrices, one pass forms ``(1^T W) g``. When no
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
    resolved = _resolve_order(num_domains, generator, order)
    with torch.no_grad():
        device = tensors[0].device
        groups = _make_groups(tensors, num_domains)
        gram = torch.zeros(1, num_domains, num_domains, dtype=torch.float64, device=device)
        for grp in groups:
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


# ---------------------------------------------------------------------------- CorGrad


@dataclass(frozen=True)
class _Piecing:
    """Cut of a flat vector into ``count_a`` pieces of ``size_a`` then ``count_b`` of
    ``size_b`` (two uniform groups describe both tensor_split and chunk)."""

    size_a: int
    count_a: int
    size_b: int
    count_b: int

    @property
    def num_pieces(self) -> int:
        return self.count_a + self.count_b


def _flat_piecing(length: int, n: int) -> _Piecing:
    """``torch.tensor_split(v, n)`` sizes (``min(n, length)`` pieces, sizes differ by <= 1)."""
    if length == 0:
        return _Piecing(0, 0, 0, 0)
    n = min(n, length)
    q, r = divmod(length, n)
    return _Piecing(q + 1, r, q, n - r)


def _dim0_piecing(shape: torch.Size, n: int) -> _Piecing:
    """``torch.chunk(t, n, dim=0)`` sizes in the flattened tensor (official CorGrad)."""
    numel = math.prod(shape)
    if numel == 0:
        return _Piecing(0, 0, 0, 0)
    if len(shape) == 0:
        return _Piecing(1, 1, 0, 0)
    rows = int(shape[0])
    row = numel // rows
    chunk = -(-rows // n)
    count = -(-rows // chunk)
    last = rows - (count - 1) * chunk
    if last == chunk:
        return _Piecing(chunk * row, count, 0, 0)
    return _Piecing(chunk * row, count - 1, last * row, 1)


def _runs(piecing: _Piecing, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Uniform runs covering the global range ``[lo, hi)`` of a pieced vector.

    Returns ``(start, count, size, first_piece)`` tuples: ``count`` consecutive pieces
    (or parts of one piece when ``count == 1``) of ``size`` elements from ``start``.
    At most 6 runs, whatever the number of pieces.
    """
    runs: list[tuple[int, int, int, int]] = []
    groups = (
        (0, piecing.size_a, piecing.count_a, 0),
        (piecing.size_a * piecing.count_a, piecing.size_b, piecing.count_b, piecing.count_a),
    )
    for g_start, size, count, piece0 in groups:
        if count == 0 or size == 0:
            continue
        a, b = max(lo, g_start), min(hi, g_start + size * count)
        if a >= b:
            continue
        k = (a - g_start) // size
        piece_start = g_start + k * size
        if a > piece_start:  # partial head piece
            e = min(b, piece_start + size)
            runs.append((a, 1, e - a, piece0 + k))
            a, k = e, k + 1
        m = (b - a) // size
        if m > 0:
            runs.append((a, m, size, piece0 + k))
            a, k = a + m * size, k + m
        if a < b:  # partial tail piece
            runs.append((a, 1, b - a, piece0 + k))
    return runs


def auto_slices(numel: int) -> int:
    """domaingrad's rule for ``slices="auto"``: ``clamp(round(sqrt(numel)), 5, 100)``.

    Reasoning: CorGrad's argument (Zhou et al., sec. 3.2, eq. (9)) is that the angle between
    random m-dimensional vectors concentrates at pi/2 with spread ~ 1/sqrt(m), so the
    modification ratio |cos| of a piece of length m is ~ 1/sqrt(m): coarse pieces (n = 1)
    give a tiny ratio, fine-grained ones (n = numel, Agr-/AND-mask) lose the context of
    neighbouring components and the frequency. Choosing n = sqrt(numel) makes the number
    of pieces equal to their length, the geometric middle between the two extremes, and
    the clamp keeps n inside the paper's range [5, 100] (n = 100 for every layer above
    10,000 parameters, i.e. pieces of >= 100 elements; small layers such as BatchNorm
    get 5 to 100). :func:`corgrad` then caps the count so that no piece holds fewer
    than ``min_slice`` elements.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return int(min(100, max(5, round(math.sqrt(numel)))))


def _alpha_at(alpha: float, schedule: str, step: int, total_steps: int) -> float:
    if schedule == "constant":
        return alpha
    if total_steps < 2:
        raise ValueError(f"alpha_schedule='decay' needs total_steps >= 2, got {total_steps}")
    value = alpha * (1.0 - math.log(step + 1) / math.log(total_steps))
    return min(alpha, max(0.0, value))


def _smoothing_coefficients(norms: Tensor, smoothing: str | None, alpha: float) -> tuple[Tensor, int]:
    """Per-unit column sums of the smoothing matrix.

    Args:
        norms: ``(U, D)`` L2 norms of the corrected unit gradients.

    Returns:
        ``a`` of shape ``(U, D)`` with ``sum_i g_i' = sum_k a[u, k] g_k^pc`` on unit ``u``,
        and the number of smoothed (domain, unit) pairs.
    """
    units, num_domains = norms.shape
    ones = torch.ones_like(norms)
    if smoothing is None or num_domains < 2:
        return ones, 0
    mean = norms.mean(1, keepdim=True)
    std = norms.std(1, unbiased=False, keepdim=True)
    margin = _OUTLIER_RTOL * norms.amax(1, keepdim=True)
    if smoothing == "dominant":
        outlier = norms - mean > std + margin
        n_out = outlier.sum(1, keepdim=True).to(norms.dtype)
        # g_i' = alpha g_i + (1 - alpha) (1/D) sum_k g_k for outliers i
        a = ones + (alpha - 1.0) * outlier.to(norms.dtype) + (1.0 - alpha) * n_out / num_domains
    else:  # two_sided
        outlier = (norms - mean).abs() > std + margin
        n_out = outlier.sum(1, keepdim=True).to(norms.dtype)
        inlier = (~outlier).to(norms.dtype)
        n_in = inlier.sum(1, keepdim=True)
        # all outliers is impossible with the population std; fall back to the mean of all
        inlier = torch.where(n_in > 0, inlier, ones)
        n_in = torch.where(n_in > 0, n_in, torch.full_like(n_in, float(num_domains)))
        # g_i' = alpha g_i + (1 - alpha) mean_{k inlier} g_k for outliers i
        a = ones + (alpha - 1.0) * outlier.to(norms.dtype) + (1.0 - alpha) * n_out * inlier / n_in
    return a, int(outlier.sum().item())


def _element_pieces(member_runs: list[list[tuple[int, int, int, int]]], device: torch.device) -> Tensor:
    """Global piece index of every element of a pack, built without a loop over pieces.

    ``member_runs[m]`` are the runs ``(start, count, size, first_piece)`` of member ``m``
    (covering it in order); members are concatenated in order.
    """
    firsts, counts, sizes = [], [], []
    for runs in member_runs:
        for _, c, k, p in runs:
            firsts.append(p)
            counts.append(c)
            sizes.append(k)
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    first = torch.tensor(firsts, dtype=torch.int64)
    count = torch.tensor(counts, dtype=torch.int64)
    size = torch.tensor(sizes, dtype=torch.int64)
    total = int(count.sum())
    run_start = torch.cumsum(count, 0) - count
    within = torch.arange(total) - torch.repeat_interleave(run_start, count, output_size=total)
    piece_ids = torch.repeat_interleave(first, count, output_size=total) + within
    piece_len = torch.repeat_interleave(size, count, output_size=total)
    return torch.repeat_interleave(piece_ids, piece_len).to(device)


def _segment_gram(flat: Tensor, elem_piece: Tensor, gram: Tensor) -> None:
    """``gram[p] += sum_{e in piece p} x_e x_e^T`` for a pack; ``flat: (D, N)``."""
    num_domains = flat.shape[0]
    x = flat.to(torch.float64)
    for i in range(num_domains):
        for j in range(i, num_domains):
            seg = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
            seg.index_add_(0, elem_piece, x[i] * x[j])
            gram[:, i, j] += seg
            if j != i:
                gram[:, j, i] += seg


def _piecing(shape: torch.Size, n: int, slicing: str, min_slice: int) -> _Piecing:
    """Pieces of one unit: at most ``n``, none below ``min_slice`` elements (see corgrad)."""
    numel = math.prod(shape)
    n = min(n, max(1, numel // min_slice))
    if slicing == "flat":
        return _flat_piecing(numel, n)
    while True:  # torch.chunk: the last chunk may be short; use fewer chunks until it is not
        piecing = _dim0_piecing(shape, n)
        smallest = piecing.size_b if piecing.count_b else piecing.size_a
        if n == 1 or smallest >= min_slice:
            return piecing
        n -= 1


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
    "slices": 10, "min_slice": 1, "slicing": "dim0", "order": "index", "reference": "projected",
    "eps": 0.0, "smoothing": "two_sided", "alpha": 0.6, "alpha_schedule": "constant",
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
    Algorithm 1. Every default is the paper's rule; :data:`OFFICIAL_CORGRAD_OPTIONS` gives the authors'
    code.

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
       sign reversed. Order (Algorithm 1 line 4, "in random order"): with ``order=None``
       (default) the domains ``i`` are taken in index order and, for each ``i``, the
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

    With ``layerwise=False, slices=1, smoothing=None, order=p`` this is exactly
    :func:`pcgrad` with ``order=p``.

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.
        generator: source of the random domain orders (``order=None``); must be on CPU
            or the tensors' device.
        step, total_steps: position in the run and its length, for
            ``alpha_schedule="decay"``; ``total_steps`` may be None only at ``step = 0``
            (where the schedule gives ``alpha`` whatever the length).
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
    if not isinstance(layerwise, bool):
        raise ValueError(f"layerwise must be a bool, got {layerwise!r}")
    if slices != "auto" and not (_is_int(slices) and int(slices) >= 1):
        raise ValueError(f"slices must be an int >= 1 or 'auto', got {slices!r}")
    if not (_is_int(min_slice) and int(min_slice) >= 1):
        raise ValueError(f"min_slice must be an int >= 1, got {min_slice!r}")
    _check_option(slicing, ("flat", "dim0"), "slicing")
    _check_option(projection, ("sequential", "simultaneous"), "projection")
    _check_option(reference, ("original", "projected"), "reference")
    _check_option(smoothing, ("dominant", "two_sided", None), "smoothing")
    _check_option(alpha_schedule, ("decay", "constant"), "alpha_schedule")
    if not (_is_real(alpha) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (_is_int(step) and int(step) >= 0):
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if total_steps is not None and not (_is_int(total_steps) and int(total_steps) >= 1):
        raise ValueError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(order, str):
        _check_option(order, ("index",), "order")
        order = range(num_domains)
    eps = _check_eps(eps)
    scale = _scale(reduction, num_domains)
    if alpha_schedule == "decay" and total_steps is None:
        if int(step) > 0:
            raise ValueError(
                "alpha_schedule='decay' (the default, the paper's rule) needs total_steps, the "
                f"length of the run in steps, at step {step} > 0; pass total_steps=T, or "
                "alpha_schedule='constant' for a fixed alpha")
        alpha_t = float(alpha)
    else:
        alpha_t = _alpha_at(float(alpha), alpha_schedule, int(step), int(total_steps or 1))
    min_slice = int(min_slice)

    def n_slices(numel: int) -> int:
        return auto_slices(numel) if slices == "auto" else int(slices)

    # Segments of each tensor: (local start, count, size, global piece index), and the
    # unit of every piece.
    numels = [g[0].numel() for g in tensors]
    segments: list[list[tuple[int, int, int, int]]] = []
    unit_of_piece: list[Tensor] = []
    device = tensors[0].device
    if layerwise:
        offset = 0
        for u, (g, numel) in enumerate(zip(tensors, numels)):
            piecing = _piecing(g.shape[1:], n_slices(numel), slicing, min_slice)
            segments.append([(s, c, k, p + offset) for s, c, k, p in _runs(piecing, 0, numel)])
            unit_of_piece.append(torch.full((piecing.num_pieces,), u, dtype=torch.int64))
            offset += piecing.num_pieces
        num_units = len(tensors)
    else:
        total = sum(numels)
        piecing = _piecing(torch.Size([total]), n_slices(total), "flat", min_slice)
        start = 0
        for numel in numels:
            segments.append([(s - start, c, k, p) for s, c, k, p in _runs(piecing, start, start + numel)])
            start += numel
        unit_of_piece.append(torch.zeros(piecing.num_pieces, dtype=torch.int64))
        num_units = 1
    units = torch.cat(unit_of_piece).to(device)
    num_pieces = int(units.numel())
    i_order, j_orders = _corgrad_orders(num_domains, generator, order)

    with torch.no_grad():
        gram = torch.zeros(num_pieces, num_domains, num_domains, dtype=torch.float64, device=device)
        groups = _make_groups(tensors, num_domains)
        # piece index of every element of the packed groups (small tensors)
        elem_piece: dict[int, Tensor] = {}
        for gi, grp in enumerate(groups):
            if grp.packed:
                elem_piece[gi] = _element_pieces([segments[t] for t in grp.members], device)
                _segment_gram(grp.flat, elem_piece[gi], gram)
            else:
                flat = grp.flat
                for s, c, k, p in segments[grp.members[0]]:
                    gram[p : p + c] += _gram_run(flat[:, s : s + c * k].view(num_domains, c, k))

        if projection == "simultaneous":
            weights, count, ratio_sum = _project_simultaneous(gram, eps)
        else:
            weights, count, ratio_sum = _project_sequential(gram, i_order, j_orders, reference, eps)

        # squared norms of the corrected gradients per piece, summed per unit; a norm at
        # rounding level (_ZERO_RTOL; e.g. a 1-element piece projected to zero) is 0
        sq = torch.einsum("pik,pkl,pil->pi", weights, gram, weights)
        orig_norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        scale_sq = torch.einsum("pik,pk->pi", weights.abs(), orig_norms) ** 2
        sq = torch.where(sq > _ZERO_RTOL * scale_sq, sq, torch.zeros_like(sq))
        unit_sq = torch.zeros(num_units, num_domains, dtype=torch.float64, device=device)
        unit_sq.index_add_(0, units, sq)
        smooth_a, smoothed = _smoothing_coefficients(unit_sq.sqrt(), smoothing, alpha_t)
        coef = torch.einsum("pi,pik->pk", smooth_a[units], weights)  # (P, D)
        is_plain = (coef == 1).all(dim=1)
        coef = coef * scale

        for gi, grp in enumerate(groups):
            if grp.packed:
                plain = bool(is_plain[elem_piece[gi]].all())
            else:
                plain = all(bool(is_plain[p : p + c].all()) for _, c, _, p in segments[grp.members[0]])
            if plain:  # no projection, no smoothing: exactly the plain sum
                torch.sum(grp.flat, 0, out=grp.out)
                if scale != 1.0:
                    grp.out.mul_(scale)
            elif grp.packed:
                work = torch.float32 if grp.flat.dtype in (torch.float16, torch.bfloat16) else grp.flat.dtype
                per_elem = coef[elem_piece[gi]].T.to(work)  # (D, N)
                grp.out.copy_(torch.sum(grp.flat.to(work) * per_elem, 0))
            else:
                flat = grp.flat
                for s, c, k, p in segments[grp.members[0]]:
                    _combine_run(
                        flat[:, s : s + c * k].view(num_domains, c, k),
                        coef[p : p + c],
                        grp.out[s : s + c * k].view(c, k),
                    )
        out = _unpack(groups, tensors)
    pairs = num_domains * (num_domains - 1) * num_pieces
    return SurgeryResult(
        out,
        {
            "conflict_pairs": float(count),
            "mod_freq": count / pairs if pairs else 0.0,
            "mod_ratio": ratio_sum / count if count else 0.0,
            "smoothed": float(smoothed),
            "alpha": float(alpha_t),
            "pieces": float(num_pieces),
        },
    )


# ---------------------------------------------------------------- AND-mask / SAND-mask


def _check_real(value: object, name: str) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def and_mask(grads: Sequence[Tensor], *, tau: float = 1.0) -> SurgeryResult:
    """ANDMask (Parascandolo et al., ICLR 2021) as implemented in DomainBed.

    Per tensor: ``mask = |mean_d sign(g_d)| >= tau``;
    ``grad = mask * mean_d g_d / (1e-10 + mask.float().mean())`` (the kept fraction is
    per tensor). DomainBed averages over domains, so there is no ``reduction`` option.
    DomainBed default ``tau = 1``: keep only components whose sign is the same nonzero
    sign in all domains (the "official" agreement rule).

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.

    Returns:
        grads of shapes ``param_t.shape``; stats ``mask_frac`` (fraction of all
        components of the network kept).
    """
    tensors, num_domains = _validate(grads)
    tau = _check_real(tau, "tau")
    # |mean sign| >= 1 iff every domain has the same nonzero sign: the "official" rule.
    mask_rule = "official" if tau == 1.0 else "tau"
    kept = 0.0
    total = 0
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
        scratch = _Scratch(groups)
        for grp in groups:
            if grp.packed:
                keep = torch.empty(grp.out.numel(), dtype=torch.bool, device=grp.out.device)
                kept += _masked_domain_sum(grp.flat, grp.out, scratch, mask_rule, tau, keep=keep)
                counts = _segment_sums(keep, grp.sizes)
                factors = [
                    (1.0 / num_domains) / (1e-10 + (c / n if n else 0.0)) for c, n in zip(counts, grp.sizes)
                ]
                lengths = torch.tensor(grp.sizes, device=grp.out.device)
                per_elem = torch.tensor(factors, dtype=grp.out.dtype, device=grp.out.device)
                grp.out.mul_(per_elem.repeat_interleave(lengths, output_size=grp.out.numel()))
            else:
                n = grp.out.numel()
                n_kept = _masked_domain_sum(grp.flat, grp.out, scratch, mask_rule, tau)
                kept += n_kept
                grp.out.mul_((1.0 / num_domains) / (1e-10 + (n_kept / n if n else 0.0)))
            total += grp.out.numel()
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"mask_frac": kept / total if total else 0.0})


def sand_mask(grads: Sequence[Tensor], *, tau: float = 1.0, k: float = 10.0) -> SurgeryResult:
    """SAND-mask (Shahtalebi et al. 2021) as implemented in DomainBed (``SANDMask``).

    Per tensor: ``avg = mean_d g``; ``var = g.var(dim=0)`` (unbiased; NaN, e.g. for
    D = 1, replaced by 1e-17); ``lam = 1 / var``;
    ``mask = max(tanh((k * lam) * (|mean_d sign(g_d)| - tau)), 0)``, NaN -> 1e-17;
    ``grad = mask * avg / (1e-10 + mask.mean())``.

    Note on DomainBed's default ``tau = 1``: ``|mean sign| <= 1`` always, so the tanh
    argument is <= 0 and the mask is identically 0, except where all signs agree AND
    ``var == 0`` (all domains equal), where ``inf * 0 = NaN`` becomes 1e-17. The update
    is then zero (or ~1e-7 times the mean gradient at such components): with tau = 1 the
    rule does nothing. DomainBed's random search draws tau ~ U(0, 1), where the mask is
    informative. This function implements the definition faithfully anyway.

    Args:
        grads: tensor ``t`` of shape ``(D, *param_t.shape)``.
        tau: agreement threshold. k: steepness of the tanh.

    Returns:
        grads of shapes ``param_t.shape``; stats ``mask_frac`` (mean mask value over all
        components of the network).
    """
    tensors, num_domains = _validate(grads)
    tau = _check_real(tau, "tau")
    k = _check_real(k, "k")
    mask_sum = 0.0
    total = 0
    with torch.no_grad():
        groups = _make_groups(tensors, num_domains)
        scratch = _Scratch(groups)
        for grp in groups:
            n = grp.out.numel()
            masks = torch.empty(n, dtype=grp.out.dtype, device=grp.out.device) if grp.packed else None
            m_sum = _sand_kernel(grp.flat, grp.out, scratch, tau, k, masks)
            if masks is not None:
                sums = _segment_sums(masks, grp.sizes)
                factors = [1.0 / (1e-10 + (m / size if size else 0.0)) for m, size in zip(sums, grp.sizes)]
                lengths = torch.tensor(grp.sizes, device=grp.out.device)
                per_elem = torch.tensor(factors, dtype=grp.out.dtype, device=grp.out.device)
                grp.out.mul_(per_elem.repeat_interleave(lengths, output_size=n))
            else:
                grp.out.mul_(1.0 / (1e-10 + (m_sum / n if n else 0.0)))
            mask_sum += m_sum
            total += n
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"mask_frac": mask_sum / total if total else 0.0})


def _sand_kernel(
    g2: Tensor, out: Tensor, scratch: _Scratch, tau: float, k: float, masks: Tensor | None
) -> float:
    """Blocked ``out = mask * mean_d g2[d]`` (SAND-mask before the rescaling).

    Returns the sum of the mask values; ``masks`` optionally receives them.
    """
    num_domains, n = g2.shape
    total = torch.zeros((), dtype=torch.float64, device=g2.device)
    for a in range(0, n, _CHUNK):
        e = min(n, a + _CHUNK)
        x = g2[:, a:e]
        avg = out[a:e]
        var, agree, tmp = scratch.get(g2.dtype, e - a, 3)
        torch.sum(x, 0, out=avg)
        avg.div_(num_domains)  # torch.mean
        if num_domains > 1:  # unbiased variance over domains
            var.zero_()
            for d in range(num_domains):
                torch.sub(x[d], avg, out=tmp)
                var.addcmul_(tmp, tmp)
            var.div_(num_domains - 1)
            var.nan_to_num_(nan=1e-17, posinf=math.inf, neginf=-math.inf)
        else:  # var of one sample is NaN -> 1e-17 (DomainBed)
            var.fill_(1e-17)
        var.reciprocal_().mul_(k)  # k * lam
        torch.sign(x[0], out=agree)
        for d in range(1, num_domains):
            agree.add_(torch.sign(x[d], out=tmp))
        agree.div_(num_domains).abs_().sub_(tau)  # |mean sign| - tau
        mask = var.mul_(agree).tanh_()
        mask.clamp_min_(0.0)  # max(mask, 0), NaN stays NaN
        mask.nan_to_num_(nan=1e-17)
        total += mask.sum(dtype=torch.float64 if mask.dtype == torch.float64 else torch.float32)
        avg.mul_(mask)
        if masks is not None:
            masks[a:e].copy_(mask)
    return float(total.item())
