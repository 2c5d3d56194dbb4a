"""Data layer: the dataset registry, splits and minibatch sampling."""
from __future__ import annotations

from typing import Callable

from ..errors import DomainGradError
from .base import (SPLIT_PROTOCOLS, InfiniteMinibatches, MultipleDomainDataset, Split, TensorEnvironment,
                   split_environment, split_environment_70_10_20)
from .debug import Debug28
from .folders import FOLDER_DATASETS
from .images import ImageEnvironment, ImageFolderDataset, ImageMinibatches, folder_dataset_class, user_folder_dataset
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
DATASETS.update({name: (folder_dataset_class(spec), spec.description) for name, spec in FOLDER_DATASETS.items()})

#: prefix of a user's image folder: ``--dataset folder:PATH``
USER_FOLDER_PREFIX = "folder:"


def dataset_class(name: str) -> Callable[..., MultipleDomainDataset]:
    """The dataset class registered as ``name``; ``folder:PATH`` is a user's image
    folder (``PATH/<domain>/<class>/<image>``, PATH relative to ``--data-dir``).

    Raises:
        DomainGradError: for an unknown name, listing the valid ones.
    """
    if name.startswith(USER_FOLDER_PREFIX):
        return user_folder_dataset(name[len(USER_FOLDER_PREFIX):])
    if name not in DATASETS:
        raise DomainGradError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}, "
                              f"or folder:PATH for your own image folder")
    return DATASETS[name][0]


def get_dataset(name: str, data_dir: str | None = None, seed: int = 0, **image_options) -> MultipleDomainDataset:
    """Build the dataset registered as ``name`` (see :data:`DATASETS`).

    ``image_options`` (``image_size``, ``num_workers``, ``class_map``,
    ``corrupt_images``) go to image-folder datasets (:class:`ImageFolderDataset`) and
    are not used by the in-memory ones.
    """
    cls = dataset_class(name)
    if isinstance(cls, type) and issubclass(cls, ImageFolderDataset):
        return cls(data_dir=data_dir, seed=seed, **image_options)
    return cls(data_dir=data_dir, seed=seed)


__all__ = ["DATASETS", "FOLDER_DATASETS", "ImageEnvironment", "ImageFolderDataset", "ImageMinibatches",
           "USER_FOLDER_PREFIX", "InfiniteMinibatches", "MultipleDomainDataset", "Split", "TensorEnvironment",
           "SPLIT_PROTOCOLS", "dataset_class", "get_dataset", "split_environment", "split_environment_70_10_20"]
