#!/usr/bin/env python3
"""Median step time of the mask and dropout methods divided by ERM's, in one process.

Two settings, on synthetic tensors held in memory (the same minibatches for every
algorithm, so only the update is timed):

* ``resnet18``: ResNet-18 from random initialisation (DomainBed's featurizer with frozen
  BatchNorm, the default), PACS shapes at 64x64 (3x64x64, 7 classes), 3 training domains
  x ``--batch-size`` (default 32);
* ``mnist_cnn``: DomainBed's MNIST_CNN, ColoredMNIST shapes (2x28x28, 2 classes),
  2 training domains x 64.

Every algorithm uses its default hyperparameters (``hparams_seed`` 0). The algorithms
take turns step by step (round robin, rotating who goes first) so that machine noise
falls on all of them alike. Prints a Markdown table of median ms per step and the ratio
to ERM.

Usage:
    python benchmarks/bench_image_algorithms.py --settings resnet18 mnist_cnn \
        --algorithms ERM DMG RSC DropBlock GSNRDropBlock --steps 20
"""

from __future__ import annotations

import argparse

import torch
from _timing import round_robin_medians

from domaingrad.algorithms import algorithm_class
from domaingrad.registry import default_hparams

#: setting -> (dataset whose hparams are used, input shape, classes, domains, default batch, overrides)
SETTINGS = {
    "resnet18": ("PACS", (3, 64, 64), 7, 3, 32, {"resnet18": True}),
    "mnist_cnn": ("ColoredMNIST", (2, 28, 28), 2, 2, 64, {}),
}


def bench(
    setting: str, algorithms: list[str], steps: int, warmup: int, batch_size: int | None, num_batches: int = 4
) -> dict[str, float]:
    """Median seconds per ``update`` of each algorithm in ``setting``."""
    dataset, shape, num_classes, num_domains, default_batch, overrides = SETTINGS[setting]
    batch = batch_size or default_batch
    gen = torch.Generator().manual_seed(0)
    pool = [
        [
            (torch.randn(batch, *shape, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
            for _ in range(num_domains)
        ]
        for _ in range(num_batches)
    ]
    built = {}
    for name in algorithms:
        torch.manual_seed(0)
        hparams = {**default_hparams(name, dataset), **overrides, "batch_size": batch}
        built[name] = algorithm_class(name)(shape, num_classes, num_domains, hparams)
        built[name].total_steps = steps + warmup
    return round_robin_medians(built, lambda step: pool[step % num_batches], steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--algorithms", nargs="+", default=["ERM", "DMG", "RSC", "DropBlock", "GSNRDropBlock"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="per domain (default: 32 / 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "ERM" not in args.algorithms:
        args.algorithms.insert(0, "ERM")
    results = {s: bench(s, args.algorithms, args.steps, args.warmup, args.batch_size) for s in args.settings}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps "
        f"after {args.warmup} warm-up steps\n"
    )
    print("| algorithm | " + " | ".join(f"{s} ms | x ERM" for s in args.settings) + " |")
    print("| --- |" + " --- | --- |" * len(args.settings))
    for name in args.algorithms:
        cells = " | ".join(
            f"{results[s][name] * 1e3:.0f} | {results[s][name] / results[s]['ERM']:.2f}" for s in args.settings
        )
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
