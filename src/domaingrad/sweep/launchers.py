"""Sweep launchers: sequential and local parallel here; Ray and Slurm (submitit) in their modules.

Every launcher runs each job as a fresh ``python -m domaingrad.sweep.worker`` process
(:mod:`domaingrad.sweep.execute`) with the same thread count, so all launchers give
bit-identical results (DomainBed ``command_launchers.py`` runs ``train.py`` commands the
same way). A launcher returns the outcome of every job it ran; a crashed job is an
outcome, never an exception. On KeyboardInterrupt a launcher stops its running jobs
(they keep their last checkpoint) and re-raises.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .execute import JobOutcome, StartedJob, collect_outcome, start_job
from .jobs import Job, lock_is_held
from .progress import SweepProgress

POLL_SECONDS = 0.1
WAIT_SECONDS = 1.0
STOP_GRACE_SECONDS = 10.0


@dataclass
class LaunchOptions:
    """Options shared by the launchers.

    Attributes:
        threads_per_job: torch threads of every job process.
        workers: parallel jobs (local), CPUs of a Ray instance started here (x threads).
        ray_address: address of a running Ray cluster (None: start a local instance).
        submitit: executor parameters for :mod:`domaingrad.sweep.slurm_launcher`.
    """

    threads_per_job: int = 1
    workers: int = 1
    ray_address: str | None = None
    submitit: dict[str, Any] = field(default_factory=dict)


Launcher = Callable[[Sequence[Job], LaunchOptions, SweepProgress], list[JobOutcome]]


def launch_local(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Run the jobs as at most ``options.workers`` processes at a time, in list order.

    One waiter thread per running process reports its exit through a queue, so the
    next job starts as soon as a slot frees (processes are started by this thread).
    """
    pending = list(reversed(jobs))
    running: list[StartedJob] = []
    exited: queue.Queue[StartedJob] = queue.Queue()
    outcomes = []
    try:
        while pending or running:
            while pending and len(running) < options.workers:
                started = start_job(pending.pop(), options.threads_per_job)
                running.append(started)
                threading.Thread(target=_wait_and_report, args=(started, exited), daemon=True).start()
            progress.set_running(len(running))
            try:
                started = exited.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                continue
            running.remove(started)
            outcome = started.finish()
            outcomes.append(outcome)
            progress.finished(started.job, outcome)
    except BaseException:
        stop_processes(running)
        raise
    return outcomes


def _wait_and_report(started: StartedJob, exited: "queue.Queue[StartedJob]") -> None:
    started.process.wait()
    exited.put(started)


def launch_sequential(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Run the jobs one after another (DomainBed's ``local`` launcher)."""
    return launch_local(jobs, LaunchOptions(options.threads_per_job, 1), progress)


def stop_processes(running: Sequence[StartedJob]) -> None:
    """Terminate job processes (SIGTERM, then SIGKILL after a grace period); none marked failed."""
    for started in running:
        if started.process.poll() is None:
            started.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for started in running:
        while started.process.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        if started.process.poll() is None:
            started.process.kill()
        started.finish(interrupted=True)


def lost_outcome(job: Job, error: BaseException | str) -> JobOutcome:
    """Outcome of a job whose launcher reported an error instead of an exit code."""
    outcome = collect_outcome(job, None, 0.0)
    if not outcome.done:
        outcome.error = f"{error}\n{outcome.error}".strip()
    return outcome


def count_running(jobs: Sequence[Job]) -> int:
    """Jobs among ``jobs`` whose lock a process holds (for remote launchers)."""
    return sum(lock_is_held(job.output_dir) for job in jobs if job.output_dir.exists())


def get_launcher(name: str) -> Launcher:
    """The launcher registered as ``name`` (sequential, local, ray, slurm)."""
    if name == "ray":
        from .ray_launcher import launch_ray
        return launch_ray
    if name == "slurm":
        from .slurm_launcher import launch_submitit
        return launch_submitit
    return {"sequential": launch_sequential, "local": launch_local}[name]


LAUNCHERS = ("sequential", "local", "ray", "slurm")
