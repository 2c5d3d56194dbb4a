"""CorGrad's smoothing of dominant gradients (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking
Domain Generalization from Perspective of Gradient Granularity", ECAI 2024, sec. 3.5,
eq. (11)) and the schedule of its weight alpha (sec. 4.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gram import _ZERO_RTOL
from ._plumbing import _check_option, _is_int, _is_real

# Relative margin used when flagging norm outliers in CorGrad's smoothing; see CorGrad.
_OUTLIER_RTOL = 1e-9


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


def _alpha_value(alpha: float, schedule: str, step: int, total_steps: int | None) -> float:
    """The smoothing weight at ``step`` (see :class:`CorGrad`, step 4)."""
    if schedule == "decay" and total_steps is None:
        if int(step) > 0:
            raise ValueError(
                "alpha_schedule='decay' (the default, the paper's rule) needs total_steps, the "
                f"length of the run in steps, at step {step} > 0; pass total_steps=T, or "
                "alpha_schedule='constant' for a fixed alpha"
            )
        return float(alpha)
    return _alpha_at(float(alpha), schedule, int(step), int(total_steps or 1))


def _check_smoothing(
    smoothing: str | None, alpha: float, alpha_schedule: str, step: int, total_steps: int | None
) -> None:
    """Raise ValueError for a smoothing option of corgrad outside its documented values."""
    _check_option(smoothing, ("dominant", "two_sided", None), "smoothing")
    _check_option(alpha_schedule, ("decay", "constant"), "alpha_schedule")
    if not (_is_real(alpha) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (_is_int(step) and int(step) >= 0):
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if total_steps is not None and not (_is_int(total_steps) and int(total_steps) >= 1):
        raise ValueError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")


def _smoothed_coefficients(
    gram: Tensor, weights: Tensor, units: Tensor, num_units: int, smoothing: str | None, alpha: float
) -> tuple[Tensor, Tensor, int]:
    """Coefficients of the result on the original gradients, after the smoothing.

    Args:
        gram: ``(P, D, D)`` Gram matrices; weights: ``(P, D, D)`` projection coefficients
            (``g_i^pc = sum_k W[p, i, k] g_k``); units: ``(P,)`` unit of every piece.

    Returns:
        ``coef (P, D)`` with result ``= sum_k coef[p, k] g_k`` on piece ``p`` (before the
        reduction), ``is_plain (P,)`` (all coefficients 1: the plain sum) and the number
        of smoothed (domain, unit) pairs.
    """
    num_domains = gram.shape[-1]
    # squared norms of the corrected gradients per piece, summed per unit; a norm at
    # rounding level (_ZERO_RTOL; e.g. a 1-element piece projected to zero) is 0
    sq = torch.einsum("pik,pkl,pil->pi", weights, gram, weights)
    orig_norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    scale_sq = torch.einsum("pik,pk->pi", weights.abs(), orig_norms) ** 2
    sq = torch.where(sq > _ZERO_RTOL * scale_sq, sq, torch.zeros_like(sq))
    unit_sq = torch.zeros(num_units, num_domains, dtype=torch.float64, device=gram.device)
    unit_sq.index_add_(0, units, sq)
    smooth_a, smoothed = _smoothing_coefficients(unit_sq.sqrt(), smoothing, alpha)
    coef = torch.einsum("pi,pik->pk", smooth_a[units], weights)  # (P, D)
    return coef, (coef == 1).all(dim=1), smoothed
