"""Shared plumbing of the gradient-surgery rules.

The result type, the checks of the inputs and options shared by every rule, the groups
of tensors processed together (small tensors packed side by side) with their reusable
scratch buffers, and the base of the configured rule objects.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["sum", "mean"]
AgreementRule = Literal["paper", "official"]
Reference = Literal["original", "projected"]


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
                f"grads[{t}] is 0-dimensional; each tensor needs a leading domain axis, shape (D, *param.shape)"
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
                f"inconsistent number of domains: grads[0] has D = {num_domains} on axis 0 but grads[{t}] has D = {d}"
            )
        elif g.device != device:
            raise ValueError(f"grads[{t}] is on {g.device} but grads[0] is on {device}")
    assert num_domains is not None
    return tensors, num_domains


def _scale(reduction: str, num_domains: int) -> float:
    _check_option(reduction, ("sum", "mean"), "reduction")
    return 1.0 if reduction == "sum" else 1.0 / num_domains


def _resolve_order(num_domains: int, generator: torch.Generator | None, order: Sequence[int] | None) -> list[int]:
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


def _check_fixed_order(order: object, words: str = "'random'") -> list[int]:
    """A fixed domain order given to a rule object: a permutation of ``range(len(order))``
    (its length is checked against D at the call). ``words``: the other accepted values,
    for the error message."""
    message = f"order must be {words} or a permutation of range(D) such as [2, 0, 1], got {order!r}"
    if isinstance(order, (str, bytes)) or not isinstance(order, Iterable):
        raise ValueError(message)
    items = list(order)
    if not all(_is_int(i) for i in items) or sorted(int(i) for i in items) != list(range(len(items))):
        raise ValueError(message)
    return [int(i) for i in items]


def _check_generator(generator: object, *, optional: bool) -> None:
    """``generator`` must be a ``torch.Generator`` (or None when ``optional``)."""
    if generator is None and optional:
        return
    if not isinstance(generator, torch.Generator):
        expected = "a torch.Generator or None" if optional else "a torch.Generator"
        raise ValueError(f"generator must be {expected}, got {type(generator).__name__}")


def _check_real(value: object, name: str) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


# ------------------------------------------------------------ groups and scratch buffers

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
    """Reusable temporaries, one set per dtype, of at most ``_CHUNK`` elements.

    ``chunk`` is the block length of the blocked kernels that use these buffers (the
    value of ``_CHUNK`` when the scratch was made: the only place the constant is read).
    """

    def __init__(self, groups: list[_Group]) -> None:
        self.chunk = _CHUNK
        self._size = max(1, min(self.chunk, max((grp.out.numel() for grp in groups), default=1)))
        self._device = groups[0].out.device if groups else torch.device("cpu")
        self._bufs: dict[torch.dtype, list[Tensor]] = {}

    def get(self, dtype: torch.dtype, n: int, count: int = 2) -> list[Tensor]:
        """``count`` distinct buffers of ``n`` elements (``n <= chunk``)."""
        bufs = self._bufs.setdefault(dtype, [])
        while len(bufs) < count:
            bufs.append(torch.empty(self._size, dtype=dtype, device=self._device))
        return [b[:n] for b in bufs[:count]]


def _count(mask: Tensor) -> Tensor:
    """Exact number of ones in a 0/1 float block of at most ``_CHUNK`` elements."""
    if mask.dtype in (torch.float16, torch.bfloat16):
        return mask.sum(dtype=torch.float32)
    return mask.sum()


# ---------------------------------------------------------------- configured rule objects


def _show(value: object) -> str:
    """``repr`` of an option, with generators shown by their device (their state is not
    part of a readable representation)."""
    if isinstance(value, torch.Generator):
        return f"torch.Generator(device={str(value.device)!r})"
    return repr(value)


class _Rule:
    """Base of the configured rule objects: the options as attributes, a readable repr.

    Subclasses list the constructor's keyword options in ``_options`` and implement
    ``__call__(grads) -> SurgeryResult``.
    """

    _options: tuple[str, ...] = ()

    def __call__(self, grads: Sequence[Tensor]) -> SurgeryResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={_show(getattr(self, name))}" for name in self._options)
        return f"{type(self).__name__}({args})"
