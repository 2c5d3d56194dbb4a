#!/usr/bin/env python3
"""Check and time domaingrad's CUDA path: a few training steps of each method family.

On a machine with CUDA, for ERM, PCGrad, CorGrad, Fishr, DMG and GSNRDropBlock, on
Colored MNIST (the embedded digits, MNIST_CNN, two training environments) and on
random 224 px images with ResNet-18 (random weights, three training domains, seven
classes: PACS's shape), with ``--amp off`` and ``bf16`` (and ``fp16`` where the
algorithm supports it):

* the median step time (ms, after warm-up steps, CUDA synchronised), its ratio to
  ERM's under the same precision, and the peak CUDA memory (GiB);
* the agreement of CPU and CUDA: the same algorithm from the same initial weights,
  fed the same minibatches, for ``--agree-steps`` float32 steps on each device; the
  largest parameter difference relative to the parameter's scale.

Usage::

    python scripts/gpu_check.py                 # everything, about 2-4 minutes on one GPU
    python scripts/gpu_check.py --steps 5 --algorithms ERM PCGrad --datasets ColoredMNIST

Without CUDA it prints why and exits with status 3 (nothing is timed on the CPU).
Writes nothing; copy its output into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from domaingrad import precision
from domaingrad.registry import create_algorithm

ALGORITHMS = ("ERM", "PCGrad", "CorGrad", "Fishr", "DMG", "GSNRDropBlock")
DATASETS = ("ColoredMNIST", "ResNet18-224")
NO_CUDA_EXIT = 3


@dataclass
class Case:
    """One dataset's shapes and batches."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_domains: int
    batch_size: int
    hparams: dict


def case_of(name: str, batch_size: int | None) -> Case:
    if name == "ColoredMNIST":
        return Case(name, (2, 28, 28), 2, 2, batch_size or 64, {})
    if name == "ResNet18-224":
        return Case(name, (3, 224, 224), 7, 3, batch_size or 32, {"resnet18": True})
    raise SystemExit(f"gpu_check: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def minibatches(case: Case, count: int, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` steps of per-domain (x, y) batches on the CPU: real digits for Colored
    MNIST (its first training environments), seeded normal images for ResNet-18."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    if case.name == "ColoredMNIST":
        from domaingrad.data import get_dataset

        data = get_dataset("ColoredMNIST")
        envs = [data[i] for i in range(case.num_domains)]
        for _ in range(count):
            step = []
            for env in envs:
                idx = torch.randint(len(env), (case.batch_size,), generator=g)
                x, y = next(env.batches(idx, case.batch_size))
                step.append((x.clone(), y.clone()))
            steps.append(step)
        return steps
    for _ in range(count):
        steps.append(
            [
                (
                    torch.randn(case.batch_size, *case.input_shape, generator=g),
                    torch.randint(case.num_classes, (case.batch_size,), generator=g),
                )
                for _ in range(case.num_domains)
            ]
        )
    return steps


def build(name: str, case: Case, device: torch.device, seed: int, amp: str, dtype=torch.float32):
    torch.manual_seed(seed)
    algorithm = create_algorithm(name, case.input_shape, case.num_classes, case.num_domains, case.hparams)
    algorithm.total_steps = 1000
    algorithm = algorithm.to(device=device, dtype=dtype)
    algorithm.grad_scaler = precision.grad_scaler(device, amp)
    return algorithm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")


def time_steps(name: str, case: Case, amp: str, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median ms per step and peak GiB of ``steps`` timed steps after ``warmup``."""
    algorithm = build(name, case, device, 0, amp)
    channels_last = precision.use_channels_last("auto", device, case.input_shape)
    if channels_last:
        algorithm = algorithm.to(memory_format=torch.channels_last)
    batches = [
        [(precision.to_memory_format(x.to(device), channels_last), y.to(device)) for x, y in step]
        for step in minibatches(case, min(steps + warmup, 8), seed=1)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + warmup):
        _sync(device)
        start = time.perf_counter()
        with precision.autocast(device, amp):
            algorithm.update(batches[i % len(batches)])
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), _peak_gib(device)


def agreement(name: str, case: Case, steps: int, device: torch.device) -> float:
    """Largest |p_cpu - p_cuda| / (max |p_cpu| + 1e-12) over the parameters after
    ``steps`` float32 steps from the same weights on the same minibatches; 0 would be
    bitwise agreement (not expected: the kernels differ)."""
    batches = minibatches(case, steps, seed=2)
    results = []
    for dev in (torch.device("cpu"), device):
        algorithm = build(name, case, dev, 0, "off")
        torch.manual_seed(3)  # the same stream for methods that draw (PCGrad's order, ...)
        for step in batches:
            algorithm.update([(x.to(dev), y.to(dev)) for x, y in step])
        results.append([p.detach().cpu().clone() for p in algorithm.parameters()])
    return max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(*results, strict=True) if a.numel())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--agree-steps", type=int, default=3, help="CPU vs CUDA steps (default 3; 0 skips)")
    parser.add_argument("--batch-size", type=int, default=None, help="per domain (default 64 / 32)")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the same loops on the CPU (a test of this script, not a measurement)",
    )
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.device = "cpu"
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run this on a machine "
            "with an NVIDIA GPU and a CUDA build of torch; nothing was timed.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run, not a measurement"
    print(f"# gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {where}")
    print(f"# {args.steps} timed steps after {args.warmup}, median ms; ratio to ERM under the same precision")
    print()
    print("| dataset | algorithm | amp | ms/step | x ERM | peak GiB | CPU vs CUDA (rel.) |")
    print("|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for dataset in args.datasets:
        case = case_of(dataset, args.batch_size)
        erm_ms: dict[str, float] = {}
        for name in args.algorithms:
            cls = type(create_algorithm(name, (2, 28, 28), 2, 2))
            modes = ["off", "bf16"] + (["fp16"] if cls.fp16_ready() else [])
            agree = agreement(name, case, args.agree_steps, device) if args.agree_steps else float("nan")
            for amp in modes:
                ms, peak = time_steps(name, case, amp, args.steps, args.warmup, device)
                if name == "ERM":
                    erm_ms[amp] = ms
                ratio = ms / erm_ms[amp] if amp in erm_ms else float("nan")
                shown = f"{agree:.1e}" if amp == "off" else ""
                print(f"| {dataset} | {name} | {amp} | {ms:.1f} | {ratio:.2f} | {peak:.2f} | {shown} |", flush=True)
    print(f"\n# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
