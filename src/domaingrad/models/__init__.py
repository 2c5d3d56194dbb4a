"""Featurizers and classifiers behind one small interface.

A *featurizer* is an ``nn.Module`` mapping (B, *input_shape) to (B, n_outputs) with an
``n_outputs`` attribute; a *classifier* maps features to (B, num_classes) logits.
Featurizers are registered by name; :func:`featurizer_for` picks DomainBed's default
for an input shape (MNIST_CNN for 28x28 inputs).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import DomainGradError
from .mnist_cnn import MNIST_CNN

#: name -> constructor taking (input_shape, hparams)
FEATURIZERS: dict[str, Callable[[tuple[int, ...], dict[str, Any]], nn.Module]] = {
    "MNIST_CNN": lambda input_shape, hparams: MNIST_CNN(input_shape),
}


def featurizer_for(input_shape: tuple[int, ...], hparams: dict[str, Any]) -> nn.Module:
    """DomainBed's ``networks.Featurizer``: the network for this input shape.

    Raises:
        DomainGradError: if no registered featurizer fits the input shape.
    """
    if tuple(input_shape[1:]) == (28, 28):
        return FEATURIZERS["MNIST_CNN"](input_shape, hparams)
    raise DomainGradError(f"no featurizer for input shape {tuple(input_shape)}; "
                          f"registered featurizers: {', '.join(FEATURIZERS)} (28x28 inputs)")


def classifier(in_features: int, out_features: int, nonlinear: bool = False) -> nn.Module:
    """DomainBed's ``networks.Classifier``: a linear layer, or with ``nonlinear`` an MLP
    in -> in/2 -> in/4 -> out with ReLUs. Input (B, in_features); output (B, out_features)."""
    if nonlinear:
        return nn.Sequential(
            nn.Linear(in_features, in_features // 2), nn.ReLU(),
            nn.Linear(in_features // 2, in_features // 4), nn.ReLU(),
            nn.Linear(in_features // 4, out_features))
    return nn.Linear(in_features, out_features)


__all__ = ["FEATURIZERS", "MNIST_CNN", "classifier", "featurizer_for"]
