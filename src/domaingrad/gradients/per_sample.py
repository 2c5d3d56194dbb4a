"""Per-sample gradients: the gradient of each sample's own loss, stacked on a leading
sample axis.

Fishr (Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for
Out-of-Distribution Generalization", ICML 2022) penalises the
variance over samples of these gradients, so they must stay differentiable: the
penalty is backpropagated through them into the featurizer. The authors obtained them
with BackPACK's ``BatchGrad`` extension, which is broken with current torch; here they
come from :mod:`torch.func` (``vmap`` over ``grad`` of a ``functional_call``), the
maintained way, which composes with ordinary autograd (the result keeps a graph back to
the inputs and the parameters when ``create_graph`` is true).

Two entry points:

* :func:`per_sample_gradients`: any module and any per-sample loss.
* :func:`linear_cross_entropy_per_sample_gradients`: the exact closed form for a linear
  layer followed by cross-entropy, ``dl_i/dW = (softmax(z_i) - onehot(y_i)) f_i^T`` and
  ``dl_i/db = softmax(z_i) - onehot(y_i)``, with ``z_i = W f_i + b``. It needs only the
  features and logits of the ordinary forward pass, so it costs one outer product; it
  is what BackPACK computes for ``nn.Linear`` and what Fishr uses for DomainBed's
  default linear classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["linear_cross_entropy_per_sample_gradients", "per_sample_gradients"]


def per_sample_gradients(
    module: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
    create_graph: bool = True,
) -> dict[str, Tensor]:
    """Gradient of every sample's loss with respect to parameters of ``module``.

    Sample ``i`` is forwarded alone, as a batch of one: ``out_i = module(inputs[i:i+1])``
    with the batch dimension then removed, and its loss is
    ``loss_fn(out_i, targets[i])``. Everything is vectorised with
    ``torch.func.vmap(torch.func.grad(...))`` (dropout, if any, draws an independent
    mask per sample).

    Args:
        module: the network. Its train/eval mode is used as is; it must not contain a
            module that updates running statistics in training mode (BatchNorm /
            InstanceNorm with ``track_running_stats=True``): with those, samples are
            not independent, so per-sample gradients are not defined.
        inputs: shape ``(N, *sample_shape)``, ``N >= 1``.
        targets: shape ``(N, *target_shape)`` (class indices ``(N,)`` for
            cross-entropy).
        loss_fn: ``(output of ONE sample, its target) -> scalar loss``, e.g.
            ``lambda out, y: F.cross_entropy(out, y)`` with ``out`` of shape ``(C,)``
            and ``y`` of shape ``()``. It must work under ``vmap`` (no ``.item()``, no
            data-dependent Python control flow). It is the loss of the sample alone,
            not divided by ``N``.
        params: names (as in ``module.named_parameters()``) of the parameters to
            differentiate, without duplicates. Default: every parameter with
            ``requires_grad``, in ``named_parameters()`` order. The other parameters
            and the buffers are used as they are, not differentiated.
        chunk_size: if given (``>= 1``), vmap processes this many samples at a time,
            bounding peak memory; the result is the same.
        create_graph: if true, the result is part of the autograd graph: it is
            differentiable with respect to ``inputs`` (when it requires grad) and to the
            module's parameters (second-order terms included). If false, the result
            is detached and no graph is built.

    Returns:
        ``{name: tensor of shape (N, *param.shape)}``, in the order of ``params``;
        entry ``[i]`` is the gradient of sample ``i``'s loss. A parameter the loss does
        not depend on gets zeros.

    Raises:
        ValueError: ``inputs`` or ``targets`` without a batch dimension, different
            lengths, or empty; an unknown, duplicated or ``requires_grad=False``
            parameter name, or an empty ``params``; no trainable parameter;
            ``chunk_size < 1``; a BatchNorm-like module in training mode; a non-floating
            parameter; ``loss_fn`` not returning a scalar.

    Source: per-sample gradients with ``torch.func`` follow the PyTorch tutorial
    "Per-sample-gradients" (``vmap(grad(compute_loss), in_dims=(None, 0, 0))``).
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0:
        raise ValueError(
            f"inputs and targets need a leading sample dimension, got inputs.shape="
            f"{tuple(inputs.shape)}, targets.shape={tuple(targets.shape)}"
        )
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs has {inputs.shape[0]} samples but targets has {targets.shape[0]}; they must match")
    if inputs.shape[0] == 0:
        raise ValueError("inputs is empty: per-sample gradients need at least one sample")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    names = _resolve_names(module, params)
    stats = [
        name or type(module).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    if stats:
        raise ValueError(
            f"module(s) {', '.join(stats)} update running statistics in training mode (BatchNorm/"
            "InstanceNorm with track_running_stats=True): samples then interact, so per-sample "
            "gradients are not defined; put them in eval mode or use GroupNorm/LayerNorm"
        )

    named = dict(module.named_parameters())
    pdict = {n: (named[n] if create_graph else named[n].detach()) for n in names}

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(module, p, (x.unsqueeze(0),)).squeeze(0)
        loss = loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar (the loss of one sample), got {shape}")
        return loss

    fn = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness="different")
    if create_graph:
        with torch.enable_grad():
            grads = fn(pdict, inputs, targets)
    else:
        with torch.no_grad():
            grads = fn(pdict, inputs.detach(), targets)
    return {n: grads[n] for n in names}


def linear_cross_entropy_per_sample_gradients(
    features: Tensor, logits: Tensor, targets: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor | None]:
    """Exact per-sample gradients of cross-entropy through a linear layer.

    For ``logits = features @ W.T + b`` (``nn.Linear``) and the loss of sample ``i``
    alone, ``l_i = cross_entropy(logits[i], targets[i])`` (not divided by ``N``):
    ``dl_i/dz_i = softmax(z_i) - onehot(y_i)`` =: ``r_i``, so ``dl_i/dW = r_i f_i^T`` and
    ``dl_i/db = r_i``. The result is differentiable with respect to ``features`` and
    ``logits`` (hence to ``W``, ``b`` and whatever produced the features), with the same
    graph as a ``create_graph`` backward.

    Args:
        features: ``(N, F)`` floating, the layer's input.
        logits: ``(N, C)`` floating, the layer's output for ``features``.
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        has_bias: whether the layer has a bias (else the second result is None).

    Returns:
        ``(grad_weight, grad_bias)``: ``grad_weight`` of shape ``(N, C, F)`` (the layout of
        ``nn.Linear.weight``, ``(C, F)``, per sample) and ``grad_bias`` of shape
        ``(N, C)``, or None when ``has_bias`` is false.

    Raises:
        ValueError: wrong ranks, mismatched sample counts, non-floating features or
            logits, non-integer targets, or targets outside ``[0, C)``.

    Source: the softmax cross-entropy gradient (e.g. Goodfellow et al., Deep Learning,
    6.2.2.3); the outer-product form is BackPACK's ``BatchGrad`` for ``nn.Linear``
    (Dangel et al. ICLR 2020), which Fishr's code uses.
    """
    if features.dim() != 2 or logits.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected features (N, F), logits (N, C) and targets (N,), got shapes "
            f"{tuple(features.shape)}, {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    n = features.shape[0]
    if logits.shape[0] != n or targets.shape[0] != n:
        raise ValueError(
            f"features, logits and targets must have the same number of samples, got "
            f"{n}, {logits.shape[0]} and {targets.shape[0]}"
        )
    if not features.is_floating_point() or not logits.is_floating_point():
        raise ValueError(f"features and logits must be floating point, got {features.dtype} and {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    num_classes = logits.shape[1]
    if n > 0 and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}) (the number of logits), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    residual = torch.softmax(logits, dim=1) - F.one_hot(targets.long(), num_classes).to(logits.dtype)
    grad_weight = residual.unsqueeze(2) * features.unsqueeze(1)  # (N, C, 1) * (N, 1, F)
    return grad_weight, (residual if has_bias else None)


def _resolve_names(module: nn.Module, params: Sequence[str] | None) -> list[str]:
    named = dict(module.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("module has no parameter with requires_grad=True")
    else:
        if isinstance(params, str):
            raise ValueError(f"params must be a sequence of parameter names, got the string {params!r}")
        names = list(params)
        if not names:
            raise ValueError("params is empty: pass at least one parameter name, or None for all")
        seen: set[str] = set()
        for name in names:
            if name not in named:
                raise ValueError(
                    f"{name!r} is not a parameter of the module; valid names: {', '.join(named) or '(none)'}"
                )
            if name in seen:
                raise ValueError(f"parameter {name!r} is given twice")
            if not named[name].requires_grad:
                raise ValueError(f"parameter {name!r} has requires_grad=False: its gradient cannot be computed")
            seen.add(name)
    bad = [n for n in names if not named[n].is_floating_point()]
    if bad:
        raise ValueError(f"parameters {bad} are not floating point")
    return names
