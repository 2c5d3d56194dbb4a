"""Shared helpers and loop references of the gradient-surgery tests.

The slow, loop-based reference implementations follow the papers' definitions literally
(explicit Python loops over domain pairs and slices on flattened vectors) and share no
code with :mod:`domaingrad.gradients.surgery`.
"""

from __future__ import annotations

import math
import struct

import torch
from hypothesis import settings
from hypothesis import strategies as st

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)


def t64(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10, atol: float | None = None) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol if atol is None else atol)


def sparse_signs(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Values in {-2,...,2} times a positive scale: many exact zeros and sign ties."""
    ints = torch.randint(-2, 3, shape, generator=gen).to(F64)
    return ints * torch.rand(shape, generator=gen, dtype=F64)


def random_grads(seed: int, num_domains: int, shapes: list[tuple[int, ...]], dtype=F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((num_domains, *s), generator=gen, dtype=dtype) for s in shapes]


SHAPES = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 9)),
        st.tuples(st.integers(1, 5), st.integers(1, 4)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
        st.just(()),
    ),
    min_size=1,
    max_size=4,
)


# ------------------------------------------------------------- naive loop references


def naive_project(
    vecs: list[torch.Tensor],
    order: list[int],
    reference: str,
    eps: float,
    j_orders: list[list[int]] | None = None,
) -> list[torch.Tensor]:
    """Literal PCGrad loop (Yu et al. Alg. 1) on flat vectors.

    Domains ``i`` in ``order``; domain ``i`` against the others in ``j_orders[i]``
    (default: ``order`` without ``i``). Conflict: ``dot < -1e-10 ||pc_i|| ||ref||`` (the
    module's documented tie band, with the vectors' own norms as scales).
    """
    pc = [v.clone() for v in vecs]
    for i in order:
        others = j_orders[i] if j_orders is not None else [j for j in order if j != i]
        for j in others:
            ref = pc[j] if reference == "projected" else vecs[j]
            dot = torch.dot(pc[i], ref)
            nrm = torch.dot(ref, ref)
            if dot < -1e-10 * pc[i].norm() * ref.norm() and nrm > 0:
                pc[i] = pc[i] - dot / (nrm + eps) * ref
    return pc


def naive_simultaneous(vecs: list[torch.Tensor], eps: float) -> list[torch.Tensor]:
    out = []
    for i, gi in enumerate(vecs):
        new = gi.clone()
        for j, gj in enumerate(vecs):
            if j == i:
                continue
            dot = torch.dot(gi, gj)
            nrm = torch.dot(gj, gj)
            if dot < -1e-10 * gi.norm() * gj.norm() and nrm > 0:
                new = new - dot / (nrm + eps) * gj
        out.append(new)
    return out


def naive_pcgrad(grads: list[torch.Tensor], order: list[int], reference: str, eps: float) -> list[torch.Tensor]:
    num_domains = grads[0].shape[0]
    flat = torch.cat([g.reshape(num_domains, -1) for g in grads], dim=1)
    pc = naive_project([flat[d] for d in range(num_domains)], order, reference, eps)
    total = sum(pc)
    out, start = [], 0
    for g in grads:
        n = g[0].numel()
        out.append(total[start : start + n].reshape(g.shape[1:]))
        start += n
    return out


def naive_auto(numel: int) -> int:
    return min(100, max(5, int(math.floor(math.sqrt(numel) + 0.5))))


def naive_pieces(
    grads: list[torch.Tensor], layerwise: bool, slices: int | str, slicing: str, min_slice: int = 1
) -> list[list[torch.Tensor]]:
    """Element indices of every piece of every unit (torch.tensor_split / torch.chunk),
    at most ``numel // min_slice`` pieces; dim0: fewer chunks until the last is long enough."""
    numels = [g[0].numel() for g in grads] if layerwise else [sum(g[0].numel() for g in grads)]
    out = []
    for u, numel in enumerate(numels):
        n = naive_auto(numel) if slices == "auto" else slices
        n = min(n, max(1, numel // min_slice))
        index = torch.arange(numel)
        if slicing == "dim0" and layerwise and grads[u].dim() > 1:
            while True:
                pieces = [c.reshape(-1) for c in torch.chunk(index.view(grads[u].shape[1:]), n, dim=0)]
                if n == 1 or not pieces or len(pieces[-1]) >= min_slice:
                    break
                n -= 1
        else:
            pieces = list(torch.tensor_split(index, min(n, numel))) if numel else []
        out.append(pieces)
    return out


def drawn_orders(num_domains: int, seed: int) -> list[list[int]]:
    """The documented random orders: per domain i (index order), the others permuted by
    one torch.randperm(D - 1) of a generator seeded with ``seed`` (none when D <= 2)."""
    gen = torch.Generator().manual_seed(seed)
    orders = []
    for i in range(num_domains):
        others = [j for j in range(num_domains) if j != i]
        if len(others) > 1:
            others = [others[k] for k in torch.randperm(len(others), generator=gen).tolist()]
        orders.append(others)
    return orders


def naive_corgrad(
    grads: list[torch.Tensor],
    *,
    layerwise: bool = True,
    slices: int | str = "auto",
    min_slice: int = 16,
    slicing: str = "flat",
    projection: str = "sequential",
    reference: str = "original",
    smoothing: str | None = "dominant",
    alpha: float = 0.75,
    eps: float = 1e-12,
    reduction: str = "sum",
    order: list[int] | None = None,
    j_orders: list[list[int]] | None = None,
) -> list[torch.Tensor]:
    """CorGrad with explicit loops over units, slices and domain pairs.

    Sequential projection: domains in ``order`` (default index order), domain ``i``
    against ``j_orders[i]`` (default: ``order`` without ``i``).
    """
    num_domains = grads[0].shape[0]
    order = list(range(num_domains)) if order is None else order
    if layerwise:
        units = [g.reshape(num_domains, -1) for g in grads]
    else:
        units = [torch.cat([g.reshape(num_domains, -1) for g in grads], dim=1)]
    sums = []
    for unit, pieces in zip(units, naive_pieces(grads, layerwise, slices, slicing, min_slice)):
        corrected = unit.clone()
        for idx in pieces:
            vecs = [unit[d, idx] for d in range(num_domains)]
            if projection == "simultaneous":
                pc = naive_simultaneous(vecs, eps)
            else:
                pc = naive_project(vecs, order, reference, eps, j_orders)
            for d in range(num_domains):
                corrected[d, idx] = pc[d]
        if smoothing is not None and num_domains > 1:
            norms = torch.stack([corrected[d].norm() for d in range(num_domains)])
            mean = norms.mean()
            std = ((norms - mean) ** 2).mean().sqrt()
            # documented tie margin: exceed the threshold by 1e-9 * max norm
            std = std + 1e-9 * norms.max()
            if smoothing == "dominant":
                flagged = [bool(norms[d] - mean > std) for d in range(num_domains)]
                target = corrected.mean(0)
            else:
                flagged = [bool((norms[d] - mean).abs() > std) for d in range(num_domains)]
                inl = [d for d in range(num_domains) if not flagged[d]]
                target = corrected[inl].mean(0)
            smoothed = corrected.clone()
            for d in range(num_domains):
                if flagged[d]:
                    smoothed[d] = alpha * corrected[d] + (1 - alpha) * target
            corrected = smoothed
        total = corrected.sum(0)
        sums.append(total / num_domains if reduction == "mean" else total)
    if layerwise:
        return [s.reshape(g.shape[1:]) for s, g in zip(sums, grads)]
    out, start = [], 0
    for g in grads:
        n = g[0].numel()
        out.append(sums[0][start : start + n].reshape(g.shape[1:]))
        start += n
    return out


def naive_agree(g: torch.Tensor, rule: str) -> torch.Tensor:
    signs = torch.sign(g)
    if rule == "paper":
        return (signs == signs[0]).all(0)
    return signs.sum(0).abs() == g.shape[0]


def naive_and_mask(g: torch.Tensor, tau: float) -> torch.Tensor:
    mask = (torch.sign(g).mean(0).abs() >= tau).to(g.dtype)
    return mask * g.mean(0) / (1e-10 + mask.mean())


def naive_sand_mask(g: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    avg = g.mean(0)
    var = g.var(dim=0)
    var[torch.isnan(var)] = 1e-17
    lam = var.pow(-1)
    mask = torch.tanh(k * lam * (torch.sign(g).mean(0).abs() - tau))
    mask = torch.max(mask, torch.zeros_like(mask))
    mask[torch.isnan(mask)] = 1e-17
    return mask * avg / (1e-10 + mask.mean())


def orthogonal_pair(seed: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """(2, n): a and b = c - <a, c>/<a, a> a, so <a, b> = 0 up to rounding only."""
    gen = torch.Generator().manual_seed(seed)
    a, c = torch.randn(2, n, generator=gen, dtype=F64)
    b = c - (a @ c) / (a @ a) * a
    return torch.stack([a, b]).to(dtype)


def official_corgrad_loop(grads: list[torch.Tensor], n_parts: int = 10, alpha: float = 0.6) -> list[torch.Tensor]:
    """The authors' correct_grad (libzwo/CorGrad, domainbed/gradient.py) re-expressed:
    per tensor, torch.chunk(dim 0) views of per-domain copies, projected IN PLACE in index
    order (later domains see projected references), no epsilon; two-sided outliers of the
    tensor norms replaced by alpha g + (1 - alpha) mean(non-outliers); summed."""
    out = []
    for g in grads:
        num_domains = g.shape[0]
        bufs = [g[d].clone() for d in range(num_domains)]
        chunks = [torch.chunk(b, n_parts) for b in bufs]
        for i in range(num_domains):
            for c in range(len(chunks[i])):
                gi = chunks[i][c]
                for p in range(num_domains):
                    if p == i:
                        continue
                    gj = chunks[p][c]
                    dot = torch.dot(gi.flatten(), gj.flatten())
                    if dot < 0:
                        gi -= dot / (gj**2).sum() * gj
        norms = torch.stack([b.norm() for b in bufs])
        mean, std = norms.mean(), ((norms - norms.mean()) ** 2).mean().sqrt()
        outliers = [d for d in range(num_domains) if (norms[d] - mean).abs() > std]
        inliers = torch.stack([bufs[d] for d in range(num_domains) if d not in outliers]).mean(0)
        for d in outliers:
            bufs[d] = alpha * bufs[d] + (1 - alpha) * inliers
        out.append(torch.stack(bufs).sum(0))
    return out


# ------------------------------------------------------- the counter noise stream, by hand

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64's output function on a Python int (Steele, Lea, Flood, OOPSLA 2014)."""
    z &= _U64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _U64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def counter_normal_reference(
    key0: int, key1: int, i: int, x: tuple[float, ...], f: tuple[float, ...]
) -> tuple[float, str]:
    """Value ``i`` of the counter stream, one Python float at a time, as the docstring of
    ``domaingrad.gradients.surgery._noise`` defines it (ziggurat edges ``x``, heights
    ``f``; the float32 widths and the thresholds are derived here from them), and how it
    ended: ``"first"`` (the first try's rectangle), ``"rect"`` (a later try's), ``"wedge"``
    or ``"tail"``."""
    h = _mix64(key0 + (i // 2) * _GOLDEN)
    r = h >> 32 if i % 2 else h & 0xFFFFFFFF
    seq = _mix64(key1 + i * _GOLDEN)
    t = 0

    def word() -> int:
        nonlocal t
        t += 1
        return _mix64(seq + t * _GOLDEN)

    how = "first"
    while True:
        k, negative, a = r & 511, bool(r & 512), r >> 10
        v = _float32(a * _float32(x[k] * 2.0**-22))  # a float32 product: exact product, one rounding
        v = -v if negative else v
        if a < math.ceil(2.0**22 * (x[k + 1] / x[k])):
            return v, how
        if k == 0:
            rr = x[1]
            while True:
                tx = -math.log(1.0 - (word() >> 11) * 2.0**-53) / rr
                ty = -math.log(1.0 - (word() >> 11) * 2.0**-53)
                if ty + ty > tx * tx:
                    far = _float32(rr + tx)
                    return (-far if negative else far), "tail"
        if f[k] + (word() >> 11) * 2.0**-53 * (f[k + 1] - f[k]) < math.exp(-0.5 * v * v):
            return v, "wedge"
        r = word() & 0xFFFFFFFF
        how = "rect"
