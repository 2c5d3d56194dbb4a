#!/usr/bin/env python3
"""Wall time and peak memory of ``domaingrad report`` on a synthetic DomainBed-layout sweep.

The sweep directory is written as a finished ``domaingrad sweep launch`` leaves it, without
training: one directory per job, named and with train arguments as
:func:`domaingrad.sweep.jobs.make_jobs` makes them (single test environments), holding
``results.jsonl`` (one record per checkpoint with the keys a training run writes: ``step``,
``epoch``, the algorithm's loss values, ``step_time``, ``env{i}_in_acc`` and
``env{i}_out_acc`` of every environment, ``mem_gb``, ``hparams`` as
:func:`domaingrad.registry.resolve_hparams` draws them, ``args``, ``wall_time``,
``provenance``) and ``done``. Accuracies are random but plausible (a learning curve per
job towards DomainBed-like final accuracies, each a whole number of correct predictions
over the split's size) and seeded (``--seed``), so the same options give the same files.
The default is the sweep of docs/benchmarks.md: ColoredMNIST and RotatedMNIST, ERM, IRM,
VREx, CORAL and Fishr, 20 draws x 3 trials per test environment (2,700 jobs), 11 records
per job (``checkpoint_freq`` 500 of 5,001 steps). ``--manifest`` also writes the
``sweep.json`` of a domaingrad sweep (without it: DomainBed's own layout).

Each command runs in a fresh process (imports included, as a user sees them):
``domaingrad report DIR --selection all -o report.md`` and ``domaingrad report DIR
--selection iid --baseline ERM --plots PLOTS -o report2.md``, into a new output folder
every time. Wall seconds are measured around the process, peak memory is its maximum
resident set size (``ru_maxrss`` from ``os.wait4`` in a small launcher process, so that
neither this process's size nor earlier children count; MB of 2^20 bytes);
``--repeats N`` gives the medians of N runs. A third fresh process times
the phases of the first command in the library's own calls: imports, reading and
validating the files (``load_sweep``), selection and tables (``build_report`` and
``render``). The header names the conditions: date and time (UTC), versions, CPU count
and load average before and after.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_report.py --draws 20 --trials 3 --repeats 1

Smaller sweeps: ``--draws 1 --trials 1 --records-per-job 3 --datasets ColoredMNIST``;
``--dir DIR`` keeps the sweep there (default: a temporary directory removed at the end),
``--dir DIR --reuse`` times an existing sweep directory again without writing it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("ColoredMNIST", "RotatedMNIST")
ALGORITHMS = ("ERM", "IRM", "VREx", "CORAL", "Fishr")
#: the dataset default of the MNIST family (DomainBed's ``N_STEPS``)
STEPS = 5001
#: MNIST's images, dealt round-robin to the environments (DomainBed)
MNIST_IMAGES = 70_000
HOLDOUT_FRACTION = 0.2

#: final accuracy of a test environment (DomainBed-like), by dataset and environment
TEST_ACC = {"ColoredMNIST": (0.72, 0.73, 0.10), "RotatedMNIST": (0.95, 0.985, 0.99, 0.99, 0.985, 0.96)}
#: final accuracy of a training environment
TRAIN_ACC = {"ColoredMNIST": 0.85, "RotatedMNIST": 0.985}
#: accuracy before training
CHANCE = {"ColoredMNIST": 0.5, "RotatedMNIST": 0.1}
#: each algorithm's shift of the final accuracies
ALGORITHM_SHIFT = {"ERM": 0.0, "IRM": -0.006, "VREx": -0.003, "CORAL": 0.002, "Fishr": 0.003}
#: the values each algorithm's ``update`` returns (besides ``step_time``)
UPDATE_KEYS = {"ERM": ("loss",), "CORAL": ("loss", "penalty")}
DEFAULT_UPDATE_KEYS = ("loss", "nll", "penalty")

#: the process that runs one measured command (``argv[2:]``, output into ``argv[1]``) and
#: prints its wall seconds, peak RSS (MB) and exit status
LAUNCHER_SCRIPT = """\
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
proc.returncode = os.waitstatus_to_exitcode(status)
peak = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 2**10
print(json.dumps({"wall_s": wall, "peak_mb": peak, "returncode": proc.returncode}))
"""

#: the fresh process timing the phases of ``--selection all``
PHASES_SCRIPT = """\
import json, sys, time
start = time.perf_counter()
from domaingrad.report.records import load_sweep
from domaingrad.report.render import render
from domaingrad.report.summary import build_report
imported = time.perf_counter()
sweep = load_sweep(sys.argv[1])
read = time.perf_counter()
text = render(build_report(sweep, "all"), "markdown")
done = time.perf_counter()
print(json.dumps({"imports": imported - start, "read": read - imported, "tables": done - read,
                  "records": len(sweep.records), "problems": len(sweep.problems)}))
"""


@dataclass(frozen=True)
class SweepStats:
    """What was written: jobs, records, bytes of the files and on disk (blocks)."""

    jobs: int
    records: int
    file_bytes: int
    disk_bytes: int
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """One command's wall seconds, peak resident set size (MB) and exit status."""

    wall_s: float
    peak_mb: float
    returncode: int
    log: str


def env_sizes(dataset: str, n_envs: int) -> list[tuple[int, int]]:
    """(in, out) split sizes of every environment, as the run's holdout split makes them."""
    total = MNIST_IMAGES if dataset in TEST_ACC else 2_000 * n_envs
    sizes = []
    for i in range(n_envs):
        n = len(range(i, total, n_envs))
        n_out = int(n * HOLDOUT_FRACTION)
        sizes.append((n - n_out, n_out))
    return sizes


def checkpoint_steps(records_per_job: int) -> tuple[int, list[int]]:
    """(checkpoint_freq, the steps a run of :data:`STEPS` steps records) for about
    ``records_per_job`` records (exactly that many when it divides the steps evenly)."""
    freq = math.ceil((STEPS - 1) / (records_per_job - 1))
    return freq, [s for s in range(STEPS) if s % freq == 0 or s == STEPS - 1]


def _rng(seed: int, *key: object) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def job_records(
    job_args: dict[str, Any],
    hparams: dict[str, Any],
    steps: list[int],
    prov: dict[str, Any],
    seed: int,
) -> list[dict[str, Any]]:
    """The records of one job: a learning curve per environment towards its final accuracy.

    A hyperparameter draw's quality (draw 0, the defaults, the best; one in ten a failure
    near chance) and speed of learning are shared by its trials and test environments; a
    trial adds its own noise, every checkpoint a little more.
    """
    dataset, algorithm = job_args["dataset"], job_args["algorithm"]
    test_env, sizes = job_args["test_envs"][0], env_sizes(dataset, len(job_args["_envs"]))
    chance = CHANCE.get(dataset, 0.1)
    draw = _rng(seed, dataset, algorithm, job_args["hparams_seed"])
    penalty = 0.0 if job_args["hparams_seed"] == 0 else float(draw.exponential(0.04))
    if job_args["hparams_seed"] and draw.random() < 0.1:
        penalty = float(draw.uniform(0.6, 1.0))
    tau = float(draw.uniform(200, 1500))
    rng = _rng(seed, dataset, algorithm, job_args["hparams_seed"], job_args["trial_seed"], test_env)
    shift = ALGORITHM_SHIFT.get(algorithm, 0.0) + float(rng.normal(0, 0.01))
    finals = []
    for i in range(len(sizes)):
        base = TEST_ACC[dataset][i] if dataset in TEST_ACC and i == test_env else TRAIN_ACC.get(dataset, 0.8)
        if i != test_env and dataset not in TEST_ACC:
            base = 0.7
        finals.append(chance + (base + shift - chance) * (1 - min(penalty, 1.0)))
    steps_per_epoch = min(n_in for n_in, _ in sizes) / hparams["batch_size"]
    step_time = float(rng.uniform(0.006, 0.02))
    keys = UPDATE_KEYS.get(algorithm, DEFAULT_UPDATE_KEYS)
    args = {k: v for k, v in job_args.items() if not k.startswith("_")}
    records = []
    for step in steps:
        progress = 1 - math.exp(-step / tau)
        record: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch}
        train_acc = chance + (finals[(test_env + 1) % len(finals)] - chance) * progress
        nll = -math.log(max(train_acc, 1e-3)) * float(rng.uniform(0.9, 1.1))
        if "nll" in keys:
            record["nll"] = nll
        if "penalty" in keys:
            record["penalty"] = float(rng.exponential(0.01))
        record["loss"] = nll + record.get("penalty", 0.0)
        record["step_time"] = step_time * float(rng.uniform(0.9, 1.2))
        for split, column in (("in", 0), ("out", 1)):
            for i, sizes_i in enumerate(sizes):
                p = chance + (finals[i] - chance) * progress + float(rng.normal(0, 0.005 if split == "in" else 0.008))
                n = sizes_i[column]
                record[f"env{i}_{split}_acc"] = round(min(max(p, 0.0), 1.0) * n) / n
        record["mem_gb"] = 0.0
        record["hparams"] = hparams
        record["args"] = args
        record["wall_time"] = step * step_time * 1.05 + 2.0
        record["provenance"] = prov
        records.append(record)
    return records


def build_sweep(
    root: Path,
    datasets: list[str],
    algorithms: list[str],
    draws: int,
    trials: int,
    records_per_job: int,
    seed: int,
    manifest: bool,
) -> SweepStats:
    """Write the synthetic sweep into ``root`` (created)."""
    from domaingrad.data import dataset_class
    from domaingrad.layout import DONE, RESULTS, manifest_bytes, manifest_path
    from domaingrad.registry import resolve_hparams
    from domaingrad.run.provenance import run_provenance
    from domaingrad.sweep.jobs import SweepSpec, make_jobs

    start = time.perf_counter()
    freq, steps = checkpoint_steps(records_per_job)
    spec = SweepSpec(
        tuple(datasets),
        tuple(algorithms),
        single_test_envs=True,
        n_hparams=draws,
        n_trials=trials,
        checkpoint_freq=freq,
        data_dir="/data",
    )
    jobs = make_jobs(spec, root)
    envs = {d: list(dataset_class(d).ENVIRONMENTS) for d in datasets}
    prov = run_provenance("cpu")  # what a CPU training run records
    hparams_cache: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    root.mkdir(parents=True, exist_ok=True)
    n_records = file_bytes = disk_bytes = 0
    for job in jobs:
        a = job.args
        key = (a["algorithm"], a["dataset"], a["hparams_seed"], a["trial_seed"])
        if key not in hparams_cache:
            hparams_cache[key] = resolve_hparams(*key)
        records = job_records({**a, "_envs": envs[a["dataset"]]}, hparams_cache[key], steps, prov, seed)
        job.output_dir.mkdir()
        (job.output_dir / RESULTS).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        (job.output_dir / DONE).write_text("done")
        n_records += len(records)
        for name in (RESULTS, DONE):
            st = (job.output_dir / name).stat()
            file_bytes += st.st_size
            disk_bytes += st.st_blocks * 512
    if manifest:
        manifest_path(root).write_bytes(manifest_bytes({job.id: job.args for job in jobs}))
    return SweepStats(len(jobs), n_records, file_bytes, disk_bytes, time.perf_counter() - start)


def existing_sweep(root: Path) -> SweepStats:
    """The counts of a sweep directory already written (``--reuse``)."""
    from domaingrad.layout import RESULTS

    files = list(root.glob(f"*/{RESULTS}"))
    n_records = sum(f.read_bytes().count(b"\n") for f in files)
    stats = [p.stat() for p in root.glob("*/*") if p.is_file()]
    return SweepStats(len(files), n_records, sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats), 0.0)


def measure(command: list[str], log: Path) -> Measurement:
    """Run ``command`` in a new process; wall seconds and the peak RSS of that process.

    The command is started by :data:`LAUNCHER_SCRIPT` in a small process of its own:
    on Linux a child's ``ru_maxrss`` includes the resident size of the process it was
    forked from up to its ``exec`` (here a parent holding torch, some 500 MB), and
    ``getrusage(RUSAGE_CHILDREN)`` is the maximum over every child so far; the launcher
    (the standard library only, about 10 MB) waits for its one child with ``os.wait4``.
    """
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCHER_SCRIPT, str(log), *command],
        capture_output=True,
        text=True,
        check=True,
        cwd=log.parent,
    )
    result = json.loads(launcher.stdout)
    return Measurement(result["wall_s"], result["peak_mb"], result["returncode"], log.read_text(errors="replace"))


def domaingrad_command() -> list[str]:
    """The ``domaingrad`` console script beside this interpreter, else ``python -m domaingrad``."""
    script = Path(sys.executable).parent / "domaingrad"
    return [str(script)] if script.exists() else [sys.executable, "-m", "domaingrad"]


def report_lines(log: str) -> list[str]:
    """What the report said on stderr worth showing: its first status line, flags, notes."""
    lines = log.splitlines()
    shown = lines[:1] + [line for line in lines if line.startswith(("warning:", "note:", "error:"))]
    return [line if len(line) <= 240 else line[:237] + "..." for line in shown]


def conditions() -> str:
    import torch

    from domaingrad.version import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{now}, domaingrad {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load average {load} (1, 5, 15 min)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--draws", type=int, default=20, help="hyperparameter draws per test environment")
    parser.add_argument("--trials", type=int, default=3, help="trials per draw")
    parser.add_argument("--records-per-job", type=int, default=11, help="checkpoints per job (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic accuracies")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (medians)")
    parser.add_argument("--baseline", default="ERM", help="--baseline of the second command")
    parser.add_argument("--manifest", action="store_true", help="also write sweep.json (domaingrad's layout)")
    parser.add_argument("--no-phases", action="store_true", help="skip the phase timing of --selection all")
    parser.add_argument("--dir", type=Path, help="write (and keep) the sweep here instead of a temporary directory")
    parser.add_argument("--reuse", action="store_true", help="with --dir: time the sweep already there")
    args = parser.parse_args()
    if args.records_per_job < 2 or args.draws < 1 or args.trials < 1 or args.repeats < 1:
        parser.error("--records-per-job must be at least 2, --draws, --trials and --repeats at least 1")
    if args.reuse and args.dir is None:
        parser.error("--reuse needs --dir")

    work = Path(tempfile.mkdtemp(prefix="bench_report_"))
    sweep = args.dir.absolute() if args.dir is not None else work / "sweep"
    try:
        print(conditions())
        if args.reuse:
            stats = existing_sweep(sweep)
            made = f"reused {sweep}"
        else:
            if sweep.exists() and any(sweep.iterdir()):
                raise SystemExit(f"--dir {sweep} is not empty; give an empty or new directory, or add --reuse")
            stats = build_sweep(
                sweep,
                args.datasets,
                args.algorithms,
                args.draws,
                args.trials,
                args.records_per_job,
                args.seed,
                args.manifest,
            )
            made = f"written in {stats.seconds:.1f} s" + (f", kept in {sweep}" if args.dir is not None else "")
        what = (
            ""
            if args.reuse
            else f"{', '.join(args.datasets)}, {len(args.algorithms)} algorithms ({', '.join(args.algorithms)}), "
            f"{args.draws} draws x {args.trials} trials per test environment, single test environments; "
        )
        print(
            f"\nsweep: {stats.jobs:,} jobs, {stats.records:,} records, {stats.file_bytes / 2**20:.1f} MB of files "
            f"({stats.disk_bytes / 2**20:.1f} MB on disk); {what}{made}\n"
        )
        commands = {
            "`domaingrad report DIR --selection all -o report.md`": lambda out: [
                "--selection",
                "all",
                "-o",
                str(out / "report.md"),
            ],
            f"`domaingrad report DIR --selection iid --baseline {args.baseline} --plots PLOTS -o report2.md`": (
                lambda out: [
                    "--selection",
                    "iid",
                    "--baseline",
                    args.baseline,
                    "--plots",
                    str(out / "plots"),
                    "-o",
                    str(out / "report2.md"),
                ]
            ),
        }
        results: dict[str, list[Measurement]] = {name: [] for name in commands}
        said: dict[str, list[str]] = {}
        for repeat in range(args.repeats):
            for i, (name, flags) in enumerate(commands.items()):
                out = work / f"out{i}_{repeat}"
                out.mkdir()
                m = measure([*domaingrad_command(), "report", str(sweep), *flags(out)], out / "stderr.txt")
                if m.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {m.returncode}):\n{m.log[-4000:]}")
                results[name].append(m)
                said.setdefault(name, report_lines(m.log))
                if repeat == 0 and i == 1:
                    plots = sorted((out / "plots").glob("*"))
                    said[name].append(f"({len(plots)} plot files written)")
        runs = f"median of {args.repeats} runs" if args.repeats > 1 else "1 run"
        print(f"| command | wall s ({runs}) | peak MB |\n| --- | ---: | ---: |")
        for name, ms in results.items():
            wall = statistics.median(m.wall_s for m in ms)
            peak = statistics.median(m.peak_mb for m in ms)
            print(f"| {name} | {wall:.2f} | {peak:.0f} |")
        if args.repeats > 1:
            for name, ms in results.items():
                print(f"\n{name} runs: " + ", ".join(f"{m.wall_s:.2f} s / {m.peak_mb:.0f} MB" for m in ms))
        if not args.no_phases:
            phases = subprocess.run(
                [sys.executable, "-c", PHASES_SCRIPT, str(sweep)], capture_output=True, text=True, check=True
            )
            p = json.loads(phases.stdout.strip().splitlines()[-1])
            print(
                f"\nphases of `--selection all` in one fresh process ({p['records']:,} records used, "
                f"{p['problems']} problems):\n\n| phase | s |\n| --- | ---: |\n"
                f"| imports | {p['imports']:.2f} |\n"
                f"| reading and validating the files (load_sweep) | {p['read']:.2f} |\n"
                f"| selection and tables (build_report, render) | {p['tables']:.2f} |"
            )
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload average at the end {load}")
        for name, lines in said.items():
            print(f"\n{name} said on stderr:")
            for line in lines:
                print(f"    {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
