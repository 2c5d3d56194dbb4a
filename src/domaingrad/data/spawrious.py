"""The Spawrious benchmarks (DomainBed's ``SpawriousO2O_*`` and ``SpawriousM2M_*``):
four dog breeds photographed (generated) on six backgrounds, with spurious
background-breed correlations that differ between training and test.

Lynch, Dovonon, Kaddour, Silva, "Spawrious: A Benchmark for Fine Control of Spurious
Correlation Biases", 2023; the environments are the ones DomainBed's
``domainbed/datasets.py`` (``SpawriousBenchmark``) builds (Gulrajani and Lopez-Paz,
"In Search of Lost Domain Generalization", ICLR 2021).

Layout: the archive ``spawrious224.tar.gz`` unpacks to
``D/spawrious224/<subset>/<location>/<breed>/<image>``, subsets ``0`` and ``1``
(plus ``domain_adaptation_ds``, unused), locations ``beach, desert, dirt, jungle,
mountain, snow``, breeds ``bulldog, corgi, dachshund, labrador``. DomainBed reads
``<subset>/...`` under its ``--data_dir`` itself, so both ``--data-dir D`` (holding
``spawrious224/``) and ``--data-dir D/spawrious224`` (holding ``0/``) work here.

Environments (DomainBed's order): 0 ``Test``, 1 ``SC_group_1``, 2 ``SC_group_2``.
Each is a concatenation of (subset, location, breed) folders, each folder cut to its
first ``limit`` images (see :func:`spawrious_parts`); labels are the index in
``bulldog, corgi, dachshund, labrador``. DomainBed's protocol tests on environment 0
(``--test-envs 0``).

Where this departs from DomainBed: DomainBed lists a folder with ``os.listdir``, whose
order depends on the file system, and takes the first ``limit`` names; domaingrad
sorts the names first, so which images a limit keeps (and the in/out split) do not
depend on the machine. Files are those whose names end in ``.png``, ``.jpg`` or
``.jpeg`` (case-sensitive, as DomainBed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import DomainGradError
from .folders import check_images
from .images import ImageEnvironment, ImageFolderDataset, default_workers, eval_transform

#: the labels: a breed's label is its index here (DomainBed's ``class_list``)
SPAWRIOUS_CLASSES = ("bulldog", "corgi", "dachshund", "labrador")
SPAWRIOUS_LOCATIONS = ("beach", "desert", "dirt", "jungle", "mountain", "snow")
#: the archive's top directory
SPAWRIOUS_DIR = "spawrious224"
#: DomainBed's ``CustomImageFolder`` suffixes (``str.endswith``, case-sensitive)
SPAWRIOUS_SUFFIXES = (".png", ".jpg", ".jpeg")
#: DomainBed's ``total``: images per breed and training environment
SPAWRIOUS_TOTAL = 3168


@dataclass(frozen=True)
class SpawriousSetting:
    """One benchmark's backgrounds (DomainBed's ``group``, ``test``, ``filler``).

    Attributes:
        group: training location of bulldog, dachshund, labrador, corgi (in that order).
        test: test location of bulldog, dachshund, labrador, corgi.
        filler: O2O: the location of the uncorrelated 3% / 13% of each training
            environment; None for M2M.
    """

    group: tuple[str, str, str, str]
    test: tuple[str, str, str, str]
    filler: str | None


#: DomainBed's settings, per benchmark
SPAWRIOUS_SETTINGS: dict[str, SpawriousSetting] = {
    "SpawriousO2O_easy": SpawriousSetting(
        ("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"
    ),
    "SpawriousO2O_medium": SpawriousSetting(
        ("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"
    ),
    "SpawriousO2O_hard": SpawriousSetting(
        ("jungle", "mountain", "snow", "desert"), ("mountain", "snow", "desert", "jungle"), "beach"
    ),
    "SpawriousM2M_easy": SpawriousSetting(
        ("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert"), None
    ),
    "SpawriousM2M_medium": SpawriousSetting(
        ("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow"), None
    ),
    "SpawriousM2M_hard": SpawriousSetting(
        ("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle"), None
    ),
}

#: the breeds in the order ``group`` and ``test`` give their locations
_ORDER = ("bulldog", "dachshund", "labrador", "corgi")


@dataclass(frozen=True)
class SpawriousPart:
    """One folder of an environment: ``<subset>/<location>/<breed>``, its first
    ``limit`` images (None: all)."""

    subset: str
    location: str
    breed: str
    limit: int | None = None

    @property
    def folder(self) -> str:
        return f"{self.subset}/{self.location}/{self.breed}"


def spawrious_parts(name: str, total: int = SPAWRIOUS_TOTAL) -> list[list[SpawriousPart]]:
    """The folders of each environment of benchmark ``name``, in DomainBed's order:
    [Test, SC_group_1, SC_group_2], each a list of parts concatenated in that order.

    O2O (``build_type1_combination``): training environment k (k = 0, 1) reads subset
    ``k``: each breed from its ``group`` location, the first ``int(0.97 total)`` (k=0)
    or ``int(0.87 total)`` (k=1) images, then every breed from the ``filler`` location,
    ``total`` minus that many each. The test environment reads, from subsets 0 then 1,
    each breed from its ``test`` location, all images.

    M2M (``build_type2_combination``): everything from subset 0; training environment
    1 takes bulldog, dachshund, labrador, corgi from group locations 0, 1, 2, 3 and
    environment 2 from 1, 0, 3, 2 (``total`` images each); the test environment takes
    them from test locations 0, 1, 2, 3, then 1, 0, 3, 2 (all images).

    Raises:
        DomainGradError: ``name`` is not a Spawrious benchmark.
    """
    if name not in SPAWRIOUS_SETTINGS:
        raise DomainGradError(f"unknown Spawrious benchmark {name!r}; expected one of {', '.join(SPAWRIOUS_SETTINGS)}")
    setting = SPAWRIOUS_SETTINGS[name]
    g, t = setting.group, setting.test
    if setting.filler is not None:
        counts = (int(0.97 * total), int(0.87 * total))
        train = [
            [SpawriousPart(str(k), g[i], breed, counts[k]) for i, breed in enumerate(_ORDER)]
            + [SpawriousPart(str(k), setting.filler, breed, total - counts[k]) for breed in _ORDER]
            for k in (0, 1)
        ]
        test = [SpawriousPart(str(k), t[i], breed) for k in (0, 1) for i, breed in enumerate(_ORDER)]
    else:
        swap = (1, 0, 3, 2)  # the second environment's (and test half's) location of each breed
        train = [
            [SpawriousPart("0", g[i], breed, total) for i, breed in enumerate(_ORDER)],
            [SpawriousPart("0", g[swap[i]], breed, total) for i, breed in enumerate(_ORDER)],
        ]
        test = [SpawriousPart("0", t[i], breed) for i, breed in enumerate(_ORDER)] + [
            SpawriousPart("0", t[swap[i]], breed) for i, breed in enumerate(_ORDER)
        ]
    return [test, *train]


def spawrious_train_transform(image_size: int):
    """DomainBed's Spawrious training transform (no random crop, unlike the image
    folders'): Resize((S, S)), RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3),
    RandomGrayscale, ToTensor, ImageNet normalisation; PIL image -> (3, S, S)."""
    from torchvision import transforms as T

    from .images import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def find_spawrious_root(data_dir: str | Path) -> Path:
    """The directory holding the subsets ``0/`` and ``1/``: ``D/spawrious224`` when it
    exists, else ``D`` itself when it holds ``0/`` (DomainBed's ``--data_dir``).

    Raises:
        DomainGradError: neither exists, saying where the folders are expected.
    """
    base = Path(data_dir)
    if (base / SPAWRIOUS_DIR).is_dir():
        return base / SPAWRIOUS_DIR
    if (base / "0").is_dir():
        return base
    raise DomainGradError(
        f"Spawrious: no directory {base / SPAWRIOUS_DIR} (nor {base / '0'}); expected "
        f"{base / SPAWRIOUS_DIR}/<0|1>/<location>/<breed>/<image>. Fetch it with "
        f"`domaingrad download Spawrious --data-dir {base}`"
    )


def _listing(folder: Path, limit: int | None) -> list[Path]:
    names = sorted(n for n in os.listdir(folder) if n.endswith(SPAWRIOUS_SUFFIXES))
    return [folder / n for n in (names[:limit] if limit else names)]


class SpawriousDataset(ImageFolderDataset):
    """A Spawrious benchmark read from ``D/spawrious224/<subset>/<location>/<breed>``
    (see the module docstring): 3 environments (Test, SC_group_1, SC_group_2), 4 classes.

    Args:
        data_dir: holds ``spawrious224/`` (or is it).
        seed: unused (the environments are not random).
        image_size: side of the square network input (DomainBed: 224).
        num_workers: DataLoader workers (None: DomainBed's 8, at most the CPU count).
        class_map: must be None (the breeds are fixed).
        corrupt_images: ``error`` or ``skip`` (as for image folders).

    Raises:
        DomainGradError: no ``data_dir``, missing folders (all listed), a ``class_map``,
            corrupt images under ``error``, an environment without images.
    """

    ENVIRONMENTS = ["Test", "SC_group_1", "SC_group_2"]
    CHECKPOINT_FREQ = 100  # DomainBed's default: SpawriousBenchmark sets none
    #: the benchmark's name (a key of :data:`SPAWRIOUS_SETTINGS`)
    BENCHMARK: ClassVar[str]
    #: DomainBed's ``total`` (a class attribute so tests can use tiny folders)
    TOTAL: ClassVar[int] = SPAWRIOUS_TOTAL
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
        if data_dir is None:
            raise DomainGradError(
                f"{name} is read from image folders: pass --data-dir D with D/{SPAWRIOUS_DIR}/<0|1>/<location>/<breed>"
            )
        if class_map is not None:
            raise DomainGradError(f"--class-map does not apply to {name}: its breeds are fixed; drop --class-map")
        if image_size < 1:
            raise DomainGradError(f"--image-size must be a positive integer, got {image_size}")
        if num_workers is not None and num_workers < 0:
            raise DomainGradError(f"--num-workers must be 0 or more, got {num_workers}")
        root = find_spawrious_root(data_dir)
        parts = spawrious_parts(self.BENCHMARK, self.TOTAL)
        missing = sorted({p.folder for env in parts for p in env if not (root / p.folder).is_dir()})
        if missing:
            raise DomainGradError(
                f"{name}: {root} lacks the folder(s) {', '.join(missing)} (<subset>/<location>/<breed>); "
                f"fetch the complete archive with `domaingrad download Spawrious --data-dir {data_dir}`"
            )
        label = {breed: i for i, breed in enumerate(SPAWRIOUS_CLASSES)}
        found = [[(path, label[p.breed]) for p in env for path in _listing(root / p.folder, p.limit)] for env in parts]
        self.num_workers = default_workers() if num_workers is None else num_workers
        all_paths = list(dict.fromkeys(path for env in found for path, _ in env))
        bad, bad_report = check_images(all_paths, corrupt_images, name, self.num_workers)
        self.image_size, self.corrupt_images = image_size, corrupt_images
        self.eval_transform, self.train_transform = eval_transform(image_size), spawrious_train_transform(image_size)
        self.environments = []
        for env_name, pairs in zip(self.ENVIRONMENTS, found):
            kept = [(str(p), y) for p, y in pairs if p not in bad]
            if not kept:
                raise DomainGradError(f"{name}: environment {env_name} has no readable images under {root}")
            self.environments.append(
                ImageEnvironment(env_name, [p for p, _ in kept], torch.tensor([y for _, y in kept]), self)
            )
        self.class_names = list(SPAWRIOUS_CLASSES)
        self.input_shape = (3, image_size, image_size)
        self.num_classes = len(SPAWRIOUS_CLASSES)
        self.report = tuple(bad_report)
        sizes = ", ".join(f"{e.name} {len(e)}" for e in self.environments)
        self.source = f"{name}: {sum(len(e) for e in self.environments)} images in {root} ({sizes}); 4 classes"
        self.load_failures: list[str] = []


def _spawrious_class(name: str) -> type[SpawriousDataset]:
    setting = SPAWRIOUS_SETTINGS[name]
    kind = "one-to-one" if setting.filler is not None else "many-to-many"
    doc = (
        f"Spawrious {kind} benchmark {name.split('_')[1]} (DomainBed ``{name}``): environments Test, "
        f"SC_group_1, SC_group_2 from D/{SPAWRIOUS_DIR}/; 4 breeds; see :mod:`domaingrad.data.spawrious`."
    )
    return type(name, (SpawriousDataset,), {"__doc__": doc, "__module__": __name__, "BENCHMARK": name})


SpawriousO2O_easy = _spawrious_class("SpawriousO2O_easy")
SpawriousO2O_medium = _spawrious_class("SpawriousO2O_medium")
SpawriousO2O_hard = _spawrious_class("SpawriousO2O_hard")
SpawriousM2M_easy = _spawrious_class("SpawriousM2M_easy")
SpawriousM2M_medium = _spawrious_class("SpawriousM2M_medium")
SpawriousM2M_hard = _spawrious_class("SpawriousM2M_hard")

#: the registered Spawrious classes, by name
SPAWRIOUS_DATASETS: dict[str, type[SpawriousDataset]] = {
    cls.__name__: cls
    for cls in (
        SpawriousO2O_easy,
        SpawriousO2O_medium,
        SpawriousO2O_hard,
        SpawriousM2M_easy,
        SpawriousM2M_medium,
        SpawriousM2M_hard,
    )
}
