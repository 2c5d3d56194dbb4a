"""Gradient surgery inside your own training loop.

``surgery_backward`` takes the per-domain losses (or per-domain gradients you computed
yourself), combines the domain gradients with a named rule and writes the result into
each parameter's ``.grad``; you then call your own optimizer::

    losses = [F.cross_entropy(model(x), y) for x, y in minibatches]  # one per domain
    optimizer.zero_grad()
    stats = surgery_backward(losses, model.parameters(), rule="pcgrad", generator=gen)
    optimizer.step()
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .surgery import SurgeryResult, agr_rand, agr_sum, and_mask, corgrad, pcgrad, sand_mask

#: rule name -> function of :mod:`domaingrad.gradients.surgery`
RULES: dict[str, Callable[..., SurgeryResult]] = {
    "agr_sum": agr_sum, "agr_rand": agr_rand, "pcgrad": pcgrad, "corgrad": corgrad,
    "and_mask": and_mask, "sand_mask": sand_mask,
}


def stack_domain_gradients(losses_or_grads: Sequence[Any], params: Sequence[torch.nn.Parameter]
                           ) -> list[Tensor]:
    """Per-parameter tensors of shape (D, *param.shape) from one of three inputs.

    Args:
        losses_or_grads: either D scalar losses (one per domain, differentiable with
            respect to ``params``), or D sequences of gradients (one tensor per
            parameter, in ``params`` order), or already stacked tensors, one per
            parameter, of shape (D, *param.shape).
        params: the parameters, in order.

    Raises:
        ValueError: if the input matches none of the three forms.
    """
    items = list(losses_or_grads)
    if not items:
        raise ValueError("surgery_backward needs at least one domain: got no losses or gradients")
    first = items[0]
    if isinstance(first, Tensor) and first.dim() == 0:
        per_domain = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in items]
        return [torch.stack([g if g is not None else torch.zeros_like(p) for g in grads])
                for p, grads in zip(params, zip(*per_domain))]
    if isinstance(first, Tensor):
        if len(items) != len(params) or any(g.shape[1:] != p.shape for g, p in zip(items, params)):
            raise ValueError("stacked gradients must be one tensor per parameter, each of shape "
                             "(D, *param.shape)")
        return items
    if all(len(g) == len(params) for g in items):
        return [torch.stack(list(per_param)) for per_param in zip(*items)]
    raise ValueError("expected D scalar losses, D lists of per-parameter gradients, or one "
                     "(D, *param.shape) tensor per parameter")


def surgery_backward(losses_or_grads: Sequence[Any], params: Iterable[torch.nn.Parameter],
                     rule: str | Callable[..., SurgeryResult] = "pcgrad", **options: Any
                     ) -> dict[str, float]:
    """Set ``param.grad`` to the combination of the per-domain gradients by ``rule``.

    Args:
        losses_or_grads: D per-domain losses or gradients (see :func:`stack_domain_gradients`).
        params: the parameters to update (e.g. ``model.parameters()``).
        rule: a name in :data:`RULES` or a function with the same contract.
        **options: keyword options of the rule (e.g. ``generator=``, ``reduction=``).

    Returns:
        The rule's statistics (plain floats). ``.grad`` is overwritten, not accumulated.

    Raises:
        ValueError: for an unknown rule name or malformed input.
    """
    params = [p for p in params if p.requires_grad]
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"unknown surgery rule {rule!r}; valid rules: {', '.join(RULES)}")
        rule = RULES[rule]
    result = rule(stack_domain_gradients(losses_or_grads, params), **options)
    for param, grad in zip(params, result.grads):
        param.grad = grad
    return result.stats
