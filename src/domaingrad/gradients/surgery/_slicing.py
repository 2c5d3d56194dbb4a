"""CorGrad's units and pieces: how each unit (a parameter tensor, or the whole network)
is cut into slices (Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from
Perspective of Gradient Granularity", ECAI 2024, sec. 3.4), described by a few uniform
runs per tensor instead of one entry per piece."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._plumbing import _check_option, _is_int

#: ``(start, count, size, first_piece)``: ``count`` consecutive pieces of ``size``
#: elements from ``start`` (or part of one piece when ``count == 1``)
Run = tuple[int, int, int, int]


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


def _runs(piecing: _Piecing, lo: int, hi: int) -> list[Run]:
    """Uniform runs covering the global range ``[lo, hi)`` of a pieced vector.

    Returns ``(start, count, size, first_piece)`` tuples: ``count`` consecutive pieces
    (or parts of one piece when ``count == 1``) of ``size`` elements from ``start``.
    At most 6 runs, whatever the number of pieces.
    """
    runs: list[Run] = []
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


def _element_pieces(member_runs: list[list[Run]], device: torch.device) -> Tensor:
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


def _check_slicing(layerwise: bool, slices: int | str, min_slice: int, slicing: str) -> None:
    """Raise ValueError for a unit or slicing option of corgrad outside its documented values."""
    if not isinstance(layerwise, bool):
        raise ValueError(f"layerwise must be a bool, got {layerwise!r}")
    if slices != "auto" and not (_is_int(slices) and int(slices) >= 1):
        raise ValueError(f"slices must be an int >= 1 or 'auto', got {slices!r}")
    if not (_is_int(min_slice) and int(min_slice) >= 1):
        raise ValueError(f"min_slice must be an int >= 1, got {min_slice!r}")
    _check_option(slicing, ("flat", "dim0"), "slicing")


def _cut_units(
    tensors: list[Tensor], layerwise: bool, slices: int | str, slicing: str, min_slice: int
) -> tuple[list[list[Run]], Tensor, int]:
    """Pieces of every unit, as runs per tensor (see :func:`corgrad`, step 2).

    Args:
        tensors: the per-domain gradients, tensor ``t`` of shape ``(D, *param_t.shape)``.
        layerwise: one unit per tensor (True) or the whole network as one unit.
        slices: ``"auto"`` or the number of pieces per unit; slicing: ``"flat"`` or
            ``"dim0"`` (``"flat"`` is used when not ``layerwise``); min_slice: fewest
            elements a piece may hold.

    Returns:
        Per tensor its runs ``(local start, count, size, global piece index)``, the unit
        of every piece (``(P,)`` int64 on the tensors' device) and the number of units.
    """

    def n_slices(numel: int) -> int:
        return auto_slices(numel) if slices == "auto" else int(slices)

    numels = [g[0].numel() for g in tensors]
    segments: list[list[Run]] = []
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
    return segments, torch.cat(unit_of_piece).to(device), num_units
