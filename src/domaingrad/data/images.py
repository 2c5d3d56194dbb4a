"""Image-folder datasets: DomainBed's transforms, and loading in DataLoader workers.

An :class:`ImageFolderDataset` holds, per domain, the image paths and labels (found by
:mod:`domaingrad.data.folders`); pixels are decoded only when a batch is loaded.

- Clean images (DomainBed ``datasets.MultipleEnvironmentImageFolder``'s ``transform``):
  resize to ``image_size`` x ``image_size``, ``ToTensor``, ImageNet normalisation.
- Augmented images (its ``augment_transform``, when hparam ``data_augmentation`` is
  true): ``RandomResizedCrop(image_size, scale=(0.7, 1.0))``, horizontal flip,
  ``ColorJitter(0.3, 0.3, 0.3, 0.3)``, ``RandomGrayscale()``, then as above.
- Which images get which: DomainBed gives the augmenting transform to every
  environment that is not a test environment, and its evaluation loaders read those
  same datasets, so the training minibatches *and* the evaluation passes over the
  training environments' in and out splits are augmented; test environments never
  are. That is the default here too (``domaingrad.run.TrainingRun`` asks for it with
  :meth:`~domaingrad.data.base.Split.augmented`); ``domaingrad train --clean-eval``
  evaluates every split on clean images instead. Evaluation passes are read in order
  by finite DataLoaders.
- :class:`ImageMinibatches` is the endless training stream: each step draws
  ``batch_size`` positions per training split uniformly with replacement (or
  class-balanced), as DomainBed's ``InfiniteDataLoader``, and loads the whole step in
  one worker of a single DataLoader.

Exact resume: the positions of step k and the seed of every sample's augmentation
come from a generator seeded with ``seed_hash(seed, k)``, and each sample is
transformed under its own seed, so the stream is a function of the step number only:
it does not depend on the number of workers or on prefetching, and a resumed run sees
the same images with the same augmentation as an uninterrupted one. An augmented
evaluation pass transforms the sample at position p under ``seed_hash(augment_seed, p)``
(the run derives ``augment_seed`` from its seed, the checkpoint step and the split), so
it too is a function of the step only, and does not depend on the evaluation batch
size or the workers.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DomainGradError
from ..rng import seed_hash
from .base import MultipleDomainDataset, Split, check_training_splits
from .folders import DomainImages, FolderSpec, check_images, find_domains, match_classes, read_class_map, scan_domain

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DomainBed's ``N_WORKERS``
DOMAINBED_WORKERS = 8


def eval_transform(image_size: int) -> Callable:
    """DomainBed's test transform: PIL image -> float tensor (3, image_size, image_size)."""
    from torchvision import transforms as T  # imported here: torchvision takes seconds to import

    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int) -> Callable:
    """DomainBed's ``augment_transform``: PIL image -> float tensor (3, image_size, image_size)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def default_workers() -> int:
    """DomainBed's 8 DataLoader workers, at most the number of CPU cores."""
    return max(1, min(DOMAINBED_WORKERS, os.cpu_count() or 1))


def open_rgb(path: str) -> Image.Image:
    """The image file ``path`` decoded as RGB (PIL)."""
    with Image.open(path) as opened:
        return opened.convert("RGB")


class _Reader:
    """Loads and transforms one image; failures raise or return None (``skip``).

    ``load`` maps an item key (a file path for image folders) to a PIL image; the
    default opens the file (:func:`open_rgb`)."""

    def __init__(self, transform: Callable, policy: str, load: Callable[[str], Image.Image] | None = None):
        self.transform = transform
        self.policy = policy
        self.load = load

    def __call__(self, path: str, seed: int | None) -> torch.Tensor | None:
        try:
            image = open_rgb(path) if self.load is None else self.load(path).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            if self.policy == "skip":
                return None
            raise DomainGradError(
                f"cannot decode image {path} ({type(exc).__name__}: {exc}); remove or replace "
                f"it, or pass --corrupt-images skip"
            ) from exc
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


class ImageEnvironment:
    """One domain of an image folder: paths and labels, pixels loaded on demand.

    Attributes:
        name: the domain folder name.
        paths: image paths (N,).
        y: int64 labels of shape (N,).
        dataset: the owning :class:`ImageFolderDataset` (image size, workers, policy).
    """

    def __init__(self, name: str, paths: list[str], y: torch.Tensor, dataset: ImageFolderDataset):
        self.name, self.paths, self.y, self.dataset = name, paths, y, dataset

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, indices: torch.Tensor, batch_size: int, augment_seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The samples at ``indices`` in order as (x, y) batches of at most
        ``batch_size``: x (b, 3, S, S), y (b,). Loaded in DataLoader workers; under the
        ``skip`` policy images that fail to decode are left out.

        Args:
            indices: int64 (n,), positions in this environment.
            batch_size: samples per batch.
            augment_seed: None for clean images (the evaluation transform); otherwise
                the training augmentation, the sample at position p transformed under
                the seed ``seed_hash(augment_seed, p)``.
        """
        keys: list[tuple[int, int, int | None]]
        if augment_seed is None:
            keys = [(0, int(i), None) for i in indices]
            transform = self.dataset.eval_transform
        else:
            keys = [(0, int(i), seed_hash(augment_seed, int(i))) for i in indices]
            transform = self.dataset.train_transform
        n_batches = -(-len(keys) // batch_size)
        workers = self.dataset.num_workers if n_batches > 1 else 0
        items = _Items(
            _Reader(transform, self.dataset.corrupt_images, self.dataset.image_loader), [(self.paths, self.y)]
        )
        loader = DataLoader(items, sampler=keys, batch_size=batch_size, num_workers=workers, collate_fn=_Collate(1))
        for domains, failed in loader:
            self.dataset.note_failures(failed)
            yield domains[0]


class _Items(Dataset):
    """Map-style dataset over several sources (paths, labels) whose keys are
    (source, position, augmentation seed or None); small keys travel to the workers."""

    def __init__(self, reader: _Reader, sources: list[tuple[list[str], torch.Tensor]]):
        self.reader = reader
        self.sources = [(paths, y.tolist()) for paths, y in sources]

    def __getitem__(self, key: tuple[int, int, int | None]):
        slot, pos, seed = key
        paths, labels = self.sources[slot]
        return slot, self.reader(paths[pos], seed), labels[pos], paths[pos]

    def __len__(self) -> int:
        return sum(len(paths) for paths, _ in self.sources)


class _Collate:
    """Collate a step's samples into one (x, y) pair per source, dropping failures;
    returns (list of (x, y), failed paths)."""

    def __init__(self, n_sources: int):
        self.n_sources = n_sources

    def __call__(self, items):
        failed = [path for _, x, _, path in items if x is None]
        out = []
        for slot in range(self.n_sources):
            mine = [(x, y) for d, x, y, _ in items if x is not None and d == slot]
            xs = torch.stack([x for x, _ in mine]) if mine else torch.empty(0)
            out.append((xs, torch.tensor([y for _, y in mine], dtype=torch.long)))
        return out, failed


class _StepSampler(Sampler):
    """Batch sampler yielding step k, k+1, ...: one list of keys per step."""

    def __init__(self, stream: ImageMinibatches, start: int):
        self.stream, self.start = stream, start

    def __iter__(self):
        for step in itertools.count(self.start):
            yield self.stream.keys_of_step(step)

    def __len__(self) -> int:  # infinite; DataLoader only calls this for len(loader)
        raise TypeError("the training stream is endless")


class ImageMinibatches:
    """Endless training minibatches from image folders, loaded in DataLoader workers.

    Each ``next()`` returns one (x, y) per training split, x (batch_size, 3, S, S),
    y (batch_size,) (fewer only when images fail to decode under the ``skip`` policy).
    See the module docstring for the sampling and exact resume.

    Args:
        splits: the training splits, one per training environment.
        batch_size: samples per environment per step.
        seed: seed of the stream.
        class_balanced: DomainBed's ``class_balanced``.
        augment: apply DomainBed's training augmentation.
        num_workers: DataLoader worker processes (0: load in the main process).
        pin_memory: pin batches for faster transfer to a GPU.

    Raises:
        DomainGradError: a bad batch size, an empty split, or a split of an environment
            that is not an :class:`ImageEnvironment`.
    """

    def __init__(
        self,
        splits: Sequence[Split],
        batch_size: int,
        seed: int,
        class_balanced: bool,
        augment: bool,
        num_workers: int,
        pin_memory: bool = False,
    ):
        check_training_splits(splits, batch_size)
        self.splits, self.batch_size, self.seed = list(splits), batch_size, seed
        self.weights = [(1.0 / torch.bincount(s.y).double())[s.y] if class_balanced else None for s in self.splits]
        self.envs: list[ImageEnvironment] = []
        for split in self.splits:
            if not isinstance(split.env, ImageEnvironment):
                raise DomainGradError(
                    f"environment {split.env.name!r} is not an image folder "
                    f"({type(split.env).__name__}); draw its minibatches with its "
                    "dataset's minibatches()"
                )
            self.envs.append(split.env)
        dataset = self.envs[0].dataset
        self.dataset = dataset
        self.reader = _Reader(
            dataset.train_transform if augment else dataset.eval_transform, dataset.corrupt_images, dataset.image_loader
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.step = 0
        # the DataLoader iterator, yielding (one (x, y) per split, failed paths) per step
        self._iterator: Iterator[Any] | None = None

    def keys_of_step(self, step: int) -> list[tuple]:
        """The (training split, position in its environment, augmentation seed) keys of
        step ``step``, computed from ``seed_hash(seed, step)`` alone."""
        generator = torch.Generator().manual_seed(seed_hash(self.seed, step))
        keys = []
        for slot, (split, weights) in enumerate(zip(self.splits, self.weights)):
            if weights is None:
                pos = torch.randint(len(split), (self.batch_size,), generator=generator)
            else:
                pos = torch.multinomial(weights, self.batch_size, replacement=True, generator=generator)
            seeds = torch.randint(0, 2**62, (self.batch_size,), generator=generator)
            keys += [(slot, int(p), int(s)) for p, s in zip(split.indices[pos].tolist(), seeds.tolist())]
        return keys

    def __iter__(self) -> ImageMinibatches:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None:
            items = _Items(self.reader, [(env.paths, env.y) for env in self.envs])
            loader = DataLoader(
                items,
                batch_sampler=_StepSampler(self, self.step),
                num_workers=self.num_workers,
                collate_fn=_Collate(len(self.splits)),
                pin_memory=self.pin_memory,
            )
            self._iterator = iter(loader)
        batches, failed = next(self._iterator)
        self.step += 1
        self.dataset.note_failures(failed)
        for (x, _), split in zip(batches, self.splits):
            if len(x) == 0:
                raise DomainGradError(
                    f"no image of this step's batch of environment {split.env.name!r} "
                    "could be decoded; check the files named in the log"
                )
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the worker processes now (a later ``next()`` starts them again)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


class ImageFolderDataset(MultipleDomainDataset):
    """A DG dataset read from ``<data_dir>/<directory>/<domain>/<class>/<image>``.

    Subclasses set ``SPEC`` (:class:`~domaingrad.data.folders.FolderSpec`); a user
    folder is built with :func:`user_folder_dataset`. Environments are
    :class:`ImageEnvironment`; ``input_shape`` is (3, image_size, image_size).

    Args:
        data_dir: the root holding the dataset directory (required).
        seed: unused (folder datasets are not random); kept for the registry's signature.
        image_size: side of the square images given to the network (DomainBed: 224).
        num_workers: DataLoader workers (None: DomainBed's 8, at most the CPU count).
        class_map: path of a class-name mapping file (see :mod:`domaingrad.data.folders`).
        corrupt_images: ``error`` or ``skip``.

    Raises:
        DomainGradError: missing ``data_dir`` or directories, mismatched classes, bad
            mapping file, corrupt images under ``error``, a bad image size.
    """

    SPEC: FolderSpec
    environments: list[ImageEnvironment]
    CHECKPOINT_FREQ = 300
    AUGMENTS = True
    #: maps an environment's item key (``ImageEnvironment.paths``) to a PIL image; None
    #: opens the key as a file path. Datasets whose items are not files (WILDS) set it to
    #: a small picklable callable: it travels to the DataLoader workers.
    image_loader: Callable[[str], Image.Image] | None = None

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        image_size: int = 224,
        num_workers: int | None = None,
        class_map: str | None = None,
        corrupt_images: str = "error",
    ):
        spec = self.SPEC
        if data_dir is None and spec.domains is not None:
            raise DomainGradError(
                f"{spec.name} is read from image folders: pass --data-dir D with "
                f"D/{spec.directory}/<domain>/<class>/<image>"
            )
        if image_size < 1:
            raise DomainGradError(f"--image-size must be a positive integer, got {image_size}")
        if num_workers is not None and num_workers < 0:
            raise DomainGradError(f"--num-workers must be 0 or more, got {num_workers}")
        root = Path(data_dir or "") / spec.directory
        domain_dirs, report = find_domains(root, spec)
        found = [scan_domain(d) for d in domain_dirs]
        classes = match_classes(found, read_class_map(class_map), spec.name)
        all_paths = [p for d in found for files in d.classes.values() for p in files]
        self.num_workers = default_workers() if num_workers is None else num_workers
        bad, bad_report = check_images(all_paths, corrupt_images, spec.name, self.num_workers)
        self.image_size, self.corrupt_images = image_size, corrupt_images
        self.eval_transform, self.train_transform = eval_transform(image_size), train_transform(image_size)
        self.environments = [self._environment(domain, classes.label_of[domain.name], bad) for domain in found]
        self.class_names = classes.names
        self.input_shape = (3, image_size, image_size)
        self.num_classes = len(classes.names)
        ignored = sum(d.ignored for d in found)
        ignored_line = [f"{spec.name}: ignored {ignored} file(s) without an image extension"] if ignored else []
        self.report = tuple(report + classes.report + bad_report + ignored_line)
        sizes = ", ".join(f"{e.name} {len(e)}" for e in self.environments)
        self.source = (
            f"{spec.name}: {sum(len(e) for e in self.environments)} images in {root} ({sizes}); "
            f"{self.num_classes} classes; {image_size}x{image_size}"
        )
        self.load_failures: list[str] = []

    def _environment(self, domain: DomainImages, label_of: dict[str, int], bad: set[Path]) -> ImageEnvironment:
        """The environment of one scanned domain: its readable images, sorted by class
        folder then file name, with their class-index labels."""
        pairs = [
            (str(p), label_of[folder])
            for folder, files in sorted(domain.classes.items())
            for p in files
            if p not in bad
        ]
        if not pairs:
            raise DomainGradError(f"{self.SPEC.name}: domain {domain.name} has no readable images")
        return ImageEnvironment(
            domain.name, [p for p, _ in pairs], torch.tensor([y for _, y in pairs], dtype=torch.long), self
        )

    def note_failures(self, paths: list[str]) -> None:
        """Record and log images that failed to decode while loading (``skip`` policy)."""
        for path in paths:
            if path not in self.load_failures:
                self.load_failures.append(path)
                log.warning("skipped an image that failed to decode: %s", path)

    def minibatches(
        self,
        splits: Sequence[Split],
        batch_size: int,
        seed: int,
        class_balanced: bool = False,
        augment: bool = False,
        pin_memory: bool = False,
    ) -> ImageMinibatches:
        return ImageMinibatches(splits, batch_size, seed, class_balanced, augment, self.num_workers, pin_memory)


def folder_dataset_class(spec: FolderSpec) -> type[ImageFolderDataset]:
    """An :class:`ImageFolderDataset` subclass for ``spec``."""
    return type(
        spec.name,
        (ImageFolderDataset,),
        {
            "SPEC": spec,
            "ENVIRONMENTS": list(spec.domains or []),
            "CHECKPOINT_FREQ": spec.checkpoint_freq,
            "__doc__": f"{spec.description} (image folder; see ImageFolderDataset).",
        },
    )


def user_folder_dataset(path: str) -> type[ImageFolderDataset]:
    """The dataset class of ``--dataset folder:PATH``: PATH (relative to ``--data-dir``
    when one is given) holds ``<domain>/<class>/<image>``; domains are its sorted
    sub-directories."""
    if not path:
        raise DomainGradError("--dataset folder:PATH needs a path, e.g. folder:my_photos")
    return folder_dataset_class(FolderSpec(f"folder:{path}", path, None, 300, "user image folder"))
