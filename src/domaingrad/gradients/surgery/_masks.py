"""ANDMask and SAND-mask as implemented in DomainBed (Gulrajani, Lopez-Paz, "In Search of
Lost Domain Generalization", ICLR 2021): Parascandolo, Neitz, Orvieto, Gresele, Schoelkopf,
"Learning explanations that are hard to vary", ICLR 2021; Shahtalebi, Gagnon-Audet,
Laleh, Faramarzi, Ahuja, Rish, "SAND-mask: An Enhanced Gradient Masking Strategy for the
Discovery of Invariances in Domain Generalization", 2021."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._agreement import _masked_domain_sum
from ._plumbing import (
    SurgeryResult,
    _check_real,
    _make_groups,
    _Rule,
    _Scratch,
    _segment_sums,
    _unpack,
    _validate,
)


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
                factors = [(1.0 / num_domains) / (1e-10 + (c / n if n else 0.0)) for c, n in zip(counts, grp.sizes)]
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
        tau: agreement threshold.
        k: steepness of the tanh.

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


def _sand_kernel(g2: Tensor, out: Tensor, scratch: _Scratch, tau: float, k: float, masks: Tensor | None) -> float:
    """Blocked ``out = mask * mean_d g2[d]`` (SAND-mask before the rescaling).

    Returns the sum of the mask values; ``masks`` optionally receives them.
    """
    num_domains, n = g2.shape
    total = torch.zeros((), dtype=torch.float64, device=g2.device)
    for a in range(0, n, scratch.chunk):
        e = min(n, a + scratch.chunk)
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


class ANDMask(_Rule):
    """ANDMask as a configured object: ``ANDMask(tau=t)(grads)`` is :func:`and_mask`
    ``(grads, tau=t)``, with the same default (DomainBed's ``tau = 1``).

    Args:
        tau: agreement threshold on ``|mean_d sign(g_d)|`` (a finite real number).

    Raises:
        ValueError: for a ``tau`` that is not a finite real number (when constructed).

    Example (components 0 and 2 agree in sign: half the components are kept, so the
    mean gradient there, (2, 3), is divided by 1/2):

    >>> import torch
    >>> from domaingrad.gradients.surgery import ANDMask
    >>> g = torch.tensor([[1.0, -1.0, 2.0, 0.0], [3.0, 2.0, 4.0, 1.0]])
    >>> ANDMask()([g]).grads[0].tolist()
    [4.0, 0.0, 6.0, 0.0]
    >>> ANDMask(tau=0.5)
    ANDMask(tau=0.5)
    """

    _options = ("tau",)

    def __init__(self, *, tau: float = 1.0) -> None:
        self.tau = _check_real(tau, "tau")

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`and_mask` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return and_mask(grads, tau=self.tau)


class SANDMask(_Rule):
    """SAND-mask as a configured object: ``SANDMask(tau=t, k=s)(grads)`` is
    :func:`sand_mask` ``(grads, tau=t, k=s)``, with the same defaults (DomainBed's
    ``tau = 1``, a zero update, see :func:`sand_mask`, and ``k = 10``).

    Args:
        tau: agreement threshold (a finite real number).
        k: steepness of the tanh (a finite real number).

    Raises:
        ValueError: for a ``tau`` or ``k`` that is not a finite real number (when
            constructed).

    Example (``tau = 0.5``: component 0, where both domains agree, gets the mask
    ``tanh(2.5)``, component 1 none; rescaled by the mean mask the update is (4, 0)):

    >>> import torch
    >>> from domaingrad.gradients.surgery import SANDMask
    >>> g = torch.tensor([[1.0, -1.0], [3.0, 1.0]])
    >>> [round(v, 4) for v in SANDMask(tau=0.5)([g]).grads[0].tolist()]
    [4.0, 0.0]
    >>> SANDMask(tau=0.5)
    SANDMask(tau=0.5, k=10.0)
    """

    _options = ("tau", "k")

    def __init__(self, *, tau: float = 1.0, k: float = 10.0) -> None:
        self.tau = _check_real(tau, "tau")
        self.k = _check_real(k, "k")

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        """:func:`sand_mask` of ``grads`` (tensor ``t`` of shape ``(D, *param_t.shape)``)."""
        return sand_mask(grads, tau=self.tau, k=self.k)
