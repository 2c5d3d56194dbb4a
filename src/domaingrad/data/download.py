"""``domaingrad download DATASET --data-dir D``: fetch a dataset and lay it out as
DomainBed's ``domainbed/scripts/download.py`` does (Gulrajani and Lopez-Paz, "In Search
of Lost Domain Generalization", ICLR 2021), so the loaders of :mod:`domaingrad.data`
find it under ``--data-dir D``.

Per dataset (DomainBed's URLs; checksums where they are known):

- MNIST (for ColoredMNIST, RotatedMNIST): torchvision's four IDX files with their MD5
  sums, into ``D/MNIST/raw/`` (where both DomainBed's and domaingrad's loaders read them;
  DomainBed's download script stages them one level deeper, ``D/MNIST/MNIST/raw``).
- VLCS: ``VLCS.tar.gz`` unpacked into ``D`` (giving ``D/VLCS/``).
- PACS: ``PACS.zip`` unpacked into ``D``, then ``D/kfold`` renamed ``D/PACS``.
- OfficeHome: ``office_home.zip``, ``D/OfficeHomeDataset_10072016`` renamed ``D/office_home``.
- DomainNet: the six domain zips unpacked into ``D/domain_net/``, then the files of
  DomainBed's duplicate list (``domainbed/misc/domain_net_duplicates.txt``, fetched from
  DomainBed's repository at a fixed commit, SHA-256 checked) deleted.
- TerraIncognita: the Caltech Camera Traps images and annotations unpacked into
  ``D/terra_incognita/``; every image of locations 38, 43, 46 and 100 with an annotation
  of one of the ten classes (bird, bobcat, cat, coyote, dog, empty, opossum, rabbit,
  raccoon, squirrel) copied to ``location_<L>/<class>/``; then the unpacked folders deleted.
- SVIRO: the DomainBed release zip, then ``D/SVIRO_DOMAINBED`` renamed ``D/sviro``.
- Spawrious (every SpawriousO2O_* / SpawriousM2M_* name): ``spawrious.tar.gz``
  unpacked into ``D`` (giving ``D/spawrious224/``).
- WILDSCamelyon, WILDSFMoW: through the ``wilds`` package (``pip install wilds``), as
  DomainBed does (``Camelyon17Dataset(root_dir=D, download=True)``).

Offline machines: each file is fetched once, with a short timeout and no retries; when
that fails the error names the URL and the path where to put the file by hand. A file
already at that path is used instead of downloading (its checksum checked when known,
a mismatch refused), then unpacked. As DomainBed, archives are deleted once unpacked
(``--keep-archives`` keeps them). Archives are unpacked with :mod:`tarfile`'s ``data``
filter and zip member checks: nothing is written outside ``D``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DomainGradError
from .spawrious import SPAWRIOUS_SETTINGS
from .wilds import WILDSCamelyon, WILDSDataset, WILDSFMoW, import_wilds_class

#: seconds to wait for a server before giving up (no retries)
DEFAULT_TIMEOUT = 10.0
#: DomainBed's commit whose ``domain_net_duplicates.txt`` is fetched
DOMAINBED_COMMIT = "b93c22a1cfc3b2428398272c1a116c8de1f4139e"


@dataclass(frozen=True)
class Source:
    """One file to fetch.

    Attributes:
        url: where DomainBed fetches it.
        path: where it goes, relative to ``--data-dir``.
        sha256, md5: hex digests when known (checked; a mismatch is refused).
        unpack: unpack it (zip, tar, tar.gz) into its own directory (then delete it).
        temporary: not an archive, but deleted once the dataset is laid out (DomainNet's
            duplicate list).
    """

    url: str
    path: str
    sha256: str | None = None
    md5: str | None = None
    unpack: bool = True
    temporary: bool = False


@dataclass(frozen=True)
class Recipe:
    """How to fetch one dataset.

    Attributes:
        name: the download's name (``domaingrad download NAME``).
        directory: the dataset directory it produces, relative to ``--data-dir``.
        sources: the files, fetched and unpacked in order.
        finish: the step after unpacking (renames, deletions, re-layout): called with
            the data directory, returns lines to print.
    """

    name: str
    directory: str
    sources: tuple[Source, ...]
    finish: Callable[[Path], list[str]] | None = None


def _rename(data_dir: Path, old: str, new: str) -> list[str]:
    """DomainBed's ``os.rename(D/old, D/new)`` (an empty ``D/new`` is replaced).

    Raises:
        DomainGradError: ``D/old`` is missing, or ``D/new`` exists and is not empty.
    """
    src, dst = data_dir / old, data_dir / new
    if not src.is_dir():
        raise DomainGradError(
            f"the archive did not unpack to {src}, which DomainBed renames to {dst}: is it the right file? "
            f"Delete what it unpacked and download it again"
        )
    if dst.exists():
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            raise DomainGradError(f"{dst} exists and is not empty; move it away to rename {src} to it")
    src.rename(dst)
    return [f"renamed {src} -> {dst}"]


def _remove_domainnet_duplicates(data_dir: Path) -> list[str]:
    """Delete the files DomainBed's duplicate list names (paths relative to
    ``D/domain_net``; missing ones are skipped, as DomainBed's ``except OSError: pass``)."""
    root = data_dir / "domain_net"
    listing = root / "domain_net_duplicates.txt"
    removed = 0
    for line in listing.read_text().splitlines():
        target = root / line.strip()
        if line.strip() and target.is_file():
            target.unlink()
            removed += 1
    return [f"removed {removed} duplicate image(s) listed in {listing.name}"]


#: TerraIncognita: DomainBed's locations (as strings) and classes
TERRA_LOCATIONS = ("38", "46", "100", "43")
TERRA_CATEGORIES = (
    "bird",
    "bobcat",
    "cat",
    "coyote",
    "dog",
    "empty",
    "opossum",
    "rabbit",
    "raccoon",
    "squirrel",
)
TERRA_ANNOTATIONS = ("cis_test", "cis_val", "train", "trans_test", "trans_val")


def _terra_incognita_layout(data_dir: Path) -> list[str]:
    """DomainBed's TerraIncognita re-layout: merge the five annotation files (their
    lists concatenated key by key), then copy every image of an included location to
    ``location_<L>/<category>/<file name>`` once per annotation of an included category;
    then delete the unpacked image and annotation folders.

    Raises:
        DomainGradError: an annotation file or image is missing.
    """
    root = data_dir / "terra_incognita"
    images = root / "eccv_18_all_images_sm"
    annotations = root / "eccv_18_annotation_files"
    data: dict[str, list] = defaultdict(list)
    for stem in TERRA_ANNOTATIONS:
        path = annotations / f"{stem}_annotations.json"
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DomainGradError(
                f"TerraIncognita: cannot read {path} ({exc}); download the annotations again"
            ) from exc
        for key, value in content.items():
            data[key].extend(value)
    category = {item["id"]: item["name"] for item in data["categories"]}
    by_image: dict[object, list[dict]] = defaultdict(list)
    for annotation in data["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    copied = 0
    for image in data["images"]:
        location = str(image["location"])
        if location not in TERRA_LOCATIONS:
            continue
        folder = root / f"location_{location}"
        folder.mkdir(exist_ok=True)
        for annotation in by_image.get(image["id"], []):
            name = category[annotation["category_id"]]
            if name not in TERRA_CATEGORIES:
                continue
            target = folder / name / image["file_name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = images / image["file_name"]
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise DomainGradError(
                    f"TerraIncognita: cannot copy {source} ({exc}); download the images again"
                ) from exc
            copied += 1
    shutil.rmtree(images)
    shutil.rmtree(annotations)
    return [f"copied {copied} image(s) into {root}/location_<L>/<class>/"]


def _gdrive(file_id: str) -> str:
    return f"https://drive.google.com/uc?id={file_id}"


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_DOMAINNET = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
_LILA = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/"

#: download name -> recipe (DomainBed's ``download_<name>`` functions)
RECIPES: dict[str, Recipe] = {
    "MNIST": Recipe(
        "MNIST",
        "MNIST/raw",
        tuple(
            Source(_MNIST + name, f"MNIST/raw/{name}", md5=md5, unpack=False)
            for name, md5 in (
                ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
            )
        ),
    ),
    "VLCS": Recipe("VLCS", "VLCS", (Source(_gdrive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), "VLCS.tar.gz"),)),
    "PACS": Recipe(
        "PACS",
        "PACS",
        (Source(_gdrive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), "PACS.zip"),),
        lambda d: _rename(d, "kfold", "PACS"),
    ),
    "OfficeHome": Recipe(
        "OfficeHome",
        "office_home",
        (Source(_gdrive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), "office_home.zip"),),
        lambda d: _rename(d, "OfficeHomeDataset_10072016", "office_home"),
    ),
    "DomainNet": Recipe(
        "DomainNet",
        "domain_net",
        tuple(
            Source(_DOMAINNET + part, f"domain_net/{part.rsplit('/', 1)[-1]}")
            for part in (
                "groundtruth/clipart.zip",
                "infograph.zip",
                "groundtruth/painting.zip",
                "quickdraw.zip",
                "real.zip",
                "sketch.zip",
            )
        )
        + (
            Source(
                f"https://raw.githubusercontent.com/facebookresearch/DomainBed/{DOMAINBED_COMMIT}/domainbed/misc/"
                "domain_net_duplicates.txt",
                "domain_net/domain_net_duplicates.txt",
                sha256="a52b4ab70203f4f3df381077694dba3e33ff44c26407e1c5faca76919c702770",
                unpack=False,
                temporary=True,
            ),
        ),
        _remove_domainnet_duplicates,
    ),
    "TerraIncognita": Recipe(
        "TerraIncognita",
        "terra_incognita",
        (
            Source(_LILA + "eccv_18_all_images_sm.tar.gz", "terra_incognita/terra_incognita_images.tar.gz"),
            Source(_LILA + "eccv_18_annotations.tar.gz", "terra_incognita/eccv_18_annotations.tar.gz"),
        ),
        _terra_incognita_layout,
    ),
    "SVIRO": Recipe(
        "SVIRO",
        "sviro",
        (Source("https://sviro.kl.dfki.de/?wpdmdl=1731", "sviro_grayscale_rectangle_classification.zip"),),
        lambda d: _rename(d, "SVIRO_DOMAINBED", "sviro"),
    ),
    "Spawrious": Recipe(
        "Spawrious",
        "spawrious224",
        (Source("https://www.dropbox.com/s/e40j553480h3f3s/spawrious224.tar.gz?dl=1", "spawrious.tar.gz"),),
    ),
}

#: dataset names that download another one's files
ALIASES = {
    "ColoredMNIST": "MNIST",
    "RotatedMNIST": "MNIST",
    **{name: "Spawrious" for name in SPAWRIOUS_SETTINGS},
}
#: the WILDS datasets, downloaded by the wilds package
WILDS_DATASETS: dict[str, type[WILDSDataset]] = {"WILDSCamelyon": WILDSCamelyon, "WILDSFMoW": WILDSFMoW}
#: datasets without files
NOTHING_TO_DOWNLOAD = ("Debug28", "Debug224")


def download_names() -> list[str]:
    """Every name ``domaingrad download`` accepts."""
    return [*RECIPES, *ALIASES, *WILDS_DATASETS]


def _canonical(name: str) -> str:
    names = download_names()
    if name in names:
        return name
    by_case = [n for n in names if n.lower() == name.lower()]
    if len(by_case) == 1:
        return by_case[0]
    if name in NOTHING_TO_DOWNLOAD or name.lower() in (n.lower() for n in NOTHING_TO_DOWNLOAD):
        raise DomainGradError(f"{name} is made of random tensors: there is nothing to download")
    raise DomainGradError(
        f"no download known for {name!r}; valid names: {', '.join(names)}. Other datasets (Fashion-MNIST, "
        f"DigitsDG, your own folders) are placed by hand: see docs/data.md"
    )


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def check_file(path: Path, source: Source) -> None:
    """Check ``path`` against the checksums of ``source`` (nothing when none is known).

    Raises:
        DomainGradError: a mismatch, giving both digests and what to do.
    """
    for algorithm, expected in (("sha256", source.sha256), ("md5", source.md5)):
        if expected is None:
            continue
        found = _digest(path, algorithm)
        if found != expected.lower():
            raise DomainGradError(
                f"{path} has {algorithm} {found}, expected {expected} ({source.url}): it is damaged, incomplete "
                f"or another file. Delete it and download it again (or place the right file there)"
            )


def fetch(source: Source, data_dir: Path, timeout: float = DEFAULT_TIMEOUT, say: Callable[[str], None] = print) -> Path:
    """The file of ``source`` at ``data_dir/source.path``: used as it is when present
    (placed by hand, or left by an earlier run), else downloaded once with ``timeout``
    seconds to wait for the server, no retries; checked against its checksums.

    Raises:
        DomainGradError: the download fails (naming the URL and where to put the file
            by hand), or the checksum does not match.
    """
    target = data_dir / source.path
    if target.is_file():
        say(f"using {target} (already there)")
        check_file(target, source)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    say(f"downloading {source.url} -> {target}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DomainGradError(
            f"cannot download {source.url} ({type(exc).__name__}: {reason}; after {time.monotonic() - started:.1f} s, "
            f"no retry): this machine may be offline. Download that URL on a machine with internet access and put "
            f"the file at {target}, then run the same `domaingrad download` command again: it uses the file there"
        ) from exc
    partial.rename(target)
    check_file(target, source)
    return target


def _inside(root: Path, name: str) -> bool:
    resolved = (root / name).resolve()
    return resolved == root or root in resolved.parents


def unpack(archive: Path) -> Path:
    """Unpack a ``.zip``, ``.tar`` or ``.tar.gz`` archive into its own directory
    (DomainBed's ``extractall(os.path.dirname(dst))``); returns that directory.

    Raises:
        DomainGradError: not a readable archive (e.g. a web page saved in its place), or
            members that would land outside the directory.
    """
    root = archive.parent.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = [n for n in zf.namelist() if not _inside(root, n)]
                if bad:
                    raise DomainGradError(f"{archive}: members outside {root}: {', '.join(bad[:5])}; not unpacked")
                zf.extractall(root)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(root, filter="data")
        else:
            raise DomainGradError(
                f"{archive} is not a zip or tar archive (a web page saved in its place, e.g. a Google Drive "
                f"confirmation page?); delete it, download the file with a browser and put it there"
            )
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DomainGradError(
            f"cannot unpack {archive} ({type(exc).__name__}: {exc}); delete it and download it again"
        ) from exc
    return root


def _download_wilds(name: str, data_dir: Path, timeout: float, say: Callable[[str], None]) -> Path:
    cls = WILDS_DATASETS[name]
    wilds_class = import_wilds_class(cls.WILDS_MODULE, cls.WILDS_CLASS, name)
    versions = getattr(wilds_class, "_versions_dict", None) or {}
    urls = [v.get("download_url") for v in versions.values() if isinstance(v, dict) and v.get("download_url")]
    where = f" (its archive: {urls[-1]})" if urls else ""
    say(f"{name}: wilds downloads into {data_dir / cls.WILDS_DIR}{where}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        wilds_class(root_dir=str(data_dir), download=True)
    except Exception as exc:  # noqa: BLE001 - wilds and its download helpers raise many types
        raise DomainGradError(
            f"wilds could not download {name} ({type(exc).__name__}: {exc}){where}. On an offline machine, "
            f"download and unpack it elsewhere and put the folder at {data_dir / cls.WILDS_DIR} (with its "
            f"RELEASE_v*.txt file)"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return data_dir / cls.WILDS_DIR


def download(
    name: str,
    data_dir: str | Path,
    timeout: float = DEFAULT_TIMEOUT,
    keep_archives: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Fetch dataset ``name`` into ``data_dir`` as DomainBed's download script lays it
    out (see the module docstring); returns the dataset directory.

    A dataset directory that already exists, with no archive left to unpack, is taken
    as done (nothing is fetched again).

    Args:
        name: a dataset name (case-insensitive): MNIST, ColoredMNIST, RotatedMNIST,
            VLCS, PACS, OfficeHome, DomainNet, TerraIncognita, SVIRO, Spawrious (or any
            Spawrious benchmark), WILDSCamelyon, WILDSFMoW.
        data_dir: the ``--data-dir`` directory (created if missing).
        timeout: seconds to wait for a server (one try per file).
        keep_archives: keep the archives once unpacked (DomainBed deletes them).
        say: prints progress lines.

    Raises:
        DomainGradError: an unknown name, a failed download (naming the URL and where to
            put the file by hand), a checksum mismatch, an archive that does not unpack
            to DomainBed's layout, ``wilds`` not installed (WILDS datasets).
    """
    name = ALIASES.get(_canonical(name), _canonical(name))
    if timeout <= 0:
        raise DomainGradError(f"--timeout must be a positive number of seconds, got {timeout}")
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DomainGradError(f"--data-dir {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    if name in WILDS_DATASETS:
        return _download_wilds(name, root, timeout, say)
    recipe = RECIPES[name]
    target = root / recipe.directory
    archives = [s for s in recipe.sources if s.unpack]
    pending = [s for s in archives if (root / s.path).is_file()]
    if archives and not pending and target.is_dir() and any(target.iterdir()):
        say(f"{name}: {target} is already there; nothing to do (delete it to download again)")
        return target
    files = [fetch(source, root, timeout, say) for source in recipe.sources]
    for source, path in zip(recipe.sources, files):
        if source.unpack:
            say(f"unpacking {path}")
            unpack(path)
    for line in recipe.finish(root) if recipe.finish else []:
        say(line)
    if not keep_archives:
        for source, path in zip(recipe.sources, files):
            if source.unpack or source.temporary:
                path.unlink(missing_ok=True)
    say(f"{name}: done, {target}")
    return target


def run(ns: argparse.Namespace) -> int:
    """``domaingrad download DATASET --data-dir D [--keep-archives] [--timeout S]``."""
    download(ns.dataset, ns.data_dir, timeout=ns.timeout, keep_archives=ns.keep_archives)
    return 0
