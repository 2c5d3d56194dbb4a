"""What every launcher shares: :class:`LaunchOptions`, the :data:`Launcher` signature, and
the outcome of a job its launcher lost.

Every launcher runs each job as a fresh ``python -m domaingrad.sweep.worker`` process
(:mod:`domaingrad.sweep.execute`) with the same thread count, so all launchers give
bit-identical results (DomainBed ``command_launchers.py`` runs ``train.py`` commands the
same way). A launcher returns the outcome of every job it ran; a crashed job is an
outcome, never an exception. On KeyboardInterrupt a launcher stops its running jobs
(they keep their last checkpoint) and re-raises.

The remote launchers (Ray, Slurm) write where each attempt ran as one line of the job's
``out.txt`` (:func:`note_attempt`), before the job process starts.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...layout import LOG
from ..execute import JobOutcome, collect_outcome
from ..jobs import Job, lock_is_held
from ..progress import SweepProgress

#: seconds ``--launcher ray --ray-address`` waits for the cluster to answer
RAY_CONNECT_TIMEOUT = 60.0
#: first characters of the line :func:`note_attempt` writes to ``out.txt``
ATTEMPT_NOTE = "domaingrad sweep: attempt on"


@dataclass
class LaunchOptions:
    """Options shared by the launchers.

    Attributes:
        threads_per_job: torch threads of every job process.
        workers: parallel jobs (local), CPUs of a Ray instance started here (x threads).
        ray_address: address of a running Ray cluster (None: start a local instance).
        submitit: executor parameters for :mod:`domaingrad.sweep.launchers.slurm`.
        ray_timeout: seconds ``ray.init`` may take to connect to the cluster at
            ``ray_address`` before the launch gives up (the name lookup and the TCP probe
            before it take at most 10 s each, and no longer than this).
    """

    threads_per_job: int = 1
    workers: int = 1
    ray_address: str | None = None
    submitit: dict[str, Any] = field(default_factory=dict)
    ray_timeout: float = RAY_CONNECT_TIMEOUT


#: a launcher: (jobs, options, progress) -> the outcome of every job it ran
Launcher = Callable[[Sequence[Job], LaunchOptions, SweepProgress], list[JobOutcome]]


def lost_outcome(job: Job, error: BaseException | str) -> JobOutcome:
    """Outcome of a job whose launcher reported an error instead of an exit code.

    A job that started is marked failed in its directory (unless it is done); one that
    never started (no directory) is left as it was, "not launched".
    """
    if not job.output_dir.exists():
        return JobOutcome(job.id, None, 0.0, False, str(error))
    outcome = collect_outcome(job, None, 0.0)
    if not outcome.done:
        outcome.error = f"{error}\n{outcome.error}".strip()
    return outcome


def count_running(jobs: Sequence[Job]) -> int:
    """Jobs among ``jobs`` whose lock a process holds (for remote launchers)."""
    return sum(lock_is_held(job.output_dir) for job in jobs if job.output_dir.exists())


def note_attempt(job: Job, where: str) -> None:
    """Append ``ATTEMPT_NOTE <where>, host <hostname>, pid <pid>, <time>`` to the job's ``out.txt``.

    Called by a remote launcher's task on the machine that runs the attempt, before the job
    process starts (so the job's own log lines of that attempt follow it).

    Args:
        job: the job about to run; its directory is created if needed.
        where: the launcher's name for the place, e.g. ``Ray node 5e1f...`` or ``Slurm job 12_3``.
    """
    job.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with open(job.output_dir / LOG, "a") as log:
        log.write(f"{ATTEMPT_NOTE} {where}, host {socket.gethostname()}, pid {os.getpid()}, {stamp}\n")
