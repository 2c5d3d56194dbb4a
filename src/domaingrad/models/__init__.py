"""Featurizers and classifiers behind one small interface.

A *featurizer* is a :class:`Featurizer` (an ``nn.Module``) mapping (B, *input_shape) to (B, n_outputs) with an
``n_outputs`` attribute, ``stage_names`` (its named intermediate outputs, in order),
``stage_channels`` (name -> channels or features) and ``forward(x, stage_fn=None)``
calling ``stage_fn(name, output)`` on each stage; a *classifier* maps features to
(B, num_classes) logits. Featurizers are registered by name (:data:`FEATURIZERS`);
:func:`featurizer_for` picks one from the ``backbone`` hyperparameter, or with
``backbone`` ``auto`` DomainBed's default for the input shape (MNIST_CNN for 28x28,
ResNet-50 for other images, ResNet-18 when ``resnet18`` is true). Initial weights are
an argument of :func:`featurizer_for` (see :mod:`domaingrad.models.weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import DomainGradError
from .backbones import AlexNetFeaturizer, ResNetFeaturizer
from .base import Featurizer, StageFn
from .mnist_cnn import MNIST_CNN
from .weights import imagenet_file, load_backbone_state, read_state_dict

Builder = Callable[[tuple[int, ...], dict[str, Any], "dict | None"], Featurizer]


def _mnist_cnn(input_shape: tuple[int, ...], hparams: dict[str, Any], state: dict | None) -> Featurizer:
    net = MNIST_CNN(input_shape)
    if state is not None:
        load_backbone_state(net, state, "MNIST_CNN")
    return net


def _resnet(depth: int) -> Builder:
    return lambda input_shape, hparams, state: ResNetFeaturizer(
        depth, input_shape, float(hparams.get("resnet_dropout", 0.0)), bool(hparams.get("freeze_bn", True)), state
    )


#: ``backbone`` hyperparameter value -> constructor taking (input_shape, hparams, state dict or None)
FEATURIZERS: dict[str, Builder] = {
    "mnist_cnn": _mnist_cnn,
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "alexnet": lambda input_shape, hparams, state: AlexNetFeaturizer(input_shape, state),
}


def backbone_name(input_shape: tuple[int, ...], hparams: dict[str, Any]) -> str:
    """The featurizer ``featurizer_for`` builds: hparam ``backbone`` unless ``auto``;
    ``auto`` is DomainBed's ``networks.Featurizer`` choice: ``mnist_cnn`` for 28x28
    inputs, otherwise ``resnet18`` if hparam ``resnet18`` else ``resnet50``.

    Raises:
        DomainGradError: for an unknown backbone or a non-image input shape.
    """
    name = hparams.get("backbone", "auto")
    if name == "auto":
        if len(input_shape) != 3:
            raise DomainGradError(f"no featurizer for input shape {tuple(input_shape)}; expected images (C, H, W)")
        if tuple(input_shape[1:]) == (28, 28):
            return "mnist_cnn"
        return "resnet18" if hparams.get("resnet18", False) else "resnet50"
    if name not in FEATURIZERS:
        raise DomainGradError(f"unknown backbone {name!r}; valid: auto, {', '.join(FEATURIZERS)}")
    return name


def featurizer_for(input_shape: tuple[int, ...], hparams: dict[str, Any], weights: str = "none") -> Featurizer:
    """DomainBed's ``networks.Featurizer``: the network for this input shape and hparams
    (see :func:`backbone_name`), initialised from ``weights``: ``none`` (random, the
    default), ``imagenet`` or the path of a state-dict file (see
    :mod:`domaingrad.models.weights`).

    Input (B, *input_shape); output (B, featurizer.n_outputs).

    Raises:
        DomainGradError: unknown backbone, images too small for it, or weights that are
            missing or do not fit (see :mod:`domaingrad.models.weights`).
    """
    name = backbone_name(input_shape, hparams)
    return FEATURIZERS[name](tuple(input_shape), hparams, read_state_dict(weights, name))


def classifier(in_features: int, out_features: int, nonlinear: bool = False) -> nn.Module:
    """DomainBed's ``networks.Classifier``: a linear layer, or with ``nonlinear`` an MLP
    in -> in/2 -> in/4 -> out with ReLUs. Input (B, in_features); output (B, out_features)."""
    if nonlinear:
        return nn.Sequential(
            nn.Linear(in_features, in_features // 2),
            nn.ReLU(),
            nn.Linear(in_features // 2, in_features // 4),
            nn.ReLU(),
            nn.Linear(in_features // 4, out_features),
        )
    return nn.Linear(in_features, out_features)


__all__ = [
    "FEATURIZERS",
    "AlexNetFeaturizer",
    "Featurizer",
    "MNIST_CNN",
    "ResNetFeaturizer",
    "StageFn",
    "backbone_name",
    "classifier",
    "featurizer_for",
    "imagenet_file",
    "read_state_dict",
]
