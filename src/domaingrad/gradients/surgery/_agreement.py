"""Sign agreement: the mask Phi, Agr-Sum and Agr-Rand (Mansilla, Echeveste, Milone,
Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021, eqs. (2)-(4)), with
the blocked masked-sum kernel that ANDMask shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._plumbing import (
    AgreementRule,
    Reduction,
    SurgeryResult,
    _check_generator,
    _check_option,
    _count,
    _Group,
    _make_groups,
    _Rule,
    _scale,
    _Scratch,
    _segment_sums,
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
    for a in range(0, n, scratch.chunk):
        e = min(n, a + scratch.chunk)
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
    _check_generator(generator, optional=False)
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
            _draw_noise(groups, place, keeps, sigma, generator, scratch)
        out = _unpack(groups, tensors)
    return SurgeryResult(out, {"agree_frac": agree / total if total else 1.0, "sigma": sigma})


def _draw_noise(
    groups: list[_Group],
    place: dict[int, tuple[int, int, int, bool]],
    keeps: list[Tensor],
    sigma: float,
    generator: torch.Generator,
    scratch: _Scratch,
) -> None:
    """Agr-Rand's noise, added in place at the disagreeing components of the groups.

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
        dis.copy_(keep[a:e])
        dis.sub_(1.0)  # 0 where agreeing, -1 where not
        z = noise[a:e].mul_(dis)
        out[a:e].sub_(z, alpha=sigma)


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
    AgrRand(generator=torch.Generator(device='cpu'), rule='paper', reduction='sum')
    """

    _options = ("generator", "rule", "reduction")

    def __init__(
        self, *, generator: torch.Generator, rule: AgreementRule = "paper", reduction: Reduction = "sum"
    ) -> None:
        _check_generator(generator, optional=False)
        _check_option(rule, ("paper", "official"), "rule")
        _check_option(reduction, ("sum", "mean"), "reduction")
        self.generator = generator
        self.rule = rule
        self.reduction = reduction

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`agr_rand` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return agr_rand(grads, generator=self.generator, rule=self.rule, reduction=self.reduction)
