"""Data layer: the dataset registry, splits and minibatch sampling.

A dataset is named by its registered name (:data:`DATASETS`, ``@register_dataset``),
``folder:PATH`` (a user's ``<domain>/<class>/<image>`` folder), a
``package.module:Class`` spec, or an entry point of the group ``domaingrad.datasets``
(see :mod:`domaingrad.plugins`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .. import plugins
from ..errors import DomainGradError
from ..layout import SPLIT_PROTOCOLS
from .base import (
    InfiniteMinibatches,
    MultipleDomainDataset,
    Split,
    TensorEnvironment,
    split_environment,
    split_environment_70_10_20,
)
from .debug import Debug28, Debug224
from .folders import FOLDER_DATASETS
from .images import ImageEnvironment, ImageFolderDataset, ImageMinibatches, folder_dataset_class, user_folder_dataset
from .mnist import ColoredFashionMNIST, ColoredMNIST, RotatedFashionMNIST, RotatedMNIST
from .spawrious import SPAWRIOUS_DATASETS, SpawriousDataset
from .wilds import WILDSCamelyon, WILDSDataset, WILDSFMoW

#: name -> (dataset class, one-line description)
DATASETS: dict[str, tuple[type[MultipleDomainDataset], str]] = {
    "ColoredMNIST": (ColoredMNIST, "3 envs +90%/+80%/-90% colour-label agreement, 2x28x28, 2 classes"),
    "RotatedMNIST": (RotatedMNIST, "6 envs rotated 0-75 degrees, 1x28x28, 10 classes"),
    "ColoredFashionMNIST": (ColoredFashionMNIST, "ColoredMNIST over Fashion-MNIST (70,000 images, label = class < 5)"),
    "RotatedFashionMNIST": (RotatedFashionMNIST, "RotatedMNIST over Fashion-MNIST (70,000 images, 10 classes)"),
    "Debug28": (Debug28, "3 envs x 16 random 3x28x28 inputs, 2 classes (DomainBed's test dataset)"),
    "Debug224": (Debug224, "3 envs x 16 random 3x224x224 inputs, 2 classes (DomainBed's test dataset)"),
}
DATASETS.update({name: (folder_dataset_class(spec), spec.description) for name, spec in FOLDER_DATASETS.items()})
DATASETS.update(
    {
        "WILDSCamelyon": (
            WILDSCamelyon,
            "wilds package (pip install wilds), D/camelyon17_v1.0: hospital_0..4; 2 classes",
        ),
        "WILDSFMoW": (WILDSFMoW, "wilds package (pip install wilds), D/fmow_v1.1: region_0..5; 62 classes"),
    }
)
DATASETS.update(
    {
        name: (cls, "folder D/spawrious224/<0|1>/<location>/<breed>: envs Test, SC_group_1, SC_group_2; 4 breeds")
        for name, cls in SPAWRIOUS_DATASETS.items()
    }
)
#: the names domaingrad itself defines (``register_dataset`` may not replace them)
BUILTIN_DATASETS = frozenset(DATASETS)

#: prefix of a user's image folder: ``--dataset folder:PATH``
USER_FOLDER_PREFIX = "folder:"

D = TypeVar("D", bound=type)


def register_dataset(name: str, description: str | None = None) -> Callable[[D], D]:
    """Class decorator registering a :class:`MultipleDomainDataset` subclass as ``name``
    (timm's ``register_model`` pattern), so ``--dataset name`` and
    ``domaingrad.get_dataset(name)`` find it in this process::

        @register_dataset("MyData")
        class MyData(MultipleDomainDataset):
            ENVIRONMENTS = ["a", "b", "c"]
            def __init__(self, data_dir=None, seed=0): ...

    The class is built as ``cls(data_dir=..., seed=...)`` and fills ``environments``,
    ``input_shape`` and ``num_classes``; ``ENVIRONMENTS`` lists the environment names
    (sweeps count environments from it without building the dataset). Registering a
    user name again replaces the earlier class (with a warning: e.g. a notebook cell run
    twice). Other processes (sweep workers) do not see registrations: name the class
    there as ``package.module:Class``, or declare an entry point.

    Args:
        name: the registry name.
        description: the one-line text of ``domaingrad list`` (default: the first line
            of the class docstring).

    Raises:
        TypeError: the decorated object is not a :class:`MultipleDomainDataset` subclass.
        ValueError: ``name`` is empty, contains a colon or is one of domaingrad's own.
    """
    plugins.check_new_name(name, BUILTIN_DATASETS, "dataset")

    def decorate(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, MultipleDomainDataset)):
            raise TypeError(
                f"@register_dataset({name!r}) decorates a subclass of "
                f"domaingrad.data.MultipleDomainDataset, got {cls!r}"
            )
        if name in DATASETS and DATASETS[name][0] is not cls:
            warnings.warn(
                f"register_dataset: {name!r} was registered to {DATASETS[name][0]!r}; it now names {cls!r}",
                stacklevel=2,
            )
        text = description if description is not None else plugins.first_paragraph(cls.__doc__)
        DATASETS[name] = (cls, text)
        return cls

    return decorate


def resolve_dataset_name(name: str) -> str:
    """The canonical spelling of the dataset name ``name``, as records, manifests and
    output keep it: a registered or entry-point name whatever its case (``"debug28"`` ->
    ``"Debug28"``, when only one name matches up to case); ``folder:PATH`` and
    ``package.module:Class`` specs unchanged. Nothing is imported.

    Raises:
        DomainGradError: for an unknown name, listing the valid ones and suggesting the
            closest.
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"a dataset name is a string, got {name!r}")
    if name in DATASETS or name.startswith(USER_FOLDER_PREFIX) or plugins.is_spec(name):
        return name
    known = list_datasets()
    canonical = plugins.canonical_name(name, known)
    if canonical is not None:
        return canonical
    raise DomainGradError(
        f"unknown dataset {name!r}; valid datasets: {', '.join(known)}, folder:PATH for your own "
        f"image folder, or package.module:Class for your own class{plugins.did_you_mean(name, known)}"
    )


def dataset_class(name: str) -> type[MultipleDomainDataset]:
    """The dataset class named ``name``: a registered name, ``folder:PATH`` (a user's
    image folder ``PATH/<domain>/<class>/<image>``, PATH relative to ``--data-dir``), a
    ``package.module:Class`` spec, or an entry point of the group
    ``domaingrad.datasets``. Names are matched case-insensitively when that is
    unambiguous (:func:`resolve_dataset_name`).

    Raises:
        DomainGradError: for an unknown name (listing the valid ones, suggesting the
            closest) or a spec that cannot be imported or does not name a
            :class:`MultipleDomainDataset` subclass.
        TypeError: ``name`` is not a string.
    """
    name = resolve_dataset_name(name)
    if name.startswith(USER_FOLDER_PREFIX):
        return user_folder_dataset(name[len(USER_FOLDER_PREFIX) :])
    if name in DATASETS:
        return DATASETS[name][0]
    if plugins.is_spec(name):
        return _checked(plugins.load_spec(name, "--dataset"), name)
    found = plugins.load_entry_point(plugins.DATASET_GROUP, name, "--dataset")
    if found is None:  # listed a moment ago, gone now (an uninstalled distribution)
        raise DomainGradError(f"--dataset {name}: its entry point is no longer installed")
    return _checked(found, f"{name} (entry point)")


def _checked(obj: Any, what: str) -> type[MultipleDomainDataset]:
    if not (isinstance(obj, type) and issubclass(obj, MultipleDomainDataset)):
        raise DomainGradError(
            f"--dataset {what} is {obj!r}, not a dataset: expected a subclass of domaingrad.data.MultipleDomainDataset"
        )
    return obj


def list_datasets() -> list[str]:
    """Every dataset name: the registered ones (domaingrad's, then this process's
    ``@register_dataset`` ones) and the installed entry points (not imported)."""
    names = list(DATASETS)
    return names + [n for n in plugins.entry_point_names(plugins.DATASET_GROUP) if n not in DATASETS]


def get_dataset(name: str, data_dir: str | None = None, seed: int = 0, **image_options: Any) -> MultipleDomainDataset:
    """Build the dataset named ``name`` (see :func:`dataset_class`).

    ``seed`` seeds the data construction (DomainBed's colours and label noise).
    ``image_options`` (``image_size``, ``num_workers``, ``class_map``,
    ``corrupt_images``) go to image-folder datasets (:class:`ImageFolderDataset`) and
    are not used by the other ones.

    Raises:
        DomainGradError: for an unknown name or missing data.
    """
    cls = dataset_class(name)
    # the dataset contract: cls(data_dir=..., seed=...) (MultipleDomainDataset declares no __init__)
    build: Callable[..., MultipleDomainDataset] = cls
    if issubclass(cls, ImageFolderDataset):
        return build(data_dir=data_dir, seed=seed, **image_options)
    return build(data_dir=data_dir, seed=seed)


__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "FOLDER_DATASETS",
    "ImageEnvironment",
    "ImageFolderDataset",
    "ImageMinibatches",
    "USER_FOLDER_PREFIX",
    "InfiniteMinibatches",
    "MultipleDomainDataset",
    "Split",
    "TensorEnvironment",
    "SPLIT_PROTOCOLS",
    "SpawriousDataset",
    "WILDSDataset",
    "dataset_class",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "resolve_dataset_name",
    "split_environment",
    "split_environment_70_10_20",
]
