"""Discovering image-folder datasets: ``root/<dataset dir>/<domain>/<class>/<image>``.

This module finds the domains, class folders and image files of a folder dataset,
matches class folders by name across domains into one class index (optionally through
a class-name mapping file), and checks every image file before training. Loading and
transforms are in :mod:`domaingrad.data.images`.

Rules (documented for users in the README):

- Domains are the sub-directories of the dataset directory. For the registered datasets
  (DomainBed's PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, SVIRO, and Digits-DG) their
  folder names and DomainBed's order (sorted names) are fixed; a missing domain is
  reported and the environments are the present ones in that order; a directory that
  is not one of the dataset's domains is an error. A user folder
  (``--dataset folder:PATH``) takes every sub-directory, sorted.
- A domain directory holding only ``train``/``val``/``test`` sub-directories (Dassl's
  Digits-DG layout, ``<domain>/train/<class>/<image>``) is pooled: DomainBed's in/out
  split is then made by domaingrad.
- Images are the files with torchvision's image extensions (``.jpg``, ``.png``, ...);
  other files are ignored (counted in the report).
- Classes: the class index is the sorted list of (canonical) class names. A domain
  that lacks a class is allowed and reported. A class folder found in only one of two
  or more domains is taken for a mismatched name (VLCS copies whose Caltech101 classes
  have German names, say) and is an error naming every such folder, unless the mapping
  file names it.
- Mapping file (``--class-map FILE``): a JSON object mapping ``"classfolder"`` (in every
  domain) or ``"domain/classfolder"`` (one domain; takes precedence) to a canonical
  class name, e.g. ``{"caltech/hund": "dog", "vogel": "bird"}``. Folders it names are
  accepted even if found in one domain only; an entry that matches no folder is an error.
- Corrupt files: every image's header is read with PIL before training (JPEG files
  without an end-of-image marker are decoded in full). ``--corrupt-images error`` (the
  default) stops with the list of bad paths; ``skip`` leaves them out, with their count
  and paths in the run's log.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DomainGradError

#: torchvision's ``datasets.folder.IMG_EXTENSIONS``
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = frozenset({"train", "val", "test"})
CORRUPT_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class FolderSpec:
    """A registered folder dataset: DomainBed's directory and domain folder names.

    Attributes:
        name: registry name (``--dataset``).
        directory: the dataset directory under ``--data-dir``.
        domains: domain folder names in DomainBed's order (sorted), or None for a user
            folder (every sub-directory, sorted).
        checkpoint_freq: DomainBed's ``CHECKPOINT_FREQ`` for the dataset.
        description: one line for ``domaingrad list``.
    """

    name: str
    directory: str
    domains: tuple[str, ...] | None
    checkpoint_freq: int = 300
    description: str = ""


FOLDER_DATASETS: dict[str, FolderSpec] = {
    spec.name: spec
    for spec in (
        FolderSpec(
            "PACS",
            "PACS",
            ("art_painting", "cartoon", "photo", "sketch"),
            300,
            "folder D/PACS/<domain>/<class>/<image>: art_painting, cartoon, photo, sketch; 7 classes",
        ),
        FolderSpec(
            "VLCS",
            "VLCS",
            ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
            300,
            "folder D/VLCS/...: Caltech101, LabelMe, SUN09, VOC2007; 5 classes",
        ),
        FolderSpec(
            "OfficeHome",
            "office_home",
            ("Art", "Clipart", "Product", "Real World"),
            300,
            "folder D/office_home/...: Art, Clipart, Product, Real World; 65 classes",
        ),
        FolderSpec(
            "TerraIncognita",
            "terra_incognita",
            ("location_100", "location_38", "location_43", "location_46"),
            300,
            "folder D/terra_incognita/...: location_100, _38, _43, _46; 10 classes",
        ),
        FolderSpec(
            "DomainNet",
            "domain_net",
            ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
            1000,
            "folder D/domain_net/...: clipart, infograph, painting, quickdraw, real, sketch; 345 classes",
        ),
        FolderSpec(
            "SVIRO",
            "sviro",
            ("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"),
            300,
            "folder D/sviro/...: 10 vehicle interiors aclass, escape, ..., zoe; 7 classes",
        ),
        FolderSpec(
            "DigitsDG",
            "digits_dg",
            ("mnist", "mnist_m", "svhn", "syn"),
            300,
            "folder D/digits_dg/<domain>[/train|val]/<class>/<image>: mnist, mnist_m, svhn, syn; 10 classes",
        ),
    )
}


@dataclass
class DomainImages:
    """The image files of one domain, before class matching.

    Attributes:
        name: the domain folder name.
        classes: class folder name -> sorted image paths.
        ignored: number of files without an image extension.
    """

    name: str
    classes: dict[str, list[Path]] = field(default_factory=dict)
    ignored: int = 0


def _entries(path: Path, what: str) -> list[os.DirEntry[str]]:
    """The entries of directory ``path`` (``os.scandir``); ``what`` names it in errors.

    Raises:
        DomainGradError: the directory cannot be listed (a PermissionError, say): without
            this, an unreadable class folder would look like a class without images.
    """
    try:
        with os.scandir(path) as listing:
            return list(listing)
    except OSError as exc:
        raise DomainGradError(
            f"cannot read {what} {path} ({type(exc).__name__}: {exc.strerror or exc}); make it readable "
            f"(e.g. chmod -R u+rX '{path}') or move it out of the dataset"
        ) from exc


def _subdirs(path: Path, what: str = "directory") -> list[Path]:
    return sorted(Path(e.path) for e in _entries(path, what) if e.is_dir() and not e.name.startswith("."))


def _files(class_dir: Path) -> list[Path]:
    """Every file under ``class_dir`` at any depth, sorted (as ``sorted(rglob("*"))``
    finds them, symbolic links to directories not followed), but an unreadable directory
    is an error instead of being skipped."""
    files, pending = [], [class_dir]
    while pending:
        folder = pending.pop()
        for entry in _entries(folder, "class directory" if folder == class_dir else "directory"):
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif entry.is_file():
                files.append(Path(entry.path))
    return sorted(files)


def scan_domain(path: Path) -> DomainImages:
    """Class folders and image files of one domain directory (pooling train/val/test
    sub-directories when the domain holds only those).

    Raises:
        DomainGradError: a directory of the domain that cannot be listed, naming it.
    """
    found = DomainImages(path.name)
    subdirs = _subdirs(path, "domain directory")
    roots = subdirs if subdirs and {p.name for p in subdirs} <= SPLIT_DIRS else [path]
    for root in roots:
        for class_dir in _subdirs(root):
            for file in _files(class_dir):
                if file.name.startswith("."):
                    continue
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    found.classes.setdefault(class_dir.name, []).append(file)
                else:
                    found.ignored += 1
    return found


def find_domains(root: Path, spec: FolderSpec) -> tuple[list[Path], list[str]]:
    """The domain directories of a dataset, in order, and report lines.

    Raises:
        DomainGradError: missing dataset directory, no domains, or (registered datasets)
            a sub-directory that is not one of the dataset's domains.
    """
    if not root.is_dir():
        layout = (
            f"{root}/<domain>/<class>/<image>, domains {', '.join(spec.domains)}"
            if spec.domains
            else f"{root}/<domain>/<class>/<image>"
        )
        raise DomainGradError(
            f"{spec.name}: no directory {root}; expected {layout}. Point --data-dir at the "
            f"directory holding {root.name}/"
        )
    present = [p.name for p in _subdirs(root, f"{spec.name} dataset directory")]
    if spec.domains is None:
        if not present:
            raise DomainGradError(f"{spec.name}: {root} has no domain sub-directories")
        return [root / name for name in present], []
    unknown = [name for name in present if name not in spec.domains]
    if unknown:
        raise DomainGradError(
            f"{spec.name}: {root} holds directories that are not {spec.name} domains: {', '.join(unknown)}; "
            f"expected some of {', '.join(spec.domains)} (DomainBed's names). Rename them, or load the folder "
            f"as your own dataset with --dataset folder:{root}"
        )
    domains = [name for name in spec.domains if name in present]
    if not domains:
        raise DomainGradError(f"{spec.name}: {root} holds none of the domains {', '.join(spec.domains)}")
    missing = [name for name in spec.domains if name not in present]
    report = (
        [
            f"{spec.name}: domain(s) {', '.join(missing)} not found in {root}; environments are "
            f"{', '.join(f'{i}={n}' for i, n in enumerate(domains))}"
        ]
        if missing
        else []
    )
    return [root / name for name in domains], report


def read_class_map(path: str | Path | None) -> dict[str, str]:
    """The class-name mapping file (see the module docstring); {} for None.

    Raises:
        DomainGradError: unreadable file, or not a JSON object of strings.
    """
    if path is None:
        return {}
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DomainGradError(f"--class-map {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise DomainGradError(
            f'--class-map {path}: expected a JSON object of strings such as {{"caltech/hund": "dog", "vogel": "bird"}}'
        )
    return mapping


@dataclass
class ClassIndex:
    """Classes matched across domains.

    Attributes:
        names: canonical class names, sorted; label i is ``names[i]``.
        label_of: per domain, class folder name -> label.
        report: lines for the run's log (classes missing from a domain).
    """

    names: list[str]
    label_of: dict[str, dict[str, int]]
    report: list[str]


def match_classes(domains: list[DomainImages], mapping: dict[str, str], dataset: str) -> ClassIndex:
    """Match class folders by (canonical) name across domains into one index.

    Raises:
        DomainGradError: class folders found in only one of several domains and not named
            by ``mapping`` (listing them and the classes of the other domains), or mapping
            entries that match no folder.
    """
    used: set[str] = set()

    def canonical(domain: str, folder: str) -> tuple[str, bool]:
        for key in (f"{domain}/{folder}", folder):
            if key in mapping:
                used.add(key)
                return mapping[key], True
        return folder, False

    canon = {d.name: {folder: canonical(d.name, folder) for folder in d.classes} for d in domains}
    holders: dict[str, set[str]] = {}
    for domain, folders in canon.items():
        for name, _ in folders.values():
            holders.setdefault(name, set()).add(domain)
    unused = sorted(set(mapping) - used)
    if unused:
        raise DomainGradError(
            f"{dataset}: --class-map entries match no class folder: {', '.join(unused)}; keys "
            f"are 'classfolder' or 'domain/classfolder' with the folder names on disk"
        )
    if len(domains) > 1:
        lonely = sorted(
            f"{domain}/{folder}"
            for domain, folders in canon.items()
            for folder, (name, mapped) in folders.items()
            if len(holders[name]) == 1 and not mapped
        )
        if lonely:
            raise DomainGradError(
                f"{dataset}: class folders do not match across domains; found in one domain only: "
                f"{', '.join(lonely)}. Classes are matched by folder name. Rename the folders, or pass "
                f"--class-map FILE with a JSON object mapping 'classfolder' or 'domain/classfolder' to one "
                f'class name, e.g. {{"{lonely[0]}": "<class name>"}} (a folder mapped to its own name is '
                f"accepted as a class present in that domain only)."
            )
    names = sorted(holders)
    label = {name: i for i, name in enumerate(names)}
    report = [
        f"{dataset}: domain {d.name} has no images of class(es) "
        f"{', '.join(n for n in names if d.name not in holders[n])}"
        for d in domains
        if any(d.name not in holders[n] for n in names)
    ]
    return ClassIndex(
        names,
        {domain: {folder: label[name] for folder, (name, _) in folders.items()} for domain, folders in canon.items()},
        report,
    )


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None if it can.

    Reads the header with PIL (and ``verify()``, a full check for PNG); a JPEG file
    without the end-of-image marker is decoded in full, which catches truncated files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.verify()
            if path.suffix.lower() in (".jpg", ".jpeg"):
                with open(path, "rb") as handle:
                    handle.seek(-2, 2)
                    if handle.read(2) != b"\xff\xd9":
                        with Image.open(path) as image:
                            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


#: below this many files the check runs in the calling process
PARALLEL_CHECK_MIN = 4096


def check_images(paths: list[Path], policy: str, dataset: str, workers: int = 0) -> tuple[set[Path], list[str]]:
    """Check every file (:func:`image_problem`, about 0.1-0.3 ms per file measured on
    one core); returns (bad paths, report lines). With ``workers`` > 1 and many files
    the check is spread over that many processes.

    Raises:
        DomainGradError: unknown policy, or bad files under the ``error`` policy
            (listing them and how to skip them).
    """
    if policy not in CORRUPT_POLICIES:
        raise DomainGradError(f"--corrupt-images must be one of {', '.join(CORRUPT_POLICIES)}, got {policy!r}")
    if workers > 1 and len(paths) >= PARALLEL_CHECK_MIN:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            found = list(pool.map(image_problem, paths, chunksize=512))
    else:
        found = [image_problem(p) for p in paths]
    problems = {p: why for p, why in zip(paths, found) if why is not None}
    if not problems:
        return set(), []
    listing = "; ".join(f"{p} ({why})" for p, why in list(problems.items())[:20])
    more = f" and {len(problems) - 20} more" if len(problems) > 20 else ""
    if policy == "error":
        raise DomainGradError(
            f"{dataset}: {len(problems)} unreadable or corrupt image file(s): {listing}{more}. "
            f"Remove or replace them, or pass --corrupt-images skip to leave them out."
        )
    return set(problems), [f"{dataset}: skipped {len(problems)} unreadable or corrupt image file(s): {listing}{more}"]
