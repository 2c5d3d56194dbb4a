"""Gradient surgery inside your own training loop: ``surgery_backward``.

It takes the per-domain losses (or per-domain gradients computed yourself), combines the
domain gradients with a rule and writes the result into each parameter's ``.grad``;
you then call your own optimizer::

    rule = PCGrad(generator=torch.Generator().manual_seed(0))
    losses = [F.cross_entropy(model(x), y) for x, y in minibatches]  # one per domain
    optimizer.zero_grad()
    stats = surgery_backward(losses, model.parameters(), rule=rule)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._agr_rand import agr_rand
from ._agreement import agr_sum
from ._corgrad import corgrad
from ._masks import and_mask, sand_mask
from ._pcgrad import pcgrad
from ._plumbing import SurgeryResult, _Rule

#: rule name -> function of :mod:`domaingrad.gradients.surgery`
RULES: dict[str, Callable[..., SurgeryResult]] = {
    "agr_sum": agr_sum,
    "agr_rand": agr_rand,
    "pcgrad": pcgrad,
    "corgrad": corgrad,
    "and_mask": and_mask,
    "sand_mask": sand_mask,
}

_FORMS = "D scalar losses, D lists of per-parameter gradients, or one (D, *param.shape) tensor per parameter"
_ONE_LOSS_PER_DOMAIN = (
    "expected a list of D scalar losses (shape ()), one per domain, e.g. "
    "[F.cross_entropy(model(x), y) for x, y in minibatches]; per-sample losses (reduction='none') "
    "must first be averaged within each domain"
)


def _check_not_one_tensor(losses_or_grads: Any) -> None:
    """Refuse a single tensor given where D per-domain items are expected: a scalar (one
    loss for everything), a 1-D tensor (per-sample losses of a concatenated batch, or
    ``torch.stack`` of the domain losses) or a 2-D one (per-sample losses of D domains)."""
    if not isinstance(losses_or_grads, Tensor):
        return
    shape = tuple(losses_or_grads.shape)
    if losses_or_grads.dim() == 0:
        raise ValueError(f"losses_or_grads is one scalar loss; {_ONE_LOSS_PER_DOMAIN}")
    if losses_or_grads.dim() == 1:
        raise ValueError(
            f"losses_or_grads is one tensor of shape {shape}: per-sample losses? {_ONE_LOSS_PER_DOMAIN}. If it "
            "already holds one loss per domain, pass list(losses)"
        )
    if losses_or_grads.dim() == 2:
        raise ValueError(
            f"losses_or_grads is one tensor of shape {shape}: per-sample losses of {shape[0]} domains? "
            f"{_ONE_LOSS_PER_DOMAIN}: list(losses.mean(dim=1)) for a (D, B) tensor (stacked gradients go in a "
            "list, one (D, *param.shape) tensor per parameter)"
        )
    raise ValueError(f"losses_or_grads is one tensor of shape {shape}; expected {_FORMS}, as a list")


def _looks_like_per_sample_losses(items: list[Any], params: list[torch.nn.Parameter]) -> bool:
    """Non-scalar tensors in the autograd graph (``grad_fn`` set: computed from the
    parameters, as losses are; gradients from ``torch.autograd.grad`` are not) that are not
    shaped as stacked gradients."""
    return all(isinstance(t, Tensor) and t.dim() >= 1 and t.grad_fn is not None for t in items) and not (
        len(items) == len(params) and all(t.shape[1:] == p.shape for t, p in zip(items, params))
    )


def _from_losses(items: list[Any], params: list[torch.nn.Parameter]) -> list[Tensor]:
    for d, loss in enumerate(items):
        if not (isinstance(loss, Tensor) and loss.dim() == 0):
            what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"losses_or_grads[0] is a scalar loss but losses_or_grads[{d}] is {what}: {_ONE_LOSS_PER_DOMAIN}"
            )
        if not loss.requires_grad:
            raise ValueError(f"loss {d} does not require grad: compute it from the parameters, outside torch.no_grad()")
    per_domain = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in items]
    return [
        torch.stack([g if g is not None else torch.zeros_like(p) for g in grads])
        for p, grads in zip(params, zip(*per_domain))
    ]


def _from_gradient_lists(items: list[Any], params: list[torch.nn.Parameter]) -> list[Tensor]:
    for d, grads in enumerate(items):
        if isinstance(grads, Tensor) or not isinstance(grads, Sequence) or len(grads) != len(params):
            size = f"{len(grads)} entries" if isinstance(grads, Sequence) else type(grads).__name__
            raise ValueError(
                f"losses_or_grads[{d}] is {size}; expected {_FORMS} (here {len(params)} parameters require grad)"
            )
        for t, (g, p) in enumerate(zip(grads, params)):
            if not isinstance(g, Tensor) or g.shape != p.shape:
                got = f"shape {tuple(g.shape)}" if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"gradient {t} of domain {d} has {got}, expected a tensor of the parameter's shape {tuple(p.shape)}"
                )
    return [torch.stack(list(per_param)) for per_param in zip(*items)]


def stack_domain_gradients(losses_or_grads: Sequence[Any], params: Sequence[torch.nn.Parameter]) -> list[Tensor]:
    """Per-parameter tensors of shape (D, *param.shape) from one of three inputs.

    Args:
        losses_or_grads: either D scalar losses (one per domain, differentiable with
            respect to ``params``), or D sequences of gradients (one tensor per
            parameter, in ``params`` order, of the parameter's shape), or already stacked
            tensors, one per parameter, of shape (D, *param.shape).
        params: the parameters, in order. A parameter a loss does not depend on gets a
            zero gradient for that domain.

    Returns:
        One tensor of shape (D, *param.shape) per parameter.

    Raises:
        ValueError: if the input matches none of the three forms (a single tensor, e.g.
            per-sample losses of shape (B,) or (D, B), included: the message says which
            shape was expected), or a loss does not require grad.

    Example:

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> stack_domain_gradients([(w * w).sum(), 3 * w.sum()], [w])[0].tolist()
    [[2.0, 4.0], [3.0, 3.0]]
    """
    _check_not_one_tensor(losses_or_grads)
    items = list(losses_or_grads)
    if not items:
        raise ValueError("surgery_backward needs at least one domain: got no losses or gradients")
    first = items[0]
    if isinstance(first, Tensor) and first.dim() == 0:
        return _from_losses(items, list(params))
    if isinstance(first, Tensor):
        if _looks_like_per_sample_losses(items, list(params)):
            shapes = ", ".join(str(tuple(t.shape)) for t in items[:4]) + (", ..." if len(items) > 4 else "")
            raise ValueError(
                f"losses_or_grads holds {len(items)} tensors of shapes {shapes}, not scalar losses: "
                f"{_ONE_LOSS_PER_DOMAIN}"
            )
        if len(items) != len(params) or any(
            not isinstance(g, Tensor) or g.dim() < 1 or g.shape[1:] != p.shape for g, p in zip(items, params)
        ):
            expected = ", ".join(str(("D", *p.shape)).replace("'", "") for p in params[:4])
            got = ", ".join(str(tuple(g.shape)) if isinstance(g, Tensor) else type(g).__name__ for g in items[:4])
            raise ValueError(
                f"stacked gradients must be one tensor per parameter ({len(params)} require "
                f"grad), each of shape (D, *param.shape): {expected}{', ...' if len(params) > 4 else ''}; got "
                f"{len(items)} items of shapes {got}{', ...' if len(items) > 4 else ''}"
            )
        return items
    return _from_gradient_lists(items, list(params))


def surgery_backward(
    losses_or_grads: Sequence[Any],
    params: Iterable[torch.nn.Parameter],
    rule: str | Callable[[Sequence[Tensor]], SurgeryResult] | Callable[..., SurgeryResult] = "pcgrad",
    **options: Any,
) -> dict[str, float]:
    """Set ``param.grad`` to the combination of the per-domain gradients by ``rule``.

    Args:
        losses_or_grads: D per-domain losses or gradients (see :func:`stack_domain_gradients`).
        params: the parameters to update (e.g. ``model.parameters()``); those that do not
            require grad are skipped.
        rule: a name in :data:`RULES` (its function is called with ``**options``), a
            function with the same contract (``rule(grads, **options)``), or a configured
            rule object such as ``PCGrad(generator=g)`` or ``CorGrad(total_steps=T)``
            (``rule(grads)``; its options were given to its constructor).
        **options: keyword options of a rule name or function (e.g. ``generator=``,
            ``reduction=``).

    Returns:
        The rule's statistics (plain floats). ``.grad`` is overwritten, not accumulated.

    Raises:
        ValueError: for an unknown rule name, options given with a rule object, a rule
            that is neither a name nor callable, no parameter requiring grad, or
            malformed input.

    Example (two domains whose gradients conflict; PCGrad projects them):

    >>> import torch
    >>> from domaingrad.gradients.surgery import PCGrad
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> losses = [-w[0], w[0] - w[1]]  # gradients (-1, 0) and (1, -1)
    >>> stats = surgery_backward(losses, [w], rule=PCGrad(order=[0, 1], eps=0.0))
    >>> w.grad.tolist(), stats["conflict_pairs"]
    ([-0.5, -1.5], 2.0)
    """
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown surgery rule {rule!r}; valid rules: {', '.join(RULES)}")
        rule = RULES[rule]
    elif isinstance(rule, _Rule):
        if options:
            raise ValueError(
                f"{type(rule).__name__} takes its options in its constructor, e.g. "
                f"{type(rule).__name__}(...); got extra options {sorted(options)} for surgery_backward"
            )
    elif not callable(rule):
        raise ValueError(
            f"rule must be a rule name ({', '.join(RULES)}), a rule function or a rule object "
            f"such as PCGrad(); got {type(rule).__name__}"
        )
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("surgery_backward got no parameter that requires grad")
    result = rule(stack_domain_gradients(losses_or_grads, params), **options)
    if not isinstance(result, SurgeryResult):
        raise ValueError(f"the rule returned a {type(result).__name__}, expected a SurgeryResult")
    for param, grad in zip(params, result.grads):
        param.grad = grad
    return result.stats
