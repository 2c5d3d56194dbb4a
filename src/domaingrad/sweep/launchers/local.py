"""``--launcher local`` and ``sequential``: job processes on this machine.

``local`` runs at most ``--workers`` job processes at a time; ``sequential`` (DomainBed's
``local`` launcher) one after another.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

from ..execute import JobOutcome, StartedJob, start_job
from ..jobs import Job
from ..progress import SweepProgress
from .base import LaunchOptions

POLL_SECONDS = 0.1
WAIT_SECONDS = 1.0
STOP_GRACE_SECONDS = 10.0


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


def _wait_and_report(started: StartedJob, exited: queue.Queue[StartedJob]) -> None:
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
