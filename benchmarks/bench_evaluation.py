"""Evaluation throughput: domaingrad's default batch size against DomainBed's loop.

For each backbone, times one evaluation pass (images/s, ``domaingrad.run.evaluation
.accuracy``) over a split of ``--images`` inputs at fixed batch sizes and at the default
``--eval-batch-size auto`` resolves to on this device, beside DomainBed's evaluation loop
written out as its ``train.py`` and ``misc.accuracy`` run it (batches of 64 from a
``FastDataLoader``, ``algorithm.predict`` under ``no_grad``, argmax against the labels),
or DomainBed's own ``misc.accuracy`` from a checkout given with ``--domainbed``. Passes
are interleaved round-robin (one warm-up round), medians of ``--repeats`` rounds.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_evaluation.py --backbones MNIST_CNN --images 4096
    .venv/bin/python benchmarks/bench_evaluation.py --backbones resnet18 --images 256 --sizes 16 32 64

``--clock thread`` times the CPU time of the calling thread (steadier on a shared
machine; set ``OMP_WAIT_POLICY=PASSIVE`` with several threads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from domaingrad.data import Split, TensorEnvironment
from domaingrad.registry import create_algorithm
from domaingrad.run.evaluation import accuracy, auto_eval_batch_size

SHAPES = {
    "MNIST_CNN": ((2, 28, 28), {}),
    "resnet18": ((3, 224, 224), {"resnet18": True}),
    "resnet50": ((3, 224, 224), {}),
}


def domainbed_loop(algorithm, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """DomainBed's evaluation (``misc.accuracy`` over a loader of batch 64), written out."""
    correct = total = 0
    algorithm.eval()
    with torch.no_grad():
        for start in range(0, len(y), 64):
            xb, yb = x[start : start + 64].to(device), y[start : start + 64].to(device)
            p = algorithm.predict(xb)
            correct += (p.gt(0).eq(yb).float() if p.size(1) == 1 else p.argmax(1).eq(yb).float()).sum().item()
            total += len(xb)
    algorithm.train()
    return correct / total


def bench_backbone(
    backbone: str, args: argparse.Namespace, device: torch.device, clock: Callable[[], float], db_accuracy
) -> None:
    """Print the table rows of one backbone."""
    shape, hp = SHAPES[backbone]
    torch.manual_seed(0)
    algorithm = create_algorithm("ERM", shape, 2, 2, hp).to(device)
    x = torch.randn(args.images, *shape)
    y = torch.randint(0, 2, (args.images,))
    split = Split(TensorEnvironment("bench", x, y), torch.arange(args.images))
    auto = auto_eval_batch_size(algorithm, device)
    passes: dict[str, Callable[[], float]] = {"DomainBed loop|64": lambda: domainbed_loop(algorithm, x, y, device)}
    if db_accuracy is not None:
        loader = [(x[s : s + 64], y[s : s + 64]) for s in range(0, args.images, 64)]
        passes["DomainBed misc.accuracy|64"] = lambda: db_accuracy(algorithm, loader, None, device)
    for size in args.sizes:
        passes[f"domaingrad fixed|{size}"] = lambda size=size: accuracy(algorithm, split, size, device)
    passes[f"domaingrad default (auto)|{auto}"] = lambda: accuracy(algorithm, split, auto, device)
    times: dict[str, list[float]] = {name: [] for name in passes}
    names = list(passes)
    for r in range(args.repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            passes[name]()
            if r:
                times[name].append(clock() - start)
    base = args.images / statistics.median(times["DomainBed loop|64"])
    for name in names:
        label, size_text = name.split("|")
        rate = args.images / statistics.median(times[name])
        print(f"| {backbone} | {label} | {size_text} | {rate:.0f} | {rate / base:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["MNIST_CNN"], choices=sorted(SHAPES))
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--domainbed", default=None, help="a DomainBed checkout: time its misc.accuracy too")
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    device = torch.device(args.device)
    db_accuracy = None
    if args.domainbed:
        sys.path.insert(0, args.domainbed)
        from domainbed.lib import misc  # type: ignore[import-not-found]

        db_accuracy = misc.accuracy
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.clock} clock, "
        f"{args.images} images, median of {args.repeats} round-robin rounds after a warm-up"
    )
    print("\n| backbone | evaluation | batch | images/s | x DomainBed |\n|---|---|---|---|---|")
    for backbone in args.backbones:
        bench_backbone(backbone, args, device, clock, db_accuracy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
