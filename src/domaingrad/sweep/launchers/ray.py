"""``--launcher ray``: each job is a Ray task that runs the job process.

With ``--ray-address`` the sweep connects to a running cluster (``ray start --head``
on one machine, ``ray start --address ...`` on the others); the sweep directory and
the data directory must then be on a file system every node sees, under the same
path, and domaingrad installed on every node. Without an address a local Ray instance
is started with ``workers x threads_per_job`` CPUs and stopped at the end. Each task
asks for ``threads_per_job`` CPUs, so Ray runs as many jobs at once as CPUs allow.

Ray retries a task whose worker process died (its default ``max_retries``); the job
then resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from ...errors import DomainGradError
from ..execute import JobOutcome, run_job
from ..jobs import Job
from ..progress import SweepProgress
from .base import LaunchOptions, count_running, lost_outcome

WAIT_SECONDS = 0.5


def _connect(options: LaunchOptions):
    try:
        import ray
    except ImportError as exc:
        raise DomainGradError("--launcher ray needs Ray: pip install 'domaingrad[ray]' (or pip install ray)") from exc
    if ray.is_initialized():
        return ray, False
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if options.ray_address:
        try:
            ray.init(address=options.ray_address, **common)
        except ConnectionError as exc:
            raise DomainGradError(
                f"cannot connect to the Ray cluster at {options.ray_address} ({exc}). Check the address "
                "(`ray status` on the head node); a cluster with token authentication (Ray's default for "
                "clusters started by ray.init) also needs RAY_AUTH_MODE=token in this shell."
            ) from exc
    else:
        ray.init(num_cpus=options.workers * options.threads_per_job, **common)
    return ray, True


def launch_ray(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Run every job as a Ray task of ``threads_per_job`` CPUs; returns their outcomes."""
    ray, started_here = _connect(options)
    try:
        task = ray.remote(num_cpus=options.threads_per_job)(run_job)
        by_ref = {task.remote(job, options.threads_per_job): job for job in jobs}
        pending = list(by_ref)
        outcomes = []
        last_count = 0.0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SECONDS)
                for ref in ready:
                    job = by_ref[ref]
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - Ray lost the task: report it, go on
                        outcome = lost_outcome(job, f"Ray task failed: {exc}")
                    outcomes.append(outcome)
                    progress.finished(job, outcome)
                if time.monotonic() - last_count > 1.0:
                    progress.set_running(count_running([by_ref[r] for r in pending]))
                    last_count = time.monotonic()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return outcomes
    finally:
        if started_here:
            ray.shutdown()
