#!/usr/bin/env python3
"""Sweep throughput (jobs per minute) with 1 and 2 local workers and with Ray, and Ray's
overhead per job.

Throughput: the same sweep (ColoredMNIST, ERM, every test environment alone,
``--n-hparams`` draws, one trial, short runs) is launched into a fresh directory with
``--launcher local --workers 1``, ``--workers 2`` and ``--launcher ray --workers 2``
(Ray started by the launch, its start-up included), timing the whole ``domaingrad sweep
launch``. The results.jsonl records of the three sweeps are compared (without timing
keys) to confirm the launchers agree.

Overhead: N trivial jobs (job directories already holding ``done``, so each job process
starts, takes the job's lock, sees ``done`` and exits) are run through the local
launcher and through Ray on an already started instance; the per-job difference is
Ray's scheduling overhead. Ray's start-up (``ray.init``) is timed on its own.

Usage:
    python benchmarks/bench_sweep.py --n-hparams 2 --steps 11 --trivial-jobs 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import struct
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data_dir(root: Path, n_digits: int) -> Path:
    """An MNIST IDX folder of ``n_digits`` of the embedded digits (as the tests' fixture)."""
    from domaingrad.data.digits import load_embedded_mnist

    pool = load_embedded_mnist()
    pick = np.random.RandomState(0).permutation(len(pool.images))[:n_digits]
    images, labels = pool.images.numpy()[pick], pool.labels.numpy()[pick].astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n_train = n_digits * 5 // 6
    for name, array in (
        ("train-images-idx3-ubyte", images[:n_train]),
        ("train-labels-idx1-ubyte", labels[:n_train]),
        ("t10k-images-idx3-ubyte", images[n_train:]),
        ("t10k-labels-idx1-ubyte", labels[n_train:]),
    ):
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
        (raw / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return root


def launch(sweep: Path, flags: list[str]) -> float:
    """Wall seconds of ``domaingrad sweep launch`` (in this process; output swallowed)."""
    from domaingrad import cli

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["sweep", "launch", "--output-dir", str(sweep), "--skip-confirmation", "--no-progress", *flags])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"launch failed ({code}):\n{out.getvalue()}")
    return seconds


def records(sweep: Path) -> dict[str, list[dict]]:
    from domaingrad.sweep.manifest import manifest_jobs

    result = {}
    for job in manifest_jobs(sweep):
        rows = [json.loads(line) for line in (sweep / job.id / "results.jsonl").read_text().splitlines()]
        for row in rows:
            for key in [k for k in row if "time" in k]:
                del row[key]
            del row["args"]["output_dir"]
        result[job.id] = rows
    return result


def trivial_jobs(root: Path, n: int):
    """``n`` jobs whose directories already hold ``done``."""
    from domaingrad.sweep.jobs import SweepSpec, make_jobs

    jobs = make_jobs(
        SweepSpec(("ColoredMNIST",), ("ERM",), single_test_envs=True, hparams_seeds=tuple(range(n)), n_trials=1), root
    )[:n]
    for job in jobs:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "done").write_text("done")
    return jobs


def overhead(root: Path, n: int) -> dict[str, float]:
    """Seconds per trivial job through the local launcher (1 and 2 workers) and Ray (2 CPUs)."""
    import ray

    from domaingrad.sweep.launchers.base import LaunchOptions
    from domaingrad.sweep.launchers.local import launch_local
    from domaingrad.sweep.launchers.ray import launch_ray
    from domaingrad.sweep.progress import SweepProgress

    jobs = trivial_jobs(root, n)
    result = {}
    for workers in (1, 2):
        start = time.perf_counter()
        outcomes = launch_local(jobs, LaunchOptions(1, workers), SweepProgress(n, io.StringIO(), bar=False))
        result[f"local {workers} worker(s), s/job"] = (time.perf_counter() - start) / n
        assert all(o.done for o in outcomes)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    result["ray.init (local instance, 2 CPUs), s"] = time.perf_counter() - start
    try:
        for _ in range(2):  # the first pass also starts Ray's worker processes
            start = time.perf_counter()
            outcomes = launch_ray(jobs, LaunchOptions(1, 2), SweepProgress(n, io.StringIO(), bar=False))
            seconds = (time.perf_counter() - start) / n
            assert all(o.done for o in outcomes)
        result["ray 2 CPUs (second pass), s/job"] = seconds
    finally:
        ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-hparams", type=int, default=2, help="draws per test env (jobs = 3 x this)")
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--checkpoint-freq", type=int, default=5)
    parser.add_argument("--digits", type=int, default=1200, help="digits in the data folder")
    parser.add_argument("--trivial-jobs", type=int, default=20)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    data = make_data_dir(root / "data", args.digits)
    flags = [
        "--datasets",
        "ColoredMNIST",
        "--algorithms",
        "ERM",
        "--single-test-envs",
        "--n-hparams",
        str(args.n_hparams),
        "--n-trials",
        "1",
        "--steps",
        str(args.steps),
        "--checkpoint-freq",
        str(args.checkpoint_freq),
        "--data-dir",
        str(data),
    ]
    n_jobs = 3 * args.n_hparams
    configs = {
        "local, 1 worker": ["--launcher", "local", "--workers", "1"],
        "local, 2 workers": ["--launcher", "local", "--workers", "2"],
        "ray, 2 CPUs (start-up included)": ["--launcher", "ray", "--workers", "2"],
    }
    print(
        f"{n_jobs} jobs: ColoredMNIST ERM, {args.steps} steps, checkpoint every {args.checkpoint_freq}, "
        f"{args.digits} digits, 1 thread per job\n"
    )
    print("| launcher | wall s | jobs per minute |\n| --- | ---: | ---: |")
    results = {}
    for i, (name, extra) in enumerate(configs.items()):
        sweep = root / f"sweep{i}"
        seconds = launch(sweep, flags + extra)
        results[name] = records(sweep)
        print(f"| {name} | {seconds:.1f} | {n_jobs / seconds * 60:.1f} |", flush=True)
    first = next(iter(results.values()))
    print(f"\nidentical results.jsonl records (timing keys aside): {all(r == first for r in results.values())}")
    print(f"\n{args.trivial_jobs} trivial jobs (already done):\n")
    print("| measure | seconds |\n| --- | ---: |")
    for name, value in overhead(root / "trivial", args.trivial_jobs).items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
