"""Hyperparameters: :class:`HParam` (a name, a default and a random-search draw), the
common hyperparameters of every algorithm, and the checks of single values.

Every hyperparameter is an :class:`HParam`: a name, a default, and a function that
draws a random value from a ``numpy.random.RandomState``. Algorithms declare their own
(:meth:`domaingrad.algorithms.Algorithm.hparam_specs`); :func:`common_hparams` are
shared by all. Resolving names to specs (an algorithm and a dataset to their
hyperparameters, defaults, seeded draws and the hyperparameters of a run) sits above the
algorithms and datasets, in :mod:`domaingrad.registry`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DomainGradError


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its DomainBed name, default value and random-search draw.

    Attributes:
        name: DomainBed's name (e.g. ``"lr"``).
        default: value used for ``hparams_seed`` 0; its type is the hyperparameter's type.
        draw: maps a ``np.random.RandomState`` to a random value (random search).
        help: one line: meaning and source of the default and distribution.
        choices: the allowed values, for hyperparameters that name an option.
    """

    name: str
    default: Any
    draw: Callable[[np.random.RandomState], Any]
    help: str = ""
    choices: tuple[Any, ...] | None = None


def common_hparams(small_images: bool, dataset: str | None = None) -> list[HParam]:
    """The hyperparameters every algorithm has (DomainBed ``hparams_registry._hparams``).

    ``small_images`` selects DomainBed's values for the MNIST-sized datasets.
    ``dataset`` (the registry name) selects DomainBed's per-dataset draws: for
    ``DomainNet`` the batch size is drawn as int(2**U(3, 5)), for the other large-image
    datasets as int(2**U(3, 5.5)) (DomainBed ``hparams_registry.py``; Gulrajani and
    Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).
    """
    specs = [
        HParam("data_augmentation", True, lambda r: True, "training augmentation (image datasets)"),
        HParam(
            "backbone",
            "auto",
            lambda r: "auto",
            "featurizer: auto = DomainBed's choice (MNIST_CNN for 28x28, else ResNet-50, or ResNet-18 "
            "with resnet18), or one of resnet18, resnet50, alexnet, mnist_cnn",
            choices=("auto", "resnet18", "resnet50", "alexnet", "mnist_cnn"),
        ),
        HParam("resnet18", False, lambda r: False, "ResNet-18 instead of ResNet-50 (image datasets)"),
        HParam(
            "freeze_bn",
            True,
            lambda r: True,
            "keep the ResNets' BatchNorm layers in eval mode while training (DomainBed's freeze_bn)",
        ),
        HParam(
            "resnet_dropout", 0.0, lambda r: float(r.choice([0.0, 0.1, 0.5])), "dropout before the classifier (ResNets)"
        ),
        HParam("class_balanced", False, lambda r: False, "sample minibatches class-balanced"),
        HParam(
            "nonlinear_classifier",
            False,
            lambda r: bool(r.choice([False, False])),
            "MLP classifier head instead of linear",
        ),
    ]
    if small_images:
        specs += [
            HParam("lr", 1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)), "Adam learning rate"),
            HParam("weight_decay", 0.0, lambda r: 0.0, "Adam weight decay"),
            HParam("batch_size", 64, lambda r: int(2 ** r.uniform(3, 9)), "examples per domain per step"),
        ]
    else:
        specs += [
            HParam("lr", 5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)), "Adam learning rate"),
            HParam("weight_decay", 0.0, lambda r: float(10 ** r.uniform(-6, -2)), "Adam weight decay"),
            HParam(
                "batch_size",
                32,
                (lambda r: int(2 ** r.uniform(3, 5)))
                if dataset == "DomainNet"
                else (lambda r: int(2 ** r.uniform(3, 5.5))),
                "examples per domain per step (random search: int(2**U(3, 5)) on DomainNet, "
                "int(2**U(3, 5.5)) on the other image datasets)",
            ),
        ]
    return specs


def coerce_hparam(spec: HParam, value: Any) -> Any:
    """``value`` checked against the type of ``spec.default`` (an int is accepted for a
    float and returned as a float) and against ``spec.choices``.

    Raises:
        DomainGradError: for a value of another type or outside the choices.
    """
    name, default = spec.name, spec.default
    kind = type(default)
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, kind)
    )
    if not ok:
        raise DomainGradError(
            f"hyperparameter {name!r} must be of type {kind.__name__} (default {default!r}), "
            f"got {value!r} of type {type(value).__name__}"
        )
    if spec.choices is not None and value not in spec.choices:
        raise DomainGradError(f"hyperparameter {name!r} must be one of {list(spec.choices)}, got {value!r}")
    return float(value) if kind is float else value


def parse_hparams_json(text: str | None) -> dict[str, Any]:
    """Parse the ``--hparams`` JSON object.

    Raises:
        DomainGradError: for malformed JSON or a JSON value that is not an object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DomainGradError(
            f"--hparams is not valid JSON ({exc.msg} at position {exc.pos}): "
            f"{text!r}; expected an object such as '{{\"lr\": 1e-3}}'"
        ) from exc
    if not isinstance(value, dict):
        raise DomainGradError(f"--hparams must be a JSON object such as '{{\"lr\": 1e-3}}', got {text!r}")
    return value
