"""Small real sweeps on ColoredMNIST: kill-and-relaunch, identical results across the
sequential, local, Ray and submitit launchers, a crashing job among good ones."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from domaingrad import cli
from domaingrad.sweep.jobs import lock_is_held
from domaingrad.sweep.manifest import manifest_jobs

from .conftest import sweep_flags

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_FREQ = 5, 2  # records at steps 0, 2, 4


def flags(data_dir: Path, test_envs: str = "0 1") -> list[str]:
    return sweep_flags(data_dir, STEPS, CHECKPOINT_FREQ, test_envs)


def comparable_records(sweep_dir: Path) -> dict[str, list[dict]]:
    """Every job's results.jsonl records without timing, wall-time or provenance keys
    and without the output directory (the only argument that names the sweep)."""
    result = {}
    for job in manifest_jobs(sweep_dir):
        lines = (sweep_dir / job.id / "results.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        for record in records:
            for key in [k for k in record if "time" in k or k == "provenance"]:
                del record[key]
            del record["args"]["output_dir"]
        result[job.id] = records
    return result


def model_weights(sweep_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        job.id: torch.load(sweep_dir / job.id / "model.pkl", weights_only=False)["model_dict"]
        for job in manifest_jobs(sweep_dir)
    }


def snapshot(job_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in job_dir.iterdir()}


@pytest.fixture(scope="module")
def killed_and_relaunched(tiny_mnist_dir, tmp_path_factory):
    """A two-job sequential sweep SIGKILLed while its second job trains, then relaunched.

    Returns (sweep dir, job ids, files of job 1 before the relaunch, relaunch result).
    """
    sweep = tmp_path_factory.mktemp("killed") / "sweep"
    command = [
        sys.executable,
        "-m",
        "domaingrad",
        "sweep",
        "launch",
        "--output-dir",
        str(sweep),
        *flags(tiny_mnist_dir),
        "--launcher",
        "sequential",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (sweep / "sweep.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first, second = (job.id for job in manifest_jobs(sweep))
    # kill once job 1 is done and job 2 has written its first checkpoint record
    while time.monotonic() < deadline and not (
        (sweep / first / "done").exists() and (sweep / second / "results.jsonl").exists()
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (sweep / second / "done").exists(), "the kill came too late to test anything"
    deadline = time.monotonic() + 10  # the job process dies with the sweep (PR_SET_PDEATHSIG)
    while lock_is_held(sweep / second) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lock_is_held(sweep / second), "the job process outlived the killed sweep"
    before = snapshot(sweep / first)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(command[3:])
    return sweep, (first, second), before, (code, out.getvalue(), err.getvalue())


def test_kill_and_relaunch_finishes_only_the_missing_job(killed_and_relaunched):
    sweep, (first, second), before, (code, out, err) = killed_and_relaunched
    assert code == 0, err
    assert "2 jobs: 1 incomplete, 1 done" in out
    assert "About to launch 1 jobs" in out
    assert f"done: {second}" in out and f"done: {first}" not in out
    assert snapshot(sweep / first) == before  # the finished job: untouched
    assert "resuming from the checkpoint at step" in (sweep / second / "out.txt").read_text()
    steps = [json.loads(line)["step"] for line in (sweep / second / "results.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]  # nothing lost, nothing twice
    assert (sweep / second / "err.txt").read_text().count("=== domaingrad sweep attempt") == 2


@pytest.mark.parametrize(
    "launcher, test_envs",
    [
        (["--launcher", "local", "--workers", "2"], "0 1"),
        (["--launcher", "ray", "--workers", "2"], "1"),  # one job: Ray starts slowly
        (["--launcher", "slurm", "--submitit-cluster", "debug"], "0"),
    ],
    ids=["local", "ray", "submitit"],
)
def test_launchers_give_identical_results(
    killed_and_relaunched, tiny_mnist_dir, tmp_path, run_cli, launcher, test_envs
):
    reference = killed_and_relaunched[0]
    sweep = tmp_path / "sweep"
    n_jobs = len(test_envs.split())
    code, out, err = run_cli("sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir, test_envs), *launcher)
    assert code == 0, out + err
    assert f"launch finished: {n_jobs} done, 0 failed" in out and f"with the {launcher[1]} launcher" in out
    ours, theirs = comparable_records(sweep), comparable_records(reference)
    assert len(ours) == n_jobs and set(ours) <= set(theirs)  # the same job ids as in the reference sweep
    assert ours == {job_id: theirs[job_id] for job_id in ours}
    assert all(len(records) == 3 for records in ours.values())
    ours_w, theirs_w = model_weights(sweep), model_weights(reference)
    for job_id, weights in ours_w.items():
        assert all(torch.equal(weights[k], theirs_w[job_id][k]) for k in weights)
    code, out, _ = run_cli("sweep", "status", "--output-dir", sweep)
    assert f"{n_jobs} jobs: {n_jobs} done" in out


def kill_job_process_when(job_dir: Path, ready, timeout: float = 120.0) -> threading.Thread:
    """A thread that SIGKILLs the worker process of ``job_dir`` once ``ready()`` (Linux /proc)."""

    def find_pid() -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"domaingrad.sweep.worker" in cmdline and job_dir.name.encode() in cmdline:
                return int(entry.name)
        return None

    def kill() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                pid = find_pid()
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job process through /proc")
def test_crashed_and_killed_jobs_are_reported_and_the_others_finish(tiny_mnist_dir, tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    job_flags = [f for f in flags(tiny_mnist_dir, "0 1 2") if f not in ("--skip-confirmation", "--no-progress")]
    code, out, _ = run_cli("sweep", "status", "--output-dir", sweep, *job_flags, "--list")  # status: no launch flags
    broken, killed, good = (line.split()[2] for line in out.splitlines()[1:4])  # test envs 0, 1, 2
    (sweep / broken).mkdir(parents=True)
    (sweep / broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    killer = kill_job_process_when(sweep / killed, lambda: (sweep / killed / "results.jsonl").exists())
    code, out, err = run_cli(
        "sweep",
        "launch",
        "--output-dir",
        sweep,
        *flags(tiny_mnist_dir, "0 1 2"),
        "--launcher",
        "local",
        "--workers",
        "2",
    )
    killer.join()
    assert code == 1
    assert f"FAILED (exit 2): {broken}" in out
    assert "cannot read the resume state" in out  # the tail of its err.txt
    assert f"FAILED (exit -9): {killed}" in out
    assert f"done: {good}" in out and (sweep / good / "done").exists()
    assert "launch finished: 1 done, 2 failed" in out
    assert (sweep / broken / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # left as it was
    code, out, _ = run_cli("sweep", "status", "--output-dir", sweep)
    assert "3 jobs: 2 failed, 1 done" in out and "cannot read the resume state" in out
    # relaunching the killed job's part of the sweep resumes it from its checkpoint
    code, out, _ = run_cli(
        "sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir, "1"), "--launcher", "sequential"
    )
    assert code == 0 and f"done: {killed}" in out
    assert "resuming from the checkpoint at step" in (sweep / killed / "out.txt").read_text()
    steps = [json.loads(line)["step"] for line in (sweep / killed / "results.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]
