#!/usr/bin/env python3
"""Median step time of each algorithm divided by ERM's, in one process.

For each dataset, every listed algorithm is built on the dataset's network (MNIST_CNN
for the MNIST family) with default hyperparameters, and its ``update`` is timed on the
same minibatches (one per training domain, drawn from memory). The algorithms take
turns step by step (round robin, rotating who goes first) so that machine noise falls
on all of them alike. Prints a Markdown table of median ms per step and the ratio to
ERM.

Usage:
    python benchmarks/bench_algorithms.py --datasets ColoredMNIST RotatedMNIST \
        --algorithms ERM AgrSum AgrRand PCGrad CorGrad ANDMask SANDMask --steps 30
"""

from __future__ import annotations

import argparse

import torch
from _timing import round_robin_medians

from domaingrad.algorithms import algorithm_class
from domaingrad.data import InfiniteMinibatches, get_dataset, split_environment
from domaingrad.registry import default_hparams

TEST_ENV = {"ColoredMNIST": 2, "RotatedMNIST": 0}


def bench(dataset_name: str, algorithms: list[str], steps: int, warmup: int) -> dict[str, float]:
    dataset = get_dataset(dataset_name)
    test_env = TEST_ENV.get(dataset_name, 0)
    splits = [split_environment(env, 0.2, 0, i)[1] for i, env in enumerate(dataset.environments) if i != test_env]
    built = {}
    for name in algorithms:
        torch.manual_seed(0)
        hparams = default_hparams(name, dataset_name)
        algo = algorithm_class(name)(dataset.input_shape, dataset.num_classes, len(splits), hparams)
        algo.total_steps = steps + warmup
        built[name] = algo
    stream = InfiniteMinibatches(splits, default_hparams("ERM", dataset_name)["batch_size"], seed=0)
    return round_robin_medians(built, lambda step: next(stream), steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ColoredMNIST", "RotatedMNIST"])
    parser.add_argument(
        "--algorithms", nargs="+", default=["ERM", "AgrSum", "AgrRand", "PCGrad", "CorGrad", "ANDMask", "SANDMask"]
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if "ERM" not in args.algorithms:
        args.algorithms.insert(0, "ERM")
    results = {d: bench(d, args.algorithms, args.steps, args.warmup) for d in args.datasets}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps\n")
    header = " | ".join(f"{d} ms | x ERM" for d in args.datasets)
    print(f"| algorithm | {header} |")
    print("| --- |" + " --- | --- |" * len(args.datasets))
    for name in args.algorithms:
        cells = " | ".join(
            f"{results[d][name] * 1e3:.0f} | {results[d][name] / results[d]['ERM']:.2f}" for d in args.datasets
        )
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
