"""Batch-wise GSNR of activation gradients and the (GSNR-guided) DropBlock masks.

Pure functions for the dropout methods of Michalkiewicz, Faraki, Yu, Chandraker and
Baktashmotlagh, "Domain Generalization Guided by Gradient Signal to Noise Ratio of
Parameters", ICCV 2023 (supplementary material, Section 5, Listings 1 and 2, and the
Table 4 ablation), and for DropBlock (Ghiasi, Lin, Le, NeurIPS 2018) as torchvision
implements it (``torchvision.ops.drop_block2d``).

Differences from the code they follow, all guarded or documented:

* Every random draw takes an explicit ``torch.Generator`` (torchvision and the listing
  use the global generator), so training runs resume exactly. With a generator in the
  same state as the global one, the results are identical (tested).
* The listing reads ``sorted_gsnr[thresh_idx]`` without a bound check:
  ``thresh_idx = int(C*(H-b+1)*(W-b+1)*gamma*b^2) = int(p*C*H*W)`` reaches ``C*H*W``
  (an IndexError) at ``p = 1``. Here it is clamped to the last index (every unit is
  then a candidate, which is what ``p = 1`` asks for).
* The listing crops the GSNR map to the seed window with ``H - b + 1`` in both spatial
  dimensions; here the width uses ``W - b + 1`` (identical for square maps, which is
  all the listing ran on; it fails its own shape assert otherwise).
* torchvision refuses even block sizes (the padded max-pool would change the map
  size), also after ``block_size = min(block_size, H, W)`` clamps an odd block to an
  even map size (a 2x2 ResNet-18 ``layer4`` map at 64x64 inputs). Here
  :func:`effective_block_size` takes the largest odd size not above that minimum; an
  even block size given by the user is still an error.

Per-sample gradients with respect to activations (Listing 1): the listing takes the
gradient of the *mean* batch loss with respect to each block output. For a network in
which samples do not interact (GroupNorm, LayerNorm, frozen or eval-mode BatchNorm), row
``i`` of that gradient is exactly ``(1/N) * d loss_i / d a_i``, sample ``i``'s own
gradient, so one backward pass gives all of them and the ``1/N`` cancels in the GSNR
(up to ``eps``). With BatchNorm in training mode downstream of the block, row ``i`` also
contains the other samples' losses through the batch statistics; the listing (and this
module) still use it, so the GSNR is then that of these coupled rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DomainGradError

__all__ = [
    "batch_gsnr",
    "drop_block2d",
    "drop_block2d_gsnr",
    "dropblock_gamma",
    "effective_block_size",
    "expand_blocks",
    "gsnr_seed_mask",
    "gsnr_threshold_index",
]


def batch_gsnr(grads: Tensor, eps: float = 1e-7) -> Tensor:
    """Batch-wise gradient signal-to-noise ratio of every unit (Listing 2, ``calc_gsnr``).

    ``gsnr = mean_i(g_i)^2 / (var_i(g_i) + eps)`` over the batch axis, with the unbiased
    variance (``torch.var``'s default, as in the listing).

    Args:
        grads: (N, *unit_shape) gradients, one row per sample, N >= 2.
        eps: added to the variance.

    Returns:
        (*unit_shape) GSNR, same dtype.

    Raises:
        DomainGradError: for N < 2 (the unbiased variance of one sample is undefined).
    """
    if grads.ndim < 1 or grads.shape[0] < 2:
        raise DomainGradError(
            f"batch-wise GSNR needs at least 2 samples, got gradients of shape "
            f"{tuple(grads.shape)}; use a batch size of 2 or more"
        )
    flat = grads.reshape(grads.shape[0], -1)
    gsnr = flat.mean(dim=0) ** 2 / (flat.var(dim=0) + eps)
    return gsnr.reshape(grads.shape[1:])


def effective_block_size(block_size: int, height: int, width: int) -> int:
    """``min(block_size, H, W)``, then the largest odd size not above it.

    Raises:
        DomainGradError: for an even or non-positive ``block_size`` (torchvision's rule).
    """
    if block_size < 1 or block_size % 2 == 0:
        raise DomainGradError(
            f"DropBlock block size must be a positive odd integer (torchvision's drop_block2d rule), got {block_size}"
        )
    size = min(block_size, height, width)
    return size if size % 2 == 1 else size - 1


def dropblock_gamma(p: float, block_size: int, height: int, width: int) -> float:
    """DropBlock's seed rate ``gamma = p*H*W / (b^2 * (H-b+1) * (W-b+1))`` (DropBlock
    Eq. 1 with the valid seed region; torchvision and Listing 2, line 39)."""
    return (p * height * width) / ((block_size**2) * ((height - block_size + 1) * (width - block_size + 1)))


def _check(input: Tensor, p: float, name: str = "p") -> None:
    if not 0.0 <= p <= 1.0:
        raise DomainGradError(f"drop probability {name} must be in [0, 1], got {p}")
    if input.ndim != 4:
        raise DomainGradError(f"DropBlock needs (N, C, H, W) activations, got shape {tuple(input.shape)}")


def expand_blocks(seeds: Tensor, block_size: int) -> Tensor:
    """Grow every seed into a ``b x b`` block (torchvision: zero-pad by b//2, stride-1 max-pool).

    Args:
        seeds: (N, C, H-b+1, W-b+1) 0/1 seed mask, b odd.

    Returns:
        (N, C, H, W) 0/1 mask of dropped units.
    """
    seeds = F.pad(seeds, [block_size // 2] * 4, value=0)
    return F.max_pool2d(seeds, stride=(1, 1), kernel_size=(block_size, block_size), padding=block_size // 2)


def _apply(input: Tensor, dropped: Tensor, eps: float) -> Tensor:
    keep = 1 - dropped
    return input * keep * (keep.numel() / (eps + keep.sum()))


def drop_block2d(
    input: Tensor,
    p: float,
    block_size: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
    training: bool = True,
) -> Tensor:
    """``torchvision.ops.drop_block2d`` with an explicit generator and the odd-size clamp.

    Seeds ~ Bernoulli(gamma) independently per sample, channel and valid position, grown to
    ``b x b`` blocks, dropped units zeroed, the rest scaled by ``numel / sum(keep)``.

    Args:
        input: (N, C, H, W) activations.
        p: drop probability in [0, 1]; block_size: positive odd int.

    Returns:
        (N, C, H, W) tensor (``input`` itself when not training or p = 0).

    Raises:
        DomainGradError: p outside [0, 1], input not 4-D, even block size.
    """
    _check(input, p)
    if not training or p == 0.0:
        return input
    n, c, h, w = input.shape
    b = effective_block_size(block_size, h, w)
    gamma = dropblock_gamma(p, b, h, w)
    noise = torch.empty((n, c, h - b + 1, w - b + 1), dtype=input.dtype, device=input.device)
    noise.bernoulli_(gamma, generator=generator)
    return _apply(input, expand_blocks(noise, b), eps)


def gsnr_threshold_index(p: float, block_size: int, channels: int, height: int, width: int) -> int:
    """Listing 2, lines 41-42, ``int(C*(H-b+1)*(W-b+1)*gamma*b^2)`` (= ``int(p*C*H*W)``
    up to rounding), clamped to ``C*H*W - 1`` (the guard the listing lacks)."""
    gamma = dropblock_gamma(p, block_size, height, width)
    index = int(channels * (height - block_size + 1) * (width - block_size + 1) * gamma * block_size**2)
    return min(index, channels * height * width - 1)


def gsnr_seed_mask(
    gsnr: Tensor,
    p: float,
    p_gsnr: float | Tensor,
    block_size: int,
    generator: torch.Generator | None = None,
    use_m1: bool = True,
    use_m2: bool = True,
) -> Tensor:
    """Seeds of GSNR-guided DropBlock: M1 * M2 on the valid seed window (Listing 2, 39-52).

    M1: units whose GSNR is at least the value at :func:`gsnr_threshold_index` of the
    descending sort of all C*H*W values, cropped to the window ``[b-1:, b-1:]``. M2: one
    Bernoulli(p_gsnr) draw per window position, shared by the batch.
    ``use_m1=False`` / ``use_m2=False`` replace M1 / M2 by ones (the supplement's
    Table 4 ablation). A tensor ``p_gsnr`` (scalar) is used with the straight-through
    estimator: the forward value is the hard draw, the gradient that of ``p_gsnr``.

    Args:
        gsnr: (C, H, W) GSNR of the block output; p: DropBlock drop probability;
        block_size: effective (odd, <= H, W) block size.

    Returns:
        (1, C, H-b+1, W-b+1) seed mask (0/1 in the forward pass).
    """
    c, h, w = gsnr.shape
    b = block_size
    window = (1, c, h - b + 1, w - b + 1)
    if use_m1:
        index = gsnr_threshold_index(p, b, c, h, w)
        thresh = torch.sort(gsnr.flatten(), descending=True)[0][index]
        m1 = (gsnr[None, :, b - 1 : h, b - 1 : w] >= thresh).to(gsnr.dtype)
    else:
        m1 = torch.ones(window, dtype=gsnr.dtype, device=gsnr.device)
    if not use_m2:
        return m1
    q = p_gsnr.detach() if isinstance(p_gsnr, Tensor) else p_gsnr
    m2 = torch.empty(window, dtype=gsnr.dtype, device=gsnr.device)
    m2.bernoulli_(float(q), generator=generator)
    if isinstance(p_gsnr, Tensor) and p_gsnr.requires_grad:
        m2 = m2 + (p_gsnr - p_gsnr.detach())  # straight-through: forward value exactly m2
    return m1 * m2


def drop_block2d_gsnr(
    input: Tensor,
    grads: Tensor,
    p: float,
    p_gsnr: float | Tensor,
    block_size: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
    training: bool = True,
    use_m1: bool = True,
    use_m2: bool = True,
) -> Tensor:
    """GSNR-guided DropBlock (Michalkiewicz et al., ICCV 2023, supplementary material,
    Listing 2), guarded; with ``p_gsnr = 1`` (or ``use_m2=False``, which skips the draw),
    M2 = 1: the supplement's Table 4 "DB+gsnr".

    The units of highest batch-wise GSNR (:func:`batch_gsnr` of ``grads``, eps 1e-7)
    become block seeds (M1), each kept as a seed with probability ``p_gsnr`` (M2, one
    draw per position shared by the batch); seeds grow to ``b x b`` blocks, those units
    are zeroed in every sample, and the output is rescaled by ``numel / sum(keep)`` of
    the (1, C, H, W) keep mask.

    Args:
        input: (N, C, H, W) block output; grads: same shape, gradients of the loss with
            respect to it (first pass of Listing 1); p: drop probability in [0, 1];
            p_gsnr: probability in [0, 1] that a top-GSNR seed is dropped (a scalar
            tensor is learnable through the straight-through estimator, see
            :func:`gsnr_seed_mask`); block_size: positive odd int.
        use_m1, use_m2: the Table 4 ablation switches.

    Returns:
        (N, C, H, W) tensor (``input`` itself when not training or p = 0).

    Raises:
        DomainGradError: bad p / p_gsnr, shapes, even block size, N < 2.
    """
    _check(input, p)
    q = float(p_gsnr.detach()) if isinstance(p_gsnr, Tensor) else p_gsnr
    if not 0.0 <= q <= 1.0:
        raise DomainGradError(f"p_gsnr must be in [0, 1], got {q}")
    if not training or p == 0.0:
        return input
    if grads.shape != input.shape:
        raise DomainGradError(
            f"gradients of shape {tuple(grads.shape)} do not match activations of shape {tuple(input.shape)}"
        )
    _, c, h, w = input.shape
    b = effective_block_size(block_size, h, w)
    gsnr = batch_gsnr(grads.detach())
    seeds = gsnr_seed_mask(gsnr.to(input.dtype), p, p_gsnr, b, generator, use_m1, use_m2)
    return _apply(input, expand_blocks(seeds, b), eps)
