"""Batch-wise GSNR and the (GSNR-guided) DropBlock masks against Listing 2 of the
supplementary material of Michalkiewicz, Faraki, Yu, Chandraker, Baktashmotlagh, "Domain
Generalization Guided by Gradient Signal to Noise Ratio of Parameters" (ICCV 2023) and
torchvision, plus the drop fractions and the guard of the listing's unchecked index."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from domaingrad.errors import DomainGradError
from domaingrad.gradients.gsnr import (
    batch_gsnr,
    drop_block2d,
    drop_block2d_gsnr,
    effective_block_size,
    gsnr_seed_mask,
    gsnr_threshold_index,
)

#: one torch thread (tests/conftest.py): small tensors gain nothing from two
pytestmark = pytest.mark.usefixtures("single_thread")


def listing2_drop_block2d_gsnr(
    input: Tensor,
    grads: Tensor,
    p: float,
    p_gsnr: float,
    block_size: int,
    inplace: bool = False,
    eps: float = 1e-06,
    training: bool = True,
) -> Tensor:
    """Listing 2 of the supplementary material of Michalkiewicz et al. (ICCV 2023),
    copied literally (docstring removed)."""

    def calc_gsnr(grads, eps=10**-7):
        """computes batch-wise gsnr"""
        grads_mean = grads.reshape(grads.shape[0], -1).mean(dim=0)
        grads_var = grads.reshape(grads.shape[0], -1).var(dim=0)
        gsnr = grads_mean**2 / (grads_var + eps)
        return gsnr

    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}.")
    if input.ndim != 4:
        raise ValueError(f"input should be 4 dimensional. Got {input.ndim} dimensions.")
    if not training or p == 0.0:
        return input

    assert grads.shape == input.shape
    N, C, H, W = input.size()
    block_size = min(block_size, W, H)

    gamma = (p * H * W) / ((block_size**2) * ((H - block_size + 1) * (W - block_size + 1)))
    gsnr = calc_gsnr(grads).reshape(grads.shape[1:]).unsqueeze(dim=0)
    thresh_idx = C * (H - block_size + 1) * (W - block_size + 1) * gamma * block_size**2
    thresh_idx = int(thresh_idx)
    thresh_val = torch.sort(gsnr.flatten(), descending=True)[0][thresh_idx]
    window_size = H - block_size + 1
    noise = gsnr[:, :, block_size - 1 : block_size - 1 + window_size, block_size - 1 : block_size - 1 + window_size]
    noise = (noise >= thresh_val) * 1.0
    assert noise.shape == (N // N, C, H - block_size + 1, W - block_size + 1)

    noise_gsnr = torch.empty((1, C, H - block_size + 1, W - block_size + 1), dtype=input.dtype, device=input.device)
    noise_gsnr.bernoulli_(p_gsnr)
    noise = noise * noise_gsnr

    noise = F.pad(noise, [block_size // 2] * 4, value=0)
    noise = F.max_pool2d(noise, stride=(1, 1), kernel_size=(block_size, block_size), padding=block_size // 2)
    noise = 1 - noise  # now high gsnr values are zeroed
    normalize_scale = noise.numel() / (eps + noise.sum())
    if inplace:
        input.mul_(noise).mul_(normalize_scale)
    else:
        input = input * noise * normalize_scale
    return input


def tensors(n=6, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randn(n, c, h, w, generator=g) + 0.3


def test_batch_gsnr_is_squared_mean_over_unbiased_variance():
    grads = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean = grads.sum(0) / 5
    var = ((grads - mean) ** 2).sum(0) / 4
    torch.testing.assert_close(batch_gsnr(grads), mean**2 / (var + 1e-7), rtol=1e-12, atol=0)
    with pytest.raises(DomainGradError, match="at least 2 samples"):
        batch_gsnr(grads[:1])


@pytest.mark.parametrize(
    "p,p_gsnr,block_size,seed",
    [(0.1, 0.5, 3, 0), (0.3, 0.8, 1, 1), (0.05, 1.0, 5, 2), (0.2, 0.3, 3, 3), (0.15, 0.6, 7, 4)],
)
def test_matches_the_listing_on_fixed_tensors(p, p_gsnr, block_size, seed):
    x, grads = tensors(seed=seed)
    torch.manual_seed(100 + seed)  # the listing draws M2 from the global generator
    expected = listing2_drop_block2d_gsnr(x, grads, p, p_gsnr, block_size)
    got = drop_block2d_gsnr(x, grads, p, p_gsnr, block_size, torch.Generator().manual_seed(100 + seed))
    assert not torch.equal(got, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_guard_of_the_unchecked_threshold_index():
    x, grads = tensors()
    with pytest.raises(IndexError):  # the listing at p = 1: thresh_idx = C*H*W
        listing2_drop_block2d_gsnr(x, grads, 1.0, 1.0, 1)
    assert gsnr_threshold_index(1.0, 1, 3, 8, 8) == 3 * 8 * 8 - 1
    out = drop_block2d_gsnr(x, grads, 1.0, 1.0, 1, torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros_like(x))  # every unit is a top-GSNR seed and dropped


def test_drop_block2d_matches_torchvision_with_the_same_generator_state():
    x, _ = tensors(h=11, w=9)
    for p, b in ((0.1, 3), (0.3, 5), (0.2, 1)):
        torch.manual_seed(7)
        expected = torchvision.ops.drop_block2d(x, p, b)
        got = drop_block2d(x, p, b, torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_block_size_rules():
    assert effective_block_size(3, 2, 2) == 1  # clamped to the 2x2 map, then odd
    assert effective_block_size(7, 4, 6) == 3
    assert effective_block_size(5, 9, 9) == 5
    with pytest.raises(DomainGradError, match="odd"):
        effective_block_size(4, 9, 9)
    x, grads = tensors(h=2, w=2)  # torchvision refuses this map with block 3, the listing fails
    with pytest.raises(ValueError, match="odd"):
        torchvision.ops.drop_block2d(x, 0.1, 3)
    with pytest.raises(RuntimeError, match="size"):
        listing2_drop_block2d_gsnr(x, grads, 0.5, 1.0, 3)
    assert drop_block2d_gsnr(x, grads, 0.5, 1.0, 3).shape == x.shape


def test_non_square_maps_use_the_width_window():
    x, grads = tensors(h=7, w=10)
    seeds = gsnr_seed_mask(batch_gsnr(grads), 0.2, 1.0, 3)
    assert seeds.shape == (1, 3, 5, 8)
    out = drop_block2d_gsnr(x, grads, 0.2, 1.0, 3, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and (out == 0).any()


def spaced_gsnr(block_size=3, size=12, spacing=4):
    """(1, size, size) GSNR map whose top values sit on a grid of window positions
    ``spacing`` >= b apart, so their b x b blocks never overlap; returns (map, count)."""
    b = block_size
    gsnr = torch.rand(1, size, size, generator=torch.Generator().manual_seed(3))  # in [0, 1)
    rows = torch.arange(0, size - b + 1, spacing) + b - 1
    gsnr[0, rows[:, None], rows[None, :]] = 10.0 + torch.arange(len(rows) ** 2, dtype=torch.float32).view(
        len(rows), len(rows)
    )
    return gsnr, len(rows) ** 2


def test_drop_fraction_follows_p_exactly_when_every_seed_drops():
    """p_gsnr = 1: the number of M1 seeds is thresh_idx + 1 = int(p*C*H*W) + 1."""
    gsnr, k = spaced_gsnr()
    numel = gsnr.numel()
    p = (k - 0.5) / numel  # int(p * numel) + 1 == k
    seeds = gsnr_seed_mask(gsnr, p, 1.0, 3)
    assert int(seeds.sum()) == k
    dropped = F.max_pool2d(F.pad(seeds, [1] * 4), 3, 1, 1)
    assert int(dropped.sum()) == 9 * k  # non-overlapping 3 x 3 blocks
    for p_small in (0.01, 0.03, 0.05):  # fewer seeds than the grid: int(p*numel) + 1 of them
        assert int(gsnr_seed_mask(gsnr, p_small, 1.0, 3).sum()) == int(p_small * numel) + 1


@pytest.mark.parametrize("p_gsnr", [0.2, 0.5, 0.9])
def test_drop_fraction_follows_p_gsnr_within_binomial_error(p_gsnr):
    """Each of the k top-GSNR seeds is kept as a seed with probability p_gsnr; over T
    draws the seed count is Binomial(T*k, p_gsnr); 4 standard deviations."""
    gsnr, k = spaced_gsnr()
    p = (k - 0.5) / gsnr.numel()
    gen = torch.Generator().manual_seed(11)
    trials = 400
    counts = torch.stack([gsnr_seed_mask(gsnr, p, p_gsnr, 3, gen).sum() for _ in range(trials)])
    n = trials * k
    assert abs(float(counts.sum()) - n * p_gsnr) <= 4 * math.sqrt(n * p_gsnr * (1 - p_gsnr))
    # and the applied mask zeroes exactly 9 units per surviving seed, rescaling the rest
    x = torch.ones(2, 1, 12, 12)
    a = (2 * gsnr).sqrt()  # rows a + 1 and a - 1: batch GSNR a^2 / (2 + eps), same order as gsnr
    grads = torch.stack([a + 1, a - 1])
    out = drop_block2d_gsnr(x, grads, p, p_gsnr, 3, torch.Generator().manual_seed(0))
    zeros = int((out[0] == 0).sum())
    assert zeros % 9 == 0 and torch.allclose(out[out != 0], torch.tensor(144 / (144 - zeros)))


def test_straight_through_ratio_gets_a_gradient_and_m_switches():
    gsnr, k = spaced_gsnr()
    p = (k - 0.5) / gsnr.numel()
    q = torch.tensor(0.5, requires_grad=True)
    seeds = gsnr_seed_mask(gsnr, p, q, 3, torch.Generator().manual_seed(0))
    assert set(seeds.detach().unique().tolist()) <= {0.0, 1.0}
    seeds.sum().backward()
    assert q.grad == k  # d/dq of sum over the k M1 seeds of (hard + q - q.detach())
    assert int(gsnr_seed_mask(gsnr, p, 1.0, 3, use_m2=False).sum()) == k
    no_m1 = gsnr_seed_mask(gsnr, p, 0.3, 3, torch.Generator().manual_seed(0), use_m1=False)
    assert int(no_m1.sum()) > k  # any window position may be a seed now
    assert torch.equal(gsnr_seed_mask(gsnr, p, 1.0, 3, use_m1=False, use_m2=False), torch.ones(1, 1, 10, 10))


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_dropblock_drop_fraction_follows_p_within_binomial_error(p):
    """Block size 1: gamma = p and every unit is dropped independently, so the number of
    zeros among n units is Binomial(n, p); 4 standard deviations."""
    x = torch.ones(20, 8, 10, 10)
    out = drop_block2d(x, p, 1, torch.Generator().manual_seed(5))
    n, zeros = x.numel(), int((out == 0).sum())
    assert abs(zeros - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(out[out != 0], torch.full((n - zeros,), n / (n - zeros)))
