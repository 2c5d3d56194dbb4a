"""The float64 Gram engine of PCGrad and CorGrad.

Every projected gradient is a linear combination of the original ones, so the rules run
on small ``D x D`` Gram and coefficient matrices: per-piece Gram matrices (float64
products and sums, blocked), the sequential and simultaneous projections on coefficient
matrices, the tolerances of their decisions, and the final weighted combination.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import _native
from ._plumbing import _Group
from ._slicing import Run, _element_pieces

# Elements per domain in one block of the float64 Gram products: the float64 copy of a
# block stays in cache (measured on CPU: 2^16 beats 2^14 and 2^18 for D = 3 to 8).
_GRAM_CHUNK = 1 << 16
# Columns per part of a long block: its Gram product is one batched product of these
# parts (``baddbmm``), which torch spreads over the threads batch item by batch item; one
# ``D x L @ L x D`` product of a long block runs on one thread (a 2-thread CPU gained
# nothing from its second thread). Each part is summed in a fixed order, so the Gram
# matrix does not depend on the number of threads.
_GRAM_SPLIT = 1 << 13
# Pieces at least this long get their Gram matrix from the native kernel (on CPU float32
# and float64); shorter ones, many per tensor, from the batched torch products.
_NATIVE_MIN_PIECE = 1 << 12
# Columns per batch item of the weighted combination of one long run (same reason: a
# ``1 x D @ D x n`` product runs on one thread, a batch of them on all).
_COMBINE_SPLIT = 1 << 16


def _gram_run(x: Tensor) -> Tensor:
    """Per-piece Gram matrices of a uniform run. ``x: (D, P, K) -> (P, D, D)`` float64.

    Every product and every sum is formed in float64, whatever the input dtype (the
    products of float32 or half values are then exact), on blocks copied into one
    reused contiguous float64 buffer of at most ``_GRAM_CHUNK`` elements per domain.
    Packed small tensors (:func:`_segment_gram`) use the same precision, so a Gram
    matrix -- and every conflict decision taken on it -- does not depend on the size of
    a tensor or on how it is blocked, beyond float64 rounding. A long block is cut into
    parts of ``_GRAM_SPLIT`` columns whose products form one batched product (all
    threads take part); part ``j`` of every block accumulates into its own ``D x D``
    matrix, and these are summed at the end, in the same order whatever the number of
    threads.
    """
    num_domains, num_pieces, k = x.shape
    out = torch.zeros(num_pieces, num_domains, num_domains, dtype=torch.float64, device=x.device)
    if k == 0 or num_pieces == 0:
        return out
    if k >= _GRAM_CHUNK or num_pieces == 1:  # piece by piece, each in blocks of columns
        width = min(k, _GRAM_CHUNK)
        buf = torch.empty(num_domains, width, dtype=torch.float64, device=x.device)
        num_parts = max(1, width // _GRAM_SPLIT)
        parts = torch.empty(num_parts, num_domains, num_domains, dtype=torch.float64, device=x.device)
        for p in range(num_pieces):  # at most numel / _GRAM_CHUNK pieces here
            parts.zero_()
            for a in range(0, k, _GRAM_CHUNK):
                v = x[:, p, a : a + _GRAM_CHUNK]
                blk = buf[:, : v.shape[1]]
                blk.copy_(v)
                _accumulate_block_gram(blk, parts)
            torch.sum(parts, 0, out=out[p])
        return out
    per_block = max(1, _GRAM_CHUNK // k)  # whole pieces per block
    buf = torch.empty(min(per_block, num_pieces), num_domains, k, dtype=torch.float64, device=x.device)
    for p0 in range(0, num_pieces, per_block):
        xs = x[:, p0 : p0 + per_block, :]
        blk = buf[: xs.shape[1]]
        blk.copy_(xs.transpose(0, 1))  # (P', D, K), contiguous: the fast batched product
        torch.bmm(blk, blk.transpose(1, 2), out=out[p0 : p0 + xs.shape[1]])
    return out


def _native_rows_usable(rows: Tensor) -> bool:
    """Whether the native Gram and combination kernels take the domain rows ``rows``,
    ``(D, N)`` or ``(D, P, K)``: at most ``GRAM_MAX_DOMAINS`` of them, each contiguous."""
    return _native.usable(rows) and rows.stride(-1) == 1 and rows.shape[0] <= _native.GRAM_MAX_DOMAINS


def _native_grams(runs: Sequence[tuple[Tensor, int, int, int]], gram: Tensor) -> None:
    """``gram[p] += X X^T`` for every run ``(flat, start, length, p)``, ``X`` the columns
    ``start .. start + length - 1`` of the ``(D, N)`` rows ``flat`` (CPU, float32 or
    float64, see :func:`_native_rows_usable`), on the native kernel.

    Every product and sum is float64 (as in :func:`_gram_run`; the order differs, so the
    two agree to float64 rounding). The runs are cut into ranges of ``_native.RANGE``
    columns, run on all threads; each range's matrix is added to ``gram[p]`` in range
    order, so the result does not depend on the number of threads.
    """
    if not runs:
        return
    num_domains = gram.shape[-1]
    tasks = []
    for flat, start, length, p in runs:
        fn = _native.kernel("dg_gram", flat.dtype)
        item, ptr, stride = flat.element_size(), flat.data_ptr(), flat.stride(0)
        tasks += [(fn, ptr + (start + a) * item, stride, m, p) for a, m in _native.ranges(length)]

    def run(task: tuple) -> tuple[int, ctypes.Array]:
        fn, ptr, stride, m, p = task
        out = (ctypes.c_double * (num_domains * num_domains))()
        fn(ptr, num_domains, stride, m, out)
        return p, out

    results = _native.run_ranges(tasks, run)
    parts = torch.tensor([list(out) for _, out in results], dtype=torch.float64).view(-1, num_domains, num_domains)
    for (p, _), part in zip(results, parts):
        gram[p] += part.to(gram.device)


def _accumulate_block_gram(blk: Tensor, parts: Tensor) -> None:
    """``parts[j] += B_j B_j^T`` for the parts ``B_j`` of ``_GRAM_SPLIT`` columns of a
    float64 block ``blk (D, L)``, in one batched product; the last ``L mod _GRAM_SPLIT``
    columns go to ``parts[0]``. ``parts: (M, D, D)`` with ``M >= L // _GRAM_SPLIT``."""
    num_domains, length = blk.shape
    m = length // _GRAM_SPLIT
    head = m * _GRAM_SPLIT
    if m > 0:
        split = blk[:, :head].view(num_domains, m, _GRAM_SPLIT).transpose(0, 1)  # (m, D, S), a view
        parts[:m].baddbmm_(split, split.transpose(1, 2))
    if head < length:
        tail = blk[:, head:]
        parts[0].addmm_(tail, tail.T)


def _native_combine(x: Tensor, coef: Tensor, out: Tensor) -> None:
    """:func:`_combine_run` on the native kernel: the coefficients rounded to the dtype
    (as the torch path rounds them), every product and sum in float64, in domain order,
    rounded once to the output dtype (so more accurate than the batched float32
    product); the pieces are cut into ranges of ``_native.RANGE`` columns, run on all
    threads, each component computed on its own (thread-count independent)."""
    num_domains, pieces, k = x.shape
    fn = _native.kernel("dg_combine", x.dtype)
    c = coef.to(device="cpu", dtype=torch.float64).contiguous()
    item, stride = x.element_size(), x.stride(0)
    tasks = [
        (x.data_ptr() + (p * x.stride(1) + a) * item, c.data_ptr() + 8 * p * num_domains,
         out.data_ptr() + (p * k + a) * item, m)
        for p in range(pieces)
        for a, m in _native.ranges(k)
    ]  # fmt: skip
    _native.run_ranges(tasks, lambda t: fn(t[0], num_domains, stride, t[3], t[1], t[2]))


def _combine_run(x: Tensor, coef: Tensor, out: Tensor) -> None:
    """``out[p, :] = sum_d coef[p, d] * x[d, p, :]``; x ``(D, P, K)``, coef ``(P, D)``,
    out a contiguous ``(P, K)`` view. Pieces of at least ``_NATIVE_MIN_PIECE`` columns
    the native kernel takes are combined there (in float64, see :func:`_native_combine`);
    otherwise half types are combined in float32, and a single long piece in parts of
    ``_COMBINE_SPLIT`` columns, one batched product."""
    if x.dtype in (torch.float16, torch.bfloat16):
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        _combine_run(x.float(), coef, tmp)
        out.copy_(tmp)
        return
    if x.shape[2] >= _NATIVE_MIN_PIECE and out.is_contiguous() and _native_rows_usable(x):
        _native_combine(x, coef, out)
        return
    c = coef.to(dtype=x.dtype)
    if x.shape[1] != 1:
        torch.bmm(c.unsqueeze(1), x.transpose(0, 1), out=out.unsqueeze(1))
        return
    num_domains, _, k = x.shape
    m = k // _COMBINE_SPLIT
    head = m * _COMBINE_SPLIT if m > 1 else 0
    if head:
        parts = x[:, 0, :head].view(num_domains, m, _COMBINE_SPLIT).transpose(0, 1)  # (m, D, S), a view
        torch.bmm(c.expand(m, 1, num_domains), parts, out=out[0, :head].view(m, 1, _COMBINE_SPLIT))
    if head < k:
        torch.mm(c, x[:, 0, head:], out=out[:, head:])


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
    # D x D work per piece, serial over the pairs: NumPy float64 on the CPU (a few
    # microseconds per operation where torch takes several times that; the same
    # decisions on every device, given the same Gram matrices)
    g = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    num_pieces, num_domains, _ = g.shape
    eye = np.eye(num_domains)
    weights = np.broadcast_to(eye, g.shape).copy()
    norms = np.sqrt(np.clip(np.diagonal(g, axis1=1, axis2=2), 0.0, None))  # (P, D)
    count = 0
    ratio = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):  # np.where computes both branches
        for i in i_order:
            w = weights[:, i, :].copy()
            gw = np.einsum("pkl,pl->pk", g, w)  # G w, updated with w below
            for j in j_orders[i]:
                if reference == "projected":
                    r = weights[:, j, :]
                    gr = np.einsum("pkl,pl->pk", g, r)
                    rr = (r * gr).sum(-1)
                    dot = (w * gr).sum(-1)
                else:  # r = e_j: G r is column j of G
                    r = np.broadcast_to(eye[j], w.shape)
                    gr = g[:, :, j]
                    rr = g[:, j, j]
                    dot = gw[:, j]
                ww = (w * gw).sum(-1)
                scale_r = (np.abs(r) * norms).sum(-1)
                scale_w = (np.abs(w) * norms).sum(-1)
                conflict = (dot < -_CONFLICT_RTOL * scale_w * scale_r) & (rr > _ZERO_RTOL * scale_r * scale_r)
                coef = np.where(conflict, dot / (rr + eps), 0.0)
                # ||coef * g_j|| / ||g_i^pc|| (= |cos| when eps = 0)
                proj_ratio = np.abs(coef) * np.sqrt(np.clip(rr, 0.0, None)) / np.sqrt(np.clip(ww, 1e-300, None))
                count += int(conflict.sum())
                ratio += float(np.where(conflict, np.minimum(proj_ratio, 1.0), 0.0).sum())
                w = w - coef[:, None] * r
                gw = gw - coef[:, None] * gr
            weights[:, i, :] = w
    return torch.from_numpy(weights).to(gram.device), count, ratio


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


def _piece_grams(
    groups: list[_Group], segments: list[list[Run]], num_pieces: int, num_domains: int, device: torch.device
) -> tuple[Tensor, dict[int, Tensor]]:
    """``(P, D, D)`` float64 Gram matrices of the original gradients on every piece, and
    the piece index of every element of the packed groups (small tensors)."""
    gram = torch.zeros(num_pieces, num_domains, num_domains, dtype=torch.float64, device=device)
    elem_piece: dict[int, Tensor] = {}
    native: list[tuple[Tensor, int, int, int]] = []
    for gi, grp in enumerate(groups):
        if grp.packed:
            elem_piece[gi] = _element_pieces([segments[t] for t in grp.members], device)
            _segment_gram(grp.flat, elem_piece[gi], gram)
        else:
            flat = grp.flat
            for s, c, k, p in segments[grp.members[0]]:
                if k >= _NATIVE_MIN_PIECE and _native_rows_usable(flat):
                    native += [(flat, s + q * k, k, p + q) for q in range(c)]
                else:
                    gram[p : p + c] += _gram_run(flat[:, s : s + c * k].view(num_domains, c, k))
    _native_grams(native, gram)
    return gram, elem_piece


def _combine_pieces(
    groups: list[_Group],
    segments: list[list[Run]],
    elem_piece: dict[int, Tensor],
    coef: Tensor,
    is_plain: Tensor,
    scale: float,
) -> None:
    """Write ``scale * sum_k coef[p, k] g_k`` of every piece into the groups' outputs."""
    num_domains = coef.shape[1]
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
