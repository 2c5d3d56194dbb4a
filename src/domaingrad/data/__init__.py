"""Data layer: the dataset registry, splits and minibatch sampling."""
from __future__ import annotations

from typing import Callable

from ..errors import DomainGradError
from .base import InfiniteMinibatches, MultipleDomainDataset, Split, TensorEnvironment, split_environment
from .debug import Debug28
from .mnist import ColoredFashionMNIST, ColoredMNIST, RotatedFashionMNIST, RotatedMNIST

#: name -> (dataset class, one-line description)
DATASETS: dict[str, tuple[Callable[..., MultipleDomainDataset], str]] = {
    "ColoredMNIST": (ColoredMNIST, "3 envs +90%/+80%/-90% colour-label agreement, 2x28x28, 2 classes"),
    "RotatedMNIST": (RotatedMNIST, "6 envs rotated 0-75 degrees, 1x28x28, 10 classes"),
    "ColoredFashionMNIST": (ColoredFashionMNIST,
                            "ColoredMNIST over Fashion-MNIST (70,000 images, label = class < 5)"),
    "RotatedFashionMNIST": (RotatedFashionMNIST,
                            "RotatedMNIST over Fashion-MNIST (70,000 images, 10 classes)"),
    "Debug28": (Debug28, "3 envs x 16 random 3x28x28 inputs, 2 classes (DomainBed's test dataset)"),
}


def dataset_class(name: str) -> Callable[..., MultipleDomainDataset]:
    """The dataset class registered as ``name``.

    Raises:
        DomainGradError: for an unknown name, listing the valid ones.
    """
    if name not in DATASETS:
        raise DomainGradError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name][0]


def get_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> MultipleDomainDataset:
    """Build the dataset registered as ``name`` (see :data:`DATASETS`)."""
    return dataset_class(name)(data_dir=data_dir, seed=seed)


__all__ = ["DATASETS", "InfiniteMinibatches", "MultipleDomainDataset", "Split", "TensorEnvironment",
           "dataset_class", "get_dataset", "split_environment"]
