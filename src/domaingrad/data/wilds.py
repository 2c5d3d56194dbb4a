"""DomainBed's WILDS datasets, read through the ``wilds`` package (not a dependency of
domaingrad: ``pip install wilds``).

- ``WILDSCamelyon``: Camelyon17-WILDS (Koh et al., "WILDS: A Benchmark of in-the-Wild
  Distribution Shifts", ICML 2021), tumour patches from five hospitals; environments
  ``hospital_0`` .. ``hospital_4``, 2 classes; files under ``D/camelyon17_v1.0/``.
- ``WILDSFMoW``: FMoW-WILDS, satellite images of 62 land-use classes; environments
  ``region_0`` .. ``region_5``; files under ``D/fmow_v1.1/``.

As DomainBed's ``WILDSDataset`` (``domainbed/datasets.py``; Gulrajani and Lopez-Paz, "In
Search of Lost Domain Generalization", ICLR 2021): the wilds dataset is built with
``root_dir=D`` (no download), each distinct value v of the metadata column
(``hospital``, ``region``), sorted, makes the environment ``<column>_<v>`` of the samples
with that value, in their index order; labels are ``y_array``. Images are read with the
dataset's ``get_input``. Transforms: clean Resize((S, S)), ToTensor, ImageNet
normalisation; augmented Resize((S, S)), then RandomResizedCrop(S, scale=(0.7, 1)),
horizontal flip, ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale, ToTensor,
normalisation. Files are not checked before training (wilds knows the files); an image
that fails to decode stops the run, or is left out under ``--corrupt-images skip``.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import DomainGradError
from .images import IMAGENET_MEAN, IMAGENET_STD, ImageEnvironment, ImageFolderDataset, default_workers, eval_transform

#: what to tell a user without the package
WILDS_INSTALL = "pip install wilds"


def import_wilds_class(module: str, name: str, dataset: str) -> Any:
    """The class ``name`` of the wilds module ``module``.

    Raises:
        DomainGradError: the ``wilds`` package is not installed (or fails to import),
            naming what to install.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise DomainGradError(
            f"{dataset} is read through the `wilds` package, which is not installed ({exc}); install it with "
            f"`{WILDS_INSTALL}` (domaingrad does not depend on it)"
        ) from exc


def wilds_train_transform(image_size: int):
    """DomainBed's WILDS ``augment_transform``: PIL image -> (3, S, S)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class WILDSInputs:
    """Item key ``"<dataset>#<index>"`` -> PIL image, through the wilds dataset's
    ``get_input`` (arrays are converted with ``Image.fromarray``, as DomainBed does)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __call__(self, key: str) -> Image.Image:
        x = self.dataset.get_input(int(key.rsplit("#", 1)[1]))
        return x if isinstance(x, Image.Image) else Image.fromarray(x)


class WILDSDataset(ImageFolderDataset):
    """A WILDS dataset split into environments by one metadata column (see the module
    docstring). Subclasses set ``WILDS_MODULE``, ``WILDS_CLASS``, ``METADATA`` and
    ``WILDS_DIR``.

    Args:
        data_dir: the wilds ``root_dir`` (holding ``WILDS_DIR``).
        seed: unused (the environments are not random).
        image_size: side of the square network input (DomainBed: 224).
        num_workers: DataLoader workers (None: DomainBed's 8, at most the CPU count).
        class_map: must be None.
        corrupt_images: ``error`` or ``skip`` (applied while loading).

    Raises:
        DomainGradError: ``wilds`` not installed (saying ``pip install wilds``), no
            ``data_dir``, the data not found there, a ``class_map``, a bad option.
    """

    WILDS_MODULE: ClassVar[str]
    WILDS_CLASS: ClassVar[str]
    METADATA: ClassVar[str]
    WILDS_DIR: ClassVar[str]
    CHECKPOINT_FREQ = 100  # DomainBed's default: WILDSDataset sets none
    environments: list[ImageEnvironment]

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        image_size: int = 224,
        num_workers: int | None = None,
        class_map: str | None = None,
        corrupt_images: str = "error",
    ):
        name = type(self).__name__
        wilds_class = import_wilds_class(self.WILDS_MODULE, self.WILDS_CLASS, name)
        if data_dir is None:
            raise DomainGradError(f"{name}: pass --data-dir D with D/{self.WILDS_DIR}/ (the wilds root_dir)")
        if class_map is not None:
            raise DomainGradError(f"--class-map does not apply to {name}: its classes come from wilds; drop it")
        if image_size < 1:
            raise DomainGradError(f"--image-size must be a positive integer, got {image_size}")
        if num_workers is not None and num_workers < 0:
            raise DomainGradError(f"--num-workers must be 0 or more, got {num_workers}")
        try:
            dataset = wilds_class(root_dir=data_dir)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DomainGradError(
                f"{name}: wilds could not read {data_dir}/{self.WILDS_DIR} ({type(exc).__name__}: {exc}); fetch it "
                f"with `domaingrad download {name} --data-dir {data_dir}`"
            ) from exc
        fields = list(dataset.metadata_fields)
        if self.METADATA not in fields:
            raise DomainGradError(
                f"{name}: the wilds dataset has no metadata field {self.METADATA!r} (fields: {', '.join(fields)}); "
                "check the wilds version"
            )
        column = torch.as_tensor(dataset.metadata_array)[:, fields.index(self.METADATA)]
        labels = torch.as_tensor(dataset.y_array).long().view(-1)
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.image_size, self.corrupt_images = image_size, corrupt_images
        self.eval_transform, self.train_transform = eval_transform(image_size), wilds_train_transform(image_size)
        self.image_loader = WILDSInputs(dataset)
        self.environments = []
        for value in sorted(set(column.view(-1).tolist())):
            indices = torch.where(column == value)[0]
            keys = [f"{self.WILDS_DIR}#{i}" for i in indices.tolist()]
            self.environments.append(ImageEnvironment(f"{self.METADATA}_{value}", keys, labels[indices], self))
        self.num_classes = int(dataset.n_classes)
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.input_shape = (3, image_size, image_size)
        self.report = ()
        sizes = ", ".join(f"{e.name} {len(e)}" for e in self.environments)
        self.source = (
            f"{name}: {sum(len(e) for e in self.environments)} images through wilds in {data_dir}/{self.WILDS_DIR} "
            f"({sizes}); {self.num_classes} classes"
        )
        self.load_failures: list[str] = []


class WILDSCamelyon(WILDSDataset):
    """Camelyon17-WILDS through the wilds package (DomainBed ``WILDSCamelyon``): 5
    hospitals, 2 classes, from D/camelyon17_v1.0/."""

    ENVIRONMENTS = ["hospital_0", "hospital_1", "hospital_2", "hospital_3", "hospital_4"]
    WILDS_MODULE = "wilds.datasets.camelyon17_dataset"
    WILDS_CLASS = "Camelyon17Dataset"
    METADATA = "hospital"
    WILDS_DIR = "camelyon17_v1.0"


class WILDSFMoW(WILDSDataset):
    """FMoW-WILDS through the wilds package (DomainBed ``WILDSFMoW``): 6 regions, 62
    classes, from D/fmow_v1.1/."""

    ENVIRONMENTS = ["region_0", "region_1", "region_2", "region_3", "region_4", "region_5"]
    WILDS_MODULE = "wilds.datasets.fmow_dataset"
    WILDS_CLASS = "FMoWDataset"
    METADATA = "region"
    WILDS_DIR = "fmow_v1.1"
