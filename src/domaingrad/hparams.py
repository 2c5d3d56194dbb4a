"""Hyperparameters: :class:`HParam` (a name, a default and a random-search draw), the
common hyperparameters of every algorithm, and the checks of single values.

Every hyperparameter is an :class:`HParam`: a name, a default, and a function that
draws a random value from a ``numpy.random.RandomState``, optionally the allowed values
(``choices``) or range (:class:`Bounds`), checked for every given value whatever the
model uses. Algorithms declare their own
(:meth:`domaingrad.algorithms.Algorithm.hparam_specs`); :func:`common_hparams` are
shared by all. Resolving names to specs (an algorithm and a dataset to their
hyperparameters, defaults, seeded draws and the hyperparameters of a run) sits above the
algorithms and datasets, in :mod:`domaingrad.registry`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DomainGradError


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric hyperparameter: ``low`` to ``high``, each bound closed
    unless marked open, None for no bound. A value in range is also finite.

    Example: ``Bounds(0.0, 1.0, high_open=True)`` is [0, 1); ``Bounds(0.0, low_open=True)``
    is (0, inf).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        """The range in words: ``in [0, 1)``, ``> 0``, ``>= 1``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"


#: (0, inf): learning rates, temperatures
POSITIVE = Bounds(0.0, low_open=True)
#: [0, inf): weight decays, penalty weights
NON_NEGATIVE = Bounds(0.0)
#: [0, 1): dropout probabilities
PROBABILITY_BELOW_ONE = Bounds(0.0, 1.0, high_open=True)
#: [1, inf): counts such as the batch size
AT_LEAST_ONE = Bounds(1)


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its DomainBed name, default value and random-search draw.

    Attributes:
        name: DomainBed's name (e.g. ``"lr"``).
        default: value used for ``hparams_seed`` 0; its type is the hyperparameter's type.
        draw: maps a ``np.random.RandomState`` to a random value (random search).
        help: one line: meaning and source of the default and distribution.
        choices: the allowed values, for hyperparameters that name an option.
        bounds: the allowed range of a numeric hyperparameter (None: any finite or
            infinite value of its type).
    """

    name: str
    default: Any
    draw: Callable[[np.random.RandomState], Any]
    help: str = ""
    choices: tuple[Any, ...] | None = None
    bounds: Bounds | None = None


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
            "resnet_dropout",
            0.0,
            lambda r: float(r.choice([0.0, 0.1, 0.5])),
            "dropout before the classifier (ResNets)",
            bounds=PROBABILITY_BELOW_ONE,
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
            HParam("lr", 1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5)), "Adam learning rate", bounds=POSITIVE),
            HParam("weight_decay", 0.0, lambda r: 0.0, "Adam weight decay", bounds=NON_NEGATIVE),
            HParam(
                "batch_size",
                64,
                lambda r: int(2 ** r.uniform(3, 9)),
                "examples per domain per step",
                bounds=AT_LEAST_ONE,
            ),
        ]
    else:
        specs += [
            HParam("lr", 5e-5, lambda r: float(10 ** r.uniform(-5, -3.5)), "Adam learning rate", bounds=POSITIVE),
            HParam(
                "weight_decay",
                0.0,
                lambda r: float(10 ** r.uniform(-6, -2)),
                "Adam weight decay",
                bounds=NON_NEGATIVE,
            ),
            HParam(
                "batch_size",
                32,
                (lambda r: int(2 ** r.uniform(3, 5)))
                if dataset == "DomainNet"
                else (lambda r: int(2 ** r.uniform(3, 5.5))),
                "examples per domain per step (random search: int(2**U(3, 5)) on DomainNet, "
                "int(2**U(3, 5.5)) on the other image datasets)",
                bounds=AT_LEAST_ONE,
            ),
        ]
    return specs


def coerce_hparam(spec: HParam, value: Any, owner: str | None = None) -> Any:
    """``value`` checked against the type of ``spec.default`` (an int is accepted for a
    float and returned as a float), against ``spec.choices`` and against
    ``spec.bounds``, whatever the model built later uses (a ``resnet_dropout`` of 5 is
    refused on Colored MNIST too, whose MNIST_CNN has no such dropout). ``owner`` (the
    algorithm's name) is named by the out-of-range message.

    Raises:
        DomainGradError: for a value of another type, outside the choices or out of range.
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
    if spec.bounds is not None and value not in spec.bounds:
        prefix = f"cannot build {owner} with these hyperparameters: " if owner else ""
        raise DomainGradError(
            f"{prefix}hyperparameter {name!r} must be {spec.bounds}, got {value!r} (default {default!r}); "
            "give it a value in range (--hparams)"
        )
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
