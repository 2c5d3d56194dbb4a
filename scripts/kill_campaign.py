#!/usr/bin/env python3
"""Kill training runs with SIGKILL at random moments, resume them, and check nothing is lost.

Runs one uninterrupted reference run of a small job, then training runs of the same job
(each in its own directory, each a fresh ``python -m domaingrad train`` process), kills
each with ``SIGKILL`` at a random moment (seeded), resumes it with the identical command
until it is done, and compares it with the reference: every results.jsonl record (less
timings and provenance), ``model.pkl`` and every ``model_step{N}.pkl`` weight, and the set
of files (no ``checkpoint.pt``, no ``*.tmp`` left). Exits 0 only when no record or file
was lost and nothing differs.

The default job is ERM on ColoredMNIST (test environment 2), 60 steps, a checkpoint every
10 steps, ``--save-model-every-checkpoint``, on a ``--data-dir`` of 1,200 of the embedded
MNIST digits (``--digits``) so that each evaluation takes about a second. ``--quick`` is
a smaller job (Debug28, 12 steps, a checkpoint every 3) for the test suite.

Usage::

    python scripts/kill_campaign.py --kills 30 --seed 0
    python scripts/kill_campaign.py --kills 2 --seed 0 --quick --kills-per-run 2

The moment of each kill is drawn uniformly between half the reference's start-up time
(until its first line in out.txt) and 97% of the time the reference took for what the
process has left to do, so most kills land in training, evaluation or checkpoint
writing. A process that ends before its kill is a miss (a fresh one then rescales the
expected durations to its own); the campaign starts runs until it has made ``--kills``
kills.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: record keys that differ between any two runs (timings, provenance)
TIMING_KEYS = frozenset({"step_time", "wall_time", "mem_gb", "provenance"})
#: files of a run directory that are not compared (human log, lock note)
NOT_COMPARED = frozenset({"out.txt", "lock"})
RUN_TIMEOUT_SECONDS = 1800


@dataclass
class Tally:
    """What the campaign saw."""

    kills: int = 0
    misses: int = 0
    kills_after_first_record: int = 0
    runs: int = 0
    records_lost: int = 0
    files_lost: int = 0
    stray_files: int = 0
    duplicated_records: int = 0
    record_mismatches: int = 0
    weight_mismatches: int = 0
    failed_resumes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.record_mismatches + self.weight_mismatches + self.duplicated_records + self.failed_resumes

    @property
    def ok(self) -> bool:
        return self.records_lost == 0 and self.files_lost == 0 and self.stray_files == 0 and self.mismatches == 0


def write_idx(path: Path, array: Any) -> None:
    """A uint8 array as an IDX file (the MNIST format: big-endian magic, dimensions, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def digits_dir(root: Path, n_digits: int, seed: int) -> Path:
    """``root`` as a --data-dir of ``n_digits`` embedded digits (a seeded subset; 5/6 train)."""
    import numpy as np

    from domaingrad.data.digits import load_embedded_mnist

    pool = load_embedded_mnist()
    pick = np.random.RandomState(seed).permutation(len(pool.images))[:n_digits]
    images = np.ascontiguousarray(pool.images.numpy()[pick], dtype=np.uint8)
    labels = np.ascontiguousarray(pool.labels.numpy()[pick], dtype=np.uint8)
    n_train = n_digits * 5 // 6
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    return root


def job_arguments(ns: argparse.Namespace, work: Path) -> list[str]:
    """The ``domaingrad train`` arguments of the campaign's job (without --output-dir)."""
    if ns.quick:
        job = ["--dataset", "Debug28", "--test-envs", "0", "--hparams", '{"batch_size": 6}']
        steps, freq = ns.steps or 12, ns.checkpoint_freq or 3
    else:
        job = ["--dataset", "ColoredMNIST", "--test-envs", "2", "--hparams", '{"batch_size": 32}']
        if ns.digits:
            job += ["--data-dir", str(digits_dir(work / "data", ns.digits, ns.seed))]
        steps, freq = ns.steps or 60, ns.checkpoint_freq or 10
    return [
        "train",
        "--algorithm",
        "ERM",
        *job,
        "--steps",
        str(steps),
        "--checkpoint-freq",
        str(freq),
        "--save-model-every-checkpoint",
        "--no-progress",
    ]


def start(arguments: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "domaingrad", *arguments, "--output-dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def reference_run(arguments: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run the reference to the end; returns (seconds to its first out.txt line, seconds in all)."""
    began = time.monotonic()
    process = start(arguments, out, env)
    ready = None
    while process.poll() is None:
        if ready is None and (out / "out.txt").exists():
            ready = time.monotonic() - began
        time.sleep(0.01)
    total = time.monotonic() - began
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the reference run failed (exit {process.returncode}):\n{err.decode(errors='replace')}")
    return (ready if ready is not None else total / 2), total


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    kept["args"] = {k: v for k, v in record["args"].items() if k != "output_dir"}
    return kept


def model_content(path: Path) -> dict[str, Any]:
    import torch

    content = torch.load(path, map_location="cpu", weights_only=False)
    content["args"] = {k: v for k, v in content["args"].items() if k != "output_dir"}
    return content


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    if a.keys() != b.keys() or any(a[k] != b[k] for k in a if k != "model_dict"):
        return False
    x, y = a["model_dict"], b["model_dict"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def compare(ref: Path, run: Path, tally: Tally) -> None:
    """Count what ``run`` lost or holds differently from the reference ``ref``."""
    from domaingrad.layout import read_results

    expected, _ = read_results(ref / "results.jsonl")
    got, problems = read_results(run / "results.jsonl")
    for problem in problems:
        tally.problems.append(f"{run.name}: {problem}")
        tally.record_mismatches += 1
    by_step: dict[int, list[dict]] = {}
    for record in got:
        by_step.setdefault(record["step"], []).append(record)
    for record in expected:
        found = by_step.get(record["step"], [])
        if not found:
            tally.records_lost += 1
            tally.problems.append(f"{run.name}: record of step {record['step']} lost")
            continue
        if len(found) > 1:
            tally.duplicated_records += len(found) - 1
            tally.problems.append(f"{run.name}: step {record['step']} recorded {len(found)} times")
        if any(comparable(r) != comparable(record) for r in found):
            tally.record_mismatches += 1
            tally.problems.append(f"{run.name}: record of step {record['step']} differs")
    extra = sorted(set(by_step) - {r["step"] for r in expected})
    if extra:
        tally.duplicated_records += len(extra)
        tally.problems.append(f"{run.name}: records of steps the reference has not: {extra}")

    ref_files = {p.name for p in ref.iterdir()} - NOT_COMPARED
    run_files = {p.name for p in run.iterdir()} - NOT_COMPARED
    for name in sorted(ref_files - run_files):
        tally.files_lost += 1
        tally.problems.append(f"{run.name}: {name} lost")
    for name in sorted(run_files - ref_files):
        tally.stray_files += 1
        tally.problems.append(f"{run.name}: stray file {name}")
    for name in sorted(ref_files & run_files):
        if name.endswith(".pkl") and not same_model(model_content(ref / name), model_content(run / name)):
            tally.weight_mismatches += 1
            tally.problems.append(f"{run.name}: {name} differs from the reference")


def kill_window(out: Path, ready: float, total: float, steps: int) -> tuple[float, float]:
    """When to kill the next process of the run in ``out`` (seconds after its start):
    from half the reference's start-up time to 97% of the time the reference took for
    what is left (a resumed run starts after its last saved record)."""
    from domaingrad.layout import read_results

    records, _ = read_results(out / "results.jsonl")
    left = 1.0 - (records[-1]["step"] + 1) / steps if records else 1.0
    return 0.5 * ready, max(0.5 * ready, 0.97 * (ready + (total - ready) * left))


def killed_run(
    arguments: list[str],
    out: Path,
    env: dict[str, str],
    timing: list[float],
    kills: int,
    rng: random.Random,
    tally: Tally,
) -> bool:
    """Up to ``kills`` processes of one run, each SIGKILLed at a random moment (see
    :func:`kill_window`; ``timing`` is [start-up, whole duration] of an uninterrupted
    process, first the reference's, rescaled to a fresh process that ended before its
    kill, as when the machine got faster), then the identical command until the run is
    done. Returns whether it finished."""
    steps = int(arguments[arguments.index("--steps") + 1])
    for _ in range(kills):
        fresh = not (out / "results.jsonl").exists()
        delay = rng.uniform(*kill_window(out, timing[0], timing[1], steps))
        began = time.monotonic()
        process = start(arguments, out, env)
        try:
            process.wait(timeout=delay)
            tally.misses += 1  # it ended first
            if fresh and process.returncode == 0:
                took = time.monotonic() - began
                timing[:] = [timing[0] * took / timing[1], took]
        except subprocess.TimeoutExpired:
            records = out / "results.jsonl"
            if records.exists() and records.stat().st_size > 0:
                tally.kills_after_first_record += 1
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            tally.kills += 1
        process.communicate()
        if (out / "done").exists():
            break
    for _ in range(3):  # resume to the end (one attempt should do)
        if (out / "done").exists():
            # the identical command on a finished run says so and exits 0
            process = start(arguments, out, env)
            _, err = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
            if process.returncode != 0:
                tally.failed_resumes += 1
                tail = err.decode(errors="replace")[-300:]
                tally.problems.append(f"{out.name}: rerun of the finished run exited {process.returncode}: {tail}")
            return True
        process = start(arguments, out, env)
        _, err = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
        if process.returncode != 0:
            tail = err.decode(errors="replace")[-300:]
            tally.problems.append(f"{out.name}: resume exited {process.returncode}: {tail}")
    tally.failed_resumes += 1
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="SIGKILLs to make in all (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and the digit subset")
    parser.add_argument("--kills-per-run", type=int, default=1, help="kills of one run before it may finish")
    parser.add_argument("--quick", action="store_true", help="a small Debug28 job, for the test suite")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60; --quick 12)")
    parser.add_argument("--checkpoint-freq", type=int, default=None, help="default 10; --quick 3")
    parser.add_argument("--digits", type=int, default=1200, help="embedded digits in the data dir (0: all 10,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories in this new directory")
    parser.add_argument("--verbose", action="store_true", help="a line per run")
    ns = parser.parse_args(argv)
    if ns.kills < 1 or ns.kills_per_run < 1:
        parser.error("--kills and --kills-per-run must be positive")
    if ns.keep is not None and ns.keep.exists():
        parser.error(f"--keep {ns.keep} exists; give a new directory")

    work = Path(tempfile.mkdtemp(prefix="domaingrad-kills-")) if ns.keep is None else ns.keep
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads))
    rng = random.Random(ns.seed)
    tally = Tally()
    began = time.monotonic()
    try:
        arguments = job_arguments(ns, work)
        print("kill campaign:", " ".join(arguments), f"| {ns.kills} kills, seed {ns.seed}", flush=True)
        ready, total = reference_run(arguments, work / "reference", env)
        print(f"reference: {total:.1f} s ({ready:.1f} s to start); kills drawn from {0.5 * ready:.1f} s on")
        timing = [ready, total]
        while tally.kills < ns.kills:
            out = work / f"run{tally.runs:03d}"
            kills_before, problems_before = tally.kills, len(tally.problems)
            kills = min(ns.kills_per_run, ns.kills - tally.kills)
            if killed_run(arguments, out, env, timing, kills, rng, tally):
                compare(work / "reference", out, tally)
            tally.runs += 1
            if ns.verbose:
                found = len(tally.problems) - problems_before
                print(f"  {out.name}: {tally.kills - kills_before} kill(s), {found} problem(s)")
            if tally.runs > 3 * ns.kills + 10:
                tally.problems.append("too many misses: the runs end before the kill moments")
                break
    finally:
        if ns.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    after = tally.kills_after_first_record
    print(f"kills made: {tally.kills} ({after} after the first record), misses: {tally.misses}")
    print(f"runs compared: {tally.runs}")
    print(f"records lost: {tally.records_lost}, files lost: {tally.files_lost}, stray files: {tally.stray_files}")
    print(
        f"mismatches: {tally.mismatches} (records {tally.record_mismatches}, weights {tally.weight_mismatches}, "
        f"duplicated records {tally.duplicated_records}, failed resumes {tally.failed_resumes})"
    )
    for problem in tally.problems[:20]:
        print(f"  {problem}")
    print(f"{'PASS' if tally.ok else 'FAIL'} in {time.monotonic() - began:.0f} s")
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
