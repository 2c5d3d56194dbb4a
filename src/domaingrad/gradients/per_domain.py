"""Per-domain gradients: the gradient of each training domain's mean loss with respect
to every trainable parameter, stacked on a leading domain axis.

This is the Jacobian that gradient surgery methods aggregate (Agr-Sum, Agr-Rand, PCGrad,
CorGrad).

Source: Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery",
ICCV 2021, Sec. 3: at every step one minibatch per source domain is drawn, and each is
forwarded and backpropagated *separately* (so BatchNorm sees one domain at a time);
the resulting per-domain gradients g_1, ..., g_D are then combined. CorGrad (Zhou, Hu,
Zhou, Guan, Jiang, "Rethinking Domain Generalization from Perspective of Gradient
Granularity", ECAI 2024) uses the same per-domain gradients, split by parameter tensor.

Two computation paths give the same numbers up to float rounding. Caveat for float32
ReLU networks: the vmap path rounds differently from per-domain forwards, so a
pre-activation within rounding distance of 0 can take the other sign and switch a
gradient element on or off; with MNIST_CNN, a few elements then differ by ~1e-3
(per-tensor relative L2 difference measured <= 1e-3). Plain autograd is no closer to the
float64 truth in such cases. In float64 the paths agree to ~1e-16. Compare the paths
in float64, or with a norm-relative tolerance.

* ``"sequential"``: for each domain in order, one forward pass and one
  :func:`torch.autograd.grad` of that domain's mean loss; the gradients are copied into
  preallocated ``(D, *param.shape)`` tensors. Works with any model, unequal batch sizes
  and BatchNorm in training mode (running statistics are updated once per domain batch,
  in domain order, exactly as D separate forward passes would).
* ``"vmap"``: :mod:`torch.func` -- ``vmap`` over the domain axis of ``grad_and_value`` of
  a ``functional_call`` of the model, with the inputs stacked to ``(D, B, ...)``. Needs
  equal batch sizes and no module that updates running statistics in place (BatchNorm /
  InstanceNorm with ``track_running_stats=True`` in training mode), and a ``loss_fn``
  that works under ``vmap`` (``F.cross_entropy`` does).

``"auto"`` picks ``"sequential"`` on CPU, and ``"vmap"`` on other devices when vmap is
valid (sequential otherwise). Measured with ``benchmarks/bench_per_domain.py`` on this
project's CPU machine (2 cores, 2 threads, torch 2.15, quiet machine; DomainBed
MNIST_CNN + linear head, 64 samples per domain, median of 30 interleaved steps), as a
multiple of ERM's step (one forward/backward of the concatenated batch):

=====================  ============  ============  =================
shape                  sequential    vmap          fused prototype
=====================  ============  ============  =================
ColoredMNIST (2 dom.)  1.01x         1.19x         1.08x
RotatedMNIST (5 dom.)  0.99x         1.67x         1.41x
=====================  ============  ============  =================

(1 thread: 1.00x / 0.97x sequential, 1.26x / 1.58x vmap.) The convolutions dominate
and their FLOPs are the same in every variant. vmap adds work: its batching rules for
GroupNorm, and a grouped convolution for the per-domain weight gradient. The "fused
prototype" (in the benchmark only) is one concatenated forward plus per-domain weight
gradients from captured activations, which per-sample independence allows in GroupNorm
nets. It is not faster either, probably because oneDNN's combined input+weight
convolution backward beats separate weight-only calls (not profiled further). Neither
vmap nor the fused prototype is ever faster here. The choice of
vmap on CUDA is NOT measured (no GPU here): it rests on vmap turning D small kernel
launches into one large one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PerDomainGradients", "per_domain_gradients"]

Method = Literal["auto", "vmap", "sequential"]


@dataclass
class PerDomainGradients:
    """Result of :func:`per_domain_gradients`.

    Attributes:
        grads: one tensor per parameter, in the order of ``params``; ``grads[i]`` has
            shape ``(D, *params[i].shape)`` and ``grads[i][d]`` is the gradient of domain
            ``d``'s mean loss with respect to ``params[i]``. Not part of any autograd graph.
        losses: shape ``(D,)``, detached mean loss of each domain.
        logits: ``D`` detached model outputs, ``logits[d]`` of shape
            ``(B_d, num_classes)`` (whatever the model returns for domain ``d``'s batch).
    """

    grads: list[Tensor]
    losses: Tensor
    logits: list[Tensor]


def per_domain_gradients(
    model: nn.Module,
    minibatches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    params: Sequence[nn.Parameter] | None = None,
    method: Method = "auto",
) -> PerDomainGradients:
    """Gradient of each domain's mean loss with respect to each parameter.

    Each domain's batch goes through the model separately (Mansilla et al., "Domain
    Generalization via Gradient Surgery", ICCV 2021, Sec. 3: one minibatch per source
    domain, forwarded and backpropagated separately), so normalisation statistics
    computed from the batch are per domain.

    Args:
        model: the network; its train/eval mode is used as is. Its ``.grad`` fields are
            neither read nor written.
        minibatches: ``D >= 1`` pairs ``(x_d, y_d)``, one per domain, with
            ``x_d`` of shape ``(B_d, *input_shape)`` and ``y_d`` of shape ``(B_d, ...)``
            (class indices ``(B_d,)`` int64 for the default loss), ``B_d >= 1``.
        loss_fn: ``loss_fn(model(x_d), y_d)`` -> scalar mean loss of one domain's batch.
            For the vmap path it must be ``vmap``-compatible (no data-dependent Python
            control flow, no ``.item()``).
        params: the parameters to differentiate, all of them parameters of ``model``
            requiring grad, without duplicates. Default: every parameter of ``model``
            with ``requires_grad``, in ``model.named_parameters()`` order.
        method: ``"sequential"``, ``"vmap"`` or ``"auto"`` (see the module docstring;
            auto = sequential on CPU, vmap elsewhere when valid, sequential otherwise).

    Returns:
        :class:`PerDomainGradients` with ``grads[i]`` of shape
        ``(D, *params[i].shape)``, ``losses`` of shape ``(D,)`` and ``logits``.
        A parameter the loss does not depend on gets zero gradients.

    Raises:
        ValueError: empty ``minibatches``; an ``x_d``/``y_d`` length mismatch or an empty
            domain batch; ``params`` empty, duplicated, not requiring grad or not
            belonging to ``model``; an unknown ``method``; ``method="vmap"`` with unequal
            batch sizes or shapes, non-floating parameters, or a module updating running
            statistics in training mode (use ``method="sequential"``).
    """
    if method not in ("auto", "vmap", "sequential"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'sequential', got {method!r}")
    _check_minibatches(minibatches)
    names, plist = _resolve_params(model, params)

    if method == "auto":
        problem = _vmap_problem(model, minibatches, plist)
        method = _auto_method(problem, plist[0].device)
    elif method == "vmap":
        problem = _vmap_problem(model, minibatches, plist)
        if problem is not None:
            raise ValueError(
                f"method='vmap' cannot be used here: {problem}. "
                "Use method='sequential' (or 'auto', which falls back to it)."
            )

    if method == "vmap":
        return _vmap_path(model, minibatches, loss_fn, names, plist)
    return _sequential_path(model, minibatches, loss_fn, plist)


# --------------------------------------------------------------------------- checks


def _check_minibatches(minibatches: Sequence[tuple[Tensor, Tensor]]) -> None:
    if len(minibatches) == 0:
        raise ValueError("minibatches is empty: pass one (x, y) pair per training domain")
    for d, batch in enumerate(minibatches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"minibatches[{d}] must be an (x, y) pair, got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError(f"minibatches[{d}]: x and y must be tensors")
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(
                f"minibatches[{d}]: x and y need a leading batch dimension, got "
                f"x.shape={tuple(x.shape)}, y.shape={tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"minibatches[{d}]: x has {x.shape[0]} samples but y has {y.shape[0]}; they must match")
        if x.shape[0] == 0:
            raise ValueError(
                f"minibatches[{d}] is an empty batch: every domain needs at least one "
                "sample (its mean loss is undefined otherwise)"
            )


def _resolve_params(model: nn.Module, params: Sequence[nn.Parameter] | None) -> tuple[list[str], list[nn.Parameter]]:
    """Names (as in ``model.named_parameters()``) and tensors of the parameters."""
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("model has no parameter with requires_grad=True")
        return [n for n, _ in chosen], [p for _, p in chosen]

    name_of = {id(p): n for n, p in named}
    plist = list(params)
    if not plist:
        raise ValueError("params is empty: pass at least one parameter, or None for all")
    names: list[str] = []
    seen: set[int] = set()
    for i, p in enumerate(plist):
        if id(p) not in name_of:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model; "
                "pass parameters from model.parameters()"
            )
        if id(p) in seen:
            raise ValueError(f"params[{i}] ({name_of[id(p)]}) is given twice")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] ({name_of[id(p)]}) has requires_grad=False: its gradient cannot be computed")
        seen.add(id(p))
        names.append(name_of[id(p)])
    return names, plist


def _running_stats_modules(model: nn.Module) -> list[str]:
    """Names of modules that update running statistics in place in this forward."""
    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)  # BatchNorm*, InstanceNorm*
        and m.training
        and m.track_running_stats
    ]


def _vmap_problem(
    model: nn.Module,
    minibatches: Sequence[tuple[Tensor, Tensor]],
    plist: Sequence[nn.Parameter],
) -> str | None:
    """Why the vmap path cannot be used, or None if it can."""
    x0, y0 = minibatches[0]
    for d, (x, y) in enumerate(minibatches[1:], start=1):
        if x.shape != x0.shape or y.shape != y0.shape:
            sizes = [tuple(xb.shape) for xb, _ in minibatches]
            return (
                "vmap needs equal batch sizes and shapes across domains, got x shapes "
                f"{sizes} (domain {d} differs from domain 0)"
            )
        if x.dtype != x0.dtype or y.dtype != y0.dtype or x.device != x0.device:
            return f"domain {d}'s tensors differ in dtype/device from domain 0's"
    bad = [i for i, p in enumerate(plist) if not p.is_floating_point()]
    if bad:
        return f"parameters {bad} are not floating point"
    stats = _running_stats_modules(model)
    if stats:
        return (
            "module(s) " + ", ".join(stats) + " update running statistics in place in training mode (BatchNorm/"
            "InstanceNorm with track_running_stats=True), which vmap cannot batch "
            "and which must be updated once per domain in order"
        )
    return None


def _auto_method(vmap_problem: str | None, device: torch.device) -> Literal["vmap", "sequential"]:
    """The path ``method="auto"`` takes.

    Sequential on CPU, where it was measured to be the faster one (module docstring);
    vmap on other devices when it is valid (not measured here: no GPU).
    """
    if vmap_problem is None and device.type != "cpu":
        return "vmap"
    return "sequential"


# --------------------------------------------------------------------------- paths


def _sequential_path(
    model: nn.Module,
    minibatches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    plist: Sequence[nn.Parameter],
) -> PerDomainGradients:
    n_dom = len(minibatches)
    grads = [torch.empty((n_dom, *p.shape), dtype=p.dtype, device=p.device) for p in plist]
    losses: list[Tensor] = []
    logits: list[Tensor] = []
    with torch.enable_grad():
        for d, (x, y) in enumerate(minibatches):
            out = model(x)
            loss = loss_fn(out, y)
            _check_scalar(loss, d)
            g = torch.autograd.grad(loss, plist, allow_unused=True)
            for buf, gd in zip(grads, g):
                if gd is None:
                    buf[d].zero_()
                else:
                    buf[d].copy_(gd)
            losses.append(loss.detach())
            logits.append(out.detach())
            del out, loss, g
    return PerDomainGradients(grads=grads, losses=torch.stack(losses), logits=logits)


def _vmap_path(
    model: nn.Module,
    minibatches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: Sequence[str],
    plist: Sequence[nn.Parameter],
) -> PerDomainGradients:
    from torch.func import functional_call, grad_and_value, vmap

    xs = torch.stack([x for x, _ in minibatches])  # (D, B, *input_shape)
    ys = torch.stack([y for _, y in minibatches])  # (D, B, ...)

    def domain_loss(pdict: dict[str, Tensor], x: Tensor, y: Tensor):
        out = functional_call(model, pdict, (x,))
        loss = loss_fn(out, y)
        _check_scalar(loss, None)  # shapes inside vmap are per domain
        return loss, out

    pdict = {n: p.detach() for n, p in zip(names, plist)}
    fn = vmap(
        grad_and_value(domain_loss, has_aux=True),
        in_dims=(None, 0, 0),
        randomness="different",  # e.g. dropout: an independent mask per domain
    )
    # The model's other parameters still require grad; no_grad keeps the outer autograd
    # from recording a graph (torch.func.grad ignores the outer no_grad by design).
    with torch.no_grad():
        gdict, (losses, outs) = fn(pdict, xs, ys)
    return PerDomainGradients(
        grads=[gdict[n] for n in names],
        losses=losses.detach(),
        logits=list(outs.detach().unbind(0)),
    )


def _check_scalar(loss: Tensor, d: int | None) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        which = "each domain's batch" if d is None else f"domain {d}'s batch"
        raise ValueError(f"loss_fn must return a scalar (the mean loss of {which}), got {shape}; use reduction='mean'")
