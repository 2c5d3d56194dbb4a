"""Mixed precision and memory format of a training run (``--amp``, ``--channels-last``).

``--amp bf16`` runs every ``update`` and every evaluation pass under
:func:`torch.autocast` with bfloat16 (CPU and CUDA; no loss scaling is needed, bfloat16
has float32's exponent range). ``--amp fp16`` uses float16 with dynamic loss scaling
(:class:`torch.amp.GradScaler`): the algorithm must route its backward pass and
optimizer step through :meth:`domaingrad.algorithms.Algorithm.backward_step`, which
only the algorithms that declare ``supports_fp16 = True`` themselves do; the others are
refused with a message suggesting bf16. ``off`` (the default) is float32 throughout,
bit-for-bit the run without this module.

Parameters, optimizer states and gradients stay float32 under both modes (autocast
casts inside operations only), so checkpoints are the same format either way. Mixed
precision changes the numbers: a run with ``--amp`` is not expected to reproduce the
float32 run's records, only to be close to them.

``channels_last`` (:func:`memory_format`): convolutional backbones on CUDA run faster in
NHWC layout; ``auto`` chooses it on CUDA for image inputs and keeps the contiguous
layout on CPU, so that CPU runs keep the kernels (and the rounding) of a plain float32
run; ``on`` asks for it anywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

#: values of ``--amp``
AMP_MODES = ("off", "bf16", "fp16")
#: values of ``--channels-last``
MEMORY_FORMATS = ("auto", "on", "off")

Amp = Literal["off", "bf16", "fp16"]


def check_amp(amp: str) -> None:
    """Raise ``ValueError`` unless ``amp`` is one of :data:`AMP_MODES`."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp``: bfloat16, float16, or None for ``off``.

    Raises:
        ValueError: an unknown mode.
    """
    check_amp(amp)
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@contextlib.contextmanager
def autocast(device: torch.device | str, amp: str) -> Iterator[None]:
    """``torch.autocast(device.type, dtype)`` for ``amp`` bf16/fp16; nothing for ``off``.

    Raises:
        ValueError: an unknown mode.
    """
    dtype = amp_dtype(amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def grad_scaler(device: torch.device | str, amp: str) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for ``amp == "fp16"`` (torch's defaults: initial scale 2**16,
    halved on an inf/nan gradient, doubled after 2,000 clean steps), None otherwise."""
    if amp_dtype(amp) is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def use_channels_last(setting: str, device: torch.device | str, input_shape: tuple[int, ...]) -> bool:
    """Whether a run uses the channels_last memory format: ``on``, ``off``, or ``auto``
    (on for CUDA with image inputs ``(C, H, W)``, off elsewhere).

    Raises:
        ValueError: an unknown setting, or ``on`` with inputs that are not ``(C, H, W)``.
    """
    if setting not in MEMORY_FORMATS:
        raise ValueError(f"--channels-last must be one of {', '.join(MEMORY_FORMATS)}, got {setting!r}")
    images = len(input_shape) == 3
    if setting == "on" and not images:
        raise ValueError(f"--channels-last on needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    if setting == "auto":
        return images and torch.device(device).type == "cuda"
    return setting == "on"


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last layout when asked and 4-D (a batch of images), else as is."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def backend_settings(device: torch.device | str, deterministic: bool) -> Iterator[None]:
    """The run's kernel choices, restored on exit: on CUDA ``cudnn.benchmark`` (the
    fastest convolution algorithm for the run's fixed shapes, chosen by timing) unless
    ``deterministic``; with ``deterministic``, ``torch.use_deterministic_algorithms``
    (an operation without a deterministic kernel raises) and ``cudnn.deterministic``,
    and ``CUBLAS_WORKSPACE_CONFIG`` set to ``:4096:8`` when unset (cuBLAS needs it).
    """
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, enabled = saved
        torch.use_deterministic_algorithms(enabled)


__all__ = [
    "backend_settings",
    "AMP_MODES",
    "MEMORY_FORMATS",
    "Amp",
    "amp_dtype",
    "autocast",
    "check_amp",
    "grad_scaler",
    "to_memory_format",
    "use_channels_last",
]
