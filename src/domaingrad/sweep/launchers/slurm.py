"""``--launcher slurm``: the jobs as a Slurm job array through submitit.

``submitit.AutoExecutor`` submits one array task per job; each task runs the job
process like every other launcher. Executor options (``--slurm-partition``,
``--slurm-time``, ``--slurm-gpus-per-node``, ...) become submitit parameters; submitit's
logs go to ``SWEEP_DIR/.submitit`` unless ``--submitit-folder`` says otherwise.
``--submitit-cluster local`` (processes on this machine) and ``debug`` (in this
process) run the same code without Slurm, for trying a sweep out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ...errors import DomainGradError
from ..execute import JobOutcome, run_job
from ..jobs import Job
from ..progress import SweepProgress
from .base import LaunchOptions, count_running, lost_outcome

POLL_SECONDS = 1.0


def make_executor(options: LaunchOptions):
    """The submitit executor described by ``options.submitit``.

    Keys: ``folder`` (logs), ``cluster`` (slurm, local, debug or None = detect) and
    ``parameters`` (given to ``AutoExecutor.update_parameters``).

    Raises:
        DomainGradError: submitit missing, or a parameter submitit refuses.
    """
    try:
        import submitit
    except ImportError as exc:
        raise DomainGradError(
            "--launcher slurm needs submitit: pip install 'domaingrad[slurm]' (or pip install submitit)"
        ) from exc
    conf = options.submitit
    try:
        executor = submitit.AutoExecutor(folder=conf["folder"], cluster=conf.get("cluster"))
        params: dict[str, Any] = {"name": "domaingrad-sweep", "cpus_per_task": options.threads_per_job}
        params.update(conf.get("parameters", {}))
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError, RuntimeError) as exc:
        raise DomainGradError(f"submitit refused the executor options: {exc}") from exc
    return executor


def launch_submitit(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Submit the jobs as one job array and wait for them; returns their outcomes."""
    executor = make_executor(options)
    threads = [options.threads_per_job] * len(jobs)
    submitted = executor.map_array(run_job, list(jobs), threads)
    pending = list(zip(submitted, jobs))
    outcomes = []
    try:
        while pending:
            still = []
            for handle, job in pending:
                if not handle.done():
                    still.append((handle, job))
                    continue
                try:
                    outcome = handle.result()
                except Exception as exc:  # noqa: BLE001 - Slurm lost or killed the task: report it
                    outcome = lost_outcome(job, f"submitit job {handle.job_id} failed: {exc}")
                outcomes.append(outcome)
                progress.finished(job, outcome)
            pending = still
            if pending:
                progress.set_running(count_running([job for _, job in pending]))
                time.sleep(POLL_SECONDS)
    except BaseException:
        for handle, _ in pending:
            handle.cancel(check=False)
        raise
    return outcomes
