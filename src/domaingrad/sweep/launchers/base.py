"""What every launcher shares: :class:`LaunchOptions`, the :data:`Launcher` signature, and
the outcome of a job its launcher lost.

Every launcher runs each job as a fresh ``python -m domaingrad.sweep.worker`` process
(:mod:`domaingrad.sweep.execute`) with the same thread count, so all launchers give
bit-identical results (DomainBed ``command_launchers.py`` runs ``train.py`` commands the
same way). A launcher returns the outcome of every job it ran; a crashed job is an
outcome, never an exception. On KeyboardInterrupt a launcher stops its running jobs
(they keep their last checkpoint) and re-raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..execute import JobOutcome, collect_outcome
from ..jobs import Job, lock_is_held
from ..progress import SweepProgress


@dataclass
class LaunchOptions:
    """Options shared by the launchers.

    Attributes:
        threads_per_job: torch threads of every job process.
        workers: parallel jobs (local), CPUs of a Ray instance started here (x threads).
        ray_address: address of a running Ray cluster (None: start a local instance).
        submitit: executor parameters for :mod:`domaingrad.sweep.launchers.slurm`.
    """

    threads_per_job: int = 1
    workers: int = 1
    ray_address: str | None = None
    submitit: dict[str, Any] = field(default_factory=dict)


#: a launcher: (jobs, options, progress) -> the outcome of every job it ran
Launcher = Callable[[Sequence[Job], LaunchOptions, SweepProgress], list[JobOutcome]]


def lost_outcome(job: Job, error: BaseException | str) -> JobOutcome:
    """Outcome of a job whose launcher reported an error instead of an exit code."""
    outcome = collect_outcome(job, None, 0.0)
    if not outcome.done:
        outcome.error = f"{error}\n{outcome.error}".strip()
    return outcome


def count_running(jobs: Sequence[Job]) -> int:
    """Jobs among ``jobs`` whose lock a process holds (for remote launchers)."""
    return sum(lock_is_held(job.output_dir) for job in jobs if job.output_dir.exists())
