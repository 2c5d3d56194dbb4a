"""What names mean: an algorithm and a dataset to their hyperparameters, and an
algorithm name to a built model with its initial weights.

This module sits above :mod:`domaingrad.algorithms` and :mod:`domaingrad.data` (it
needs both: an algorithm's hyperparameters depend on the dataset's image size), so the
lower layers never import it.

Hyperparameters follow DomainBed's ``hparams_registry`` (Gulrajani and Lopez-Paz, "In
Search of Lost Domain Generalization", ICLR 2021): ``hparams_seed`` 0 means the
defaults; any other seed draws every hyperparameter from *its own* generator, seeded by
``seed_hash(seed_hash(hparams_seed, trial_seed), name)``, so adding a hyperparameter
never changes the others and the common draws match DomainBed's for the same seeds.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .algorithms import Algorithm, algorithm_class, list_algorithms
from .data import dataset_class, get_dataset, list_datasets
from .errors import DomainGradError
from .hparams import HParam, coerce_hparam, common_hparams
from .models import MNIST_CNN, AlexNetFeaturizer, ResNetFeaturizer
from .models.weights import load_backbone_state, read_state_dict
from .rng import seed_hash


def _specs(algorithm: str, small_images: bool, dataset: str | None) -> dict[str, HParam]:
    """The common hyperparameters (with the algorithm's own values of some of them, its
    ``common_overrides``: e.g. DomainBed's ADRMX ``lr``) then the algorithm's own; an
    algorithm whose ``hparam_specs`` or ``common_overrides`` takes ``dataset`` gets the
    dataset's name (DomainBed's per-dataset values, e.g. RDM on DomainNet)."""
    cls = algorithm_class(algorithm)
    declared = list(_call_with_dataset(cls.hparam_specs, small_images, dataset))
    overrides = {s.name: s for s in _call_with_dataset(getattr(cls, "common_overrides", None), small_images, dataset)}
    common = common_hparams(small_images, dataset)
    unknown = set(overrides) - {s.name for s in common}
    if unknown:
        raise ValueError(f"{algorithm}.common_overrides names no common hyperparameter: {sorted(unknown)}")
    specs: dict[str, HParam] = {}
    for spec in [overrides.get(s.name, s) for s in common] + declared:
        if spec.name in specs:
            raise ValueError(
                f"hyperparameter {spec.name!r} declared twice for {algorithm} "
                "(its hparam_specs repeats it or a common hyperparameter)"
            )
        specs[spec.name] = spec
    return specs


def _call_with_dataset(method: Any, small_images: bool, dataset: str | None) -> list[HParam]:
    if method is None:
        return []
    if "dataset" in inspect.signature(method).parameters:
        return list(method(small_images, dataset=dataset))
    return list(method(small_images))


def hparam_specs(algorithm: str, dataset: str) -> dict[str, HParam]:
    """All hyperparameters of ``algorithm`` on ``dataset``, by name: the common ones
    (:func:`domaingrad.hparams.common_hparams`) then the algorithm's own.

    Raises:
        DomainGradError: for an unknown algorithm or dataset.
        ValueError: an algorithm declaring a hyperparameter twice (a programming error).
    """
    return _specs(algorithm, dataset_class(dataset).SMALL_IMAGES, dataset)


def default_hparams(algorithm: str, dataset: str) -> dict[str, Any]:
    """DomainBed's ``default_hparams``: every hyperparameter of ``algorithm`` on
    ``dataset`` at its default (what ``hparams_seed`` 0 trains with).

    Raises:
        DomainGradError: for an unknown algorithm or dataset.
    """
    return {name: spec.default for name, spec in hparam_specs(algorithm, dataset).items()}


def draw_hparams(algorithm: str, dataset: str, seed: int) -> dict[str, Any]:
    """DomainBed's ``random_hparams(algorithm, dataset, seed)``: each value drawn from
    ``RandomState(seed_hash(seed, name))``.

    Raises:
        DomainGradError: for an unknown algorithm or dataset.
    """
    return {
        name: spec.draw(np.random.RandomState(seed_hash(seed, name)))
        for name, spec in hparam_specs(algorithm, dataset).items()
    }


def random_hparams(algorithm: str, dataset: str, hparams_seed: int, trial_seed: int) -> dict[str, Any]:
    """The random-search draw ``(hparams_seed, trial_seed)`` of ``algorithm`` on ``dataset``:
    ``draw_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))``, as
    DomainBed's ``train.py`` draws for ``hparams_seed`` > 0. (A run with ``hparams_seed`` 0
    uses the defaults instead, see :func:`resolve_hparams`; this function draws for
    every seed.)

    Raises:
        DomainGradError: for an unknown algorithm or dataset.
    """
    return draw_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))


def _override(
    hparams: dict[str, Any], specs: dict[str, HParam], overrides: Mapping[str, Any] | None, where: str, owner: str
) -> dict[str, Any]:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(f"hyperparameters are a dict of name -> value, got {type(overrides).__name__}")
    for name, value in (overrides or {}).items():
        if name not in specs:
            raise DomainGradError(
                f"unknown hyperparameter {name!r} for {where}; valid names: {', '.join(sorted(specs))}"
            )
        hparams[name] = coerce_hparam(specs[name], value, owner)
    return hparams


def resolve_hparams(
    algorithm: str, dataset: str, hparams_seed: int, trial_seed: int, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The hyperparameters of one training run, as DomainBed's ``train.py`` computes them.

    ``hparams_seed`` 0 gives the defaults; otherwise :func:`random_hparams`. Then
    ``overrides`` (a dict; ``--hparams`` at the command line) replace single values
    after a check of their type, choices and range
    (:func:`domaingrad.hparams.coerce_hparam`), made here for every given value whether
    or not the run's model uses it (``resnet_dropout`` on an MNIST_CNN, say).

    Raises:
        DomainGradError: for an unknown algorithm or dataset, or an unknown, ill-typed
            or out-of-range override (naming the valid names or the range).
        TypeError: ``overrides`` is not a mapping.
    """
    if hparams_seed == 0:
        hparams = default_hparams(algorithm, dataset)
    else:
        hparams = random_hparams(algorithm, dataset, hparams_seed, trial_seed)
    return _override(hparams, hparam_specs(algorithm, dataset), overrides, f"{algorithm} on {dataset}", algorithm)


def create_algorithm(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    num_domains: int,
    hparams: Mapping[str, Any] | None = None,
    *,
    dataset: str | None = None,
    weights: str = "none",
) -> Algorithm:
    """Build the algorithm named ``name`` (a registered name, ``package.module:Class`` or an
    entry point) for inputs of shape ``input_shape``, with its featurizers' initial
    ``weights``.

    Args:
        name: the algorithm.
        input_shape: shape of one input, e.g. (2, 28, 28).
        num_classes: number of classes (the logits of ``predict`` have this width).
        num_domains: number of training domains (minibatches per ``update``).
        hparams: hyperparameters; missing ones take their defaults: those of
            ``dataset`` when given, else DomainBed's small-image defaults for 28x28
            inputs and its large-image defaults otherwise. Values are type-checked.
        dataset: the dataset whose defaults fill ``hparams``.
        weights: ``none`` (random initialisation), ``imagenet`` (torchvision's file in
            ``torch.hub.get_dir()/checkpoints``, never downloaded) or the path of a
            state-dict file, loaded into every featurizer of the algorithm (see
            :func:`load_initial_weights`).

    Raises:
        DomainGradError: unknown name, hyperparameter or dataset, an ill-typed
            hyperparameter, hyperparameters the algorithm refuses, or weights that are
            missing or do not fit.
        TypeError: ``hparams`` is not a mapping.
    """
    if dataset is not None:
        specs = hparam_specs(name, dataset)
        where = f"{name} on {dataset}"
    else:
        specs = _specs(name, tuple(input_shape[1:]) == (28, 28), None)
        where = name
    full = _override({k: s.default for k, s in specs.items()}, specs, hparams, where, name)
    try:
        algorithm = algorithm_class(name)(tuple(input_shape), num_classes, num_domains, full)
    except ValueError as exc:  # e.g. torch rejecting a negative learning rate
        raise DomainGradError(f"cannot build {name} with these hyperparameters: {exc}") from exc
    load_initial_weights(algorithm, weights)
    return algorithm


def _backbone_of(module: nn.Module) -> str | None:
    """The ``backbone`` name of a featurizer module built by
    :func:`domaingrad.models.featurizer_for`, None for any other module."""
    if isinstance(module, MNIST_CNN):
        return "mnist_cnn"
    if isinstance(module, ResNetFeaturizer):
        return "resnet18" if module.n_outputs == 512 else "resnet50"
    if isinstance(module, AlexNetFeaturizer):
        return "alexnet"
    return None


#: backbone -> (the sub-module holding torchvision's names, its first convolution, ignored
#: prefixes: the ImageNet classification head, display name)
_TARGETS = {
    "resnet18": ("network", "conv1.weight", ("fc.",), "ResNet-18"),
    "resnet50": ("network", "conv1.weight", ("fc.",), "ResNet-50"),
    "alexnet": ("network", "features.0.weight", ("classifier.6.",), "AlexNet"),
}


def load_initial_weights(module: nn.Module, weights: str) -> int:
    """Load ``weights`` (``none``, ``imagenet`` or a state-dict path, see
    :mod:`domaingrad.models.weights`) into every featurizer inside ``module`` (an
    algorithm builds one or several); returns how many were loaded.

    The result is the featurizer DomainBed builds from pretrained weights: for the
    torchvision backbones the file's first-convolution filters (RGB) are cycled over the
    input channels (DomainBed's channel adaptation), as if loaded before the
    adaptation; the ImageNet head is ignored. Random initialisation is left as is for
    ``none``.

    Raises:
        DomainGradError: weights missing, unreadable, or not fitting a featurizer (naming
            the missing, unexpected and mis-shaped entries).
    """
    if weights == "none":
        return 0
    states: dict[str, dict[str, torch.Tensor] | None] = {}
    loaded = 0
    for sub in module.modules():
        backbone = _backbone_of(sub)
        if backbone is None:
            continue
        if backbone not in states:
            states[backbone] = read_state_dict(weights, backbone)
        state = states[backbone]
        if state is None:
            continue
        if backbone == "mnist_cnn":
            load_backbone_state(sub, state, "MNIST_CNN")
        else:
            attribute, first_conv, ignore, what = _TARGETS[backbone]
            target = getattr(sub, attribute)
            state = dict(state)
            own = target.state_dict()[first_conv]
            given = state.get(first_conv)
            if given is not None and given.ndim == 4 and given.shape[1] == 3 and own.shape[1] != 3:
                state[first_conv] = given[:, torch.arange(own.shape[1]) % 3]
            load_backbone_state(target, state, what, ignore_prefixes=ignore)
        loaded += 1
    return loaded


__all__ = [
    "create_algorithm",
    "default_hparams",
    "draw_hparams",
    "get_dataset",
    "hparam_specs",
    "list_algorithms",
    "list_datasets",
    "load_initial_weights",
    "random_hparams",
    "resolve_hparams",
]
