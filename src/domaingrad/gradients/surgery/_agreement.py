"""Sign agreement: the mask Phi and Agr-Sum (Mansilla, Echeveste, Milone, Ferrante,
"Domain Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(3)), with the blocked
masked-sum kernel that Agr-Rand (:mod:`._agr_rand`) and ANDMask share."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native
from ._noise import counter_normals
from ._plumbing import (
    AgreementRule,
    Reduction,
    SurgeryResult,
    _check_option,
    _count,
    _Group,
    _make_groups,
    _Rule,
    _scale,
    _Scratch,
    _unpack,
    _validate,
)


def _masked_domain_sum(
    g2: Tensor,
    out: Tensor,
    scratch: _Scratch,
    mask_rule: str,
    tau: float = 1.0,
    keep: Tensor | None = None,
    l1: list[float] | None = None,
    noise_in_out: bool = False,
) -> float:
    """Blocked ``out = mask * sum_d g2[d]``; returns the number of kept components.

    Args:
        g2: ``(D, n)`` flat per-domain gradients of one tensor.
        out: ``(n,)`` output, same dtype. With ``noise_in_out`` it holds noise on entry
            and leaves as ``mask * sum + (1 - mask) * noise`` (Agr-Rand's parallel
            stream; NaN sums still propagate, ``NaN * 0`` being NaN).
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
    for a in range(0, n, scratch.chunk):
        e = min(n, a + scratch.chunk)
        x = g2[:, a:e]
        if noise_in_out:
            lo, hi, s = scratch.get(g2.dtype, e - a, 3)
        else:
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
                # NaN propagates to lo and hi, and torch's sign(NaN) is 0: a NaN lo is made
                # positive so that its sign differs from hi's (0) and it never agrees
                lo.nan_to_num_(nan=1.0).sign_()
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
        if noise_in_out:  # out = (noise - noise * mask) + mask * sum, exact for 0/1 masks
            blk = out[a:e]
            blk.addcmul_(blk, hi, value=-1.0).add_(s)
    if l1 is not None:
        l1[0] += float(abs_sum.item())
    return float(kept.item())


def _tensor_starts(groups: list[_Group]) -> dict[int, int]:
    """Index of each tensor's first component when all tensors' components are counted
    in input order (the counter noise stream addresses components by this index)."""
    sizes = {t: n for grp in groups for t, n in zip(grp.members, grp.sizes)}
    starts: dict[int, int] = {}
    start = 0
    for t in sorted(sizes):
        starts[t] = start
        start += sizes[t]
    return starts


def _agreement_pass(
    groups: list[_Group],
    scratch: _Scratch,
    mask_rule: str,
    *,
    keys: tuple[int, int] | None = None,
) -> tuple[float, float, list[Tensor | None]]:
    """Agr-Sum's masked sum over every group, with the counter stream's standard-normal
    noise at the disagreeing components when ``keys`` is given (Agr-Rand).

    Each group's ``out`` becomes ``mask * sum`` (+ ``(1 - mask) * z``, ``z`` the noise of
    the component's index, see :mod:`._noise`); NaN sums propagate. Groups the native
    kernels take (CPU float32/float64, see :mod:`._native`) run there, range by range on
    several threads; the others on the blocked torch kernel :func:`_masked_domain_sum`.
    Both give the same masks and sums (same order of additions) and the same noise.

    Returns:
        ``(kept, l1, keeps)``: the number of agreeing components, the sum of
        ``|mask * sum|`` (float64), and per group its bool mask (``None`` without
        ``keys``: Agr-Sum needs no mask).
    """
    starts = _tensor_starts(groups)
    kept = 0.0
    l1 = 0.0
    keeps: list[Tensor | None] = []
    native: list[tuple[_Group, Tensor | None]] = []
    for grp in groups:
        n = grp.out.numel()
        keep = torch.empty(n, dtype=torch.bool, device=grp.out.device) if keys is not None else None
        keeps.append(keep)
        if mask_rule != "tau" and _native.usable(grp.out) and grp.flat.stride(1) == 1:
            native.append((grp, keep))
            continue
        if keys is not None:
            for t, o, size in zip(grp.members, grp.offsets, grp.sizes):
                grp.out[o : o + size] = counter_normals(
                    keys[0], keys[1], starts[t], size, dtype=grp.out.dtype, device=grp.out.device
                )
        acc = [0.0]
        kept += _masked_domain_sum(
            grp.flat, grp.out, scratch, mask_rule, keep=keep, l1=acc, noise_in_out=keys is not None
        )
        l1 += acc[0]
    if native:
        k, s = _native_pass(native, starts, mask_rule, keys)
        kept += k
        l1 += s
    return kept, l1, keeps


def _native_pass(
    groups: list[tuple[_Group, Tensor | None]], starts: dict[int, int], mask_rule: str, keys: tuple[int, int] | None
) -> tuple[float, float]:
    """:func:`_agreement_pass` of the ``(group, keep)`` pairs on the native kernel, all
    groups' ranges in one parallel run; returns (kept, l1), summed in range order."""
    key0, key1 = keys if keys is not None else (0, 0)
    official = int(mask_rule == "official")
    noisy = int(keys is not None)
    tasks = []
    for grp, keep in groups:
        fn = _native.kernel("dg_agree", grp.out.dtype)
        item = grp.out.element_size()
        flat, out = grp.flat.data_ptr(), grp.out.data_ptr()
        keep_ptr = keep.data_ptr() if keep is not None else 0
        num_domains, stride = grp.flat.shape[0], grp.flat.stride(0)
        for t, o, size in zip(grp.members, grp.offsets, grp.sizes):
            for a, m in _native.ranges(size):
                off = o + a
                tasks.append(
                    (fn, flat + off * item, num_domains, stride, m, out + off * item,
                     keep_ptr + off if keep_ptr else None, starts[t] + a)
                )  # fmt: skip

    def run(task: tuple) -> tuple[int, float]:
        fn, flat, num_domains, stride, m, out, keep, base = task
        acc = ctypes.c_double(0.0)
        kept = fn(flat, num_domains, stride, m, out, keep, official, noisy, key0, key1, base, ctypes.byref(acc))
        return kept, acc.value

    results = _native.run_ranges(tasks, run)
    return float(sum(k for k, _ in results)), float(sum(s for _, s in results))


def _agree(g: Tensor, rule: str) -> Tensor:
    """Agreement mask Phi of one tensor, ``(D, *s) -> bool (*s)`` (see _masked_domain_sum)."""
    mn, mx = g.amin(0), g.amax(0)
    if rule == "paper":  # torch's sign(NaN) is 0: a NaN min is made positive, so it never agrees
        return torch.sign(mn.nan_to_num(nan=1.0)) == torch.sign(mx)
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
        agree, _, _ = _agreement_pass(groups, _Scratch(groups), rule)
        for grp in groups:
            if scale != 1.0:
                grp.out.mul_(scale)
            total += grp.out.numel()
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"agree_frac": agree / total if total else 1.0})


class AgrSum(_Rule):
    """Agr-Sum as a configured object: ``AgrSum(**options)(grads)`` is
    :func:`agr_sum` ``(grads, **options)``, with the same defaults.

    Args:
        rule: ``"paper"`` (default) or ``"official"`` agreement, see :func:`agreement_mask`.
        reduction: ``"sum"`` (default, the paper) or ``"mean"`` (divide by D).

    Raises:
        ValueError: for an option outside its documented values (when constructed).

    Example (two domains, one 3-element parameter; the domains agree in sign on
    components 0 and 2, whose sums are kept):

    >>> import torch
    >>> from domaingrad.gradients.surgery import AgrSum
    >>> g = torch.tensor([[1.0, -1.0, 2.0], [3.0, 2.0, 1.0]])
    >>> AgrSum()([g]).grads[0].tolist()
    [4.0, 0.0, 3.0]
    >>> AgrSum(reduction="mean")
    AgrSum(rule='paper', reduction='mean')
    """

    _options = ("rule", "reduction")

    def __init__(self, *, rule: AgreementRule = "paper", reduction: Reduction = "sum") -> None:
        _check_option(rule, ("paper", "official"), "rule")
        _check_option(reduction, ("sum", "mean"), "reduction")
        self.rule = rule
        self.reduction = reduction

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`agr_sum` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return agr_sum(grads, rule=self.rule, reduction=self.reduction)
