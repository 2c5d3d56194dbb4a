"""``--launcher slurm``: the jobs as a Slurm job array through submitit.

``submitit.AutoExecutor`` submits one array task per job; each task runs the job
process like every other launcher. Executor options (``--slurm-partition``,
``--slurm-time``, ``--slurm-gpus-per-node``, ...) become submitit parameters; submitit's
logs go to ``SWEEP_DIR/.submitit`` unless ``--submitit-folder`` says otherwise.

Without ``--submitit-cluster`` the jobs go to Slurm, and a machine without Slurm
(no ``sbatch`` on ``PATH``) is an error: submitit would otherwise quietly run them as
local processes. ``--submitit-cluster local`` (processes on this machine) and ``debug``
(in this process) run the same code without Slurm on purpose, for trying a sweep out,
and say so on stderr.

Each attempt writes its Slurm job id and node as the first line of that attempt in the
job's ``out.txt`` (:func:`~domaingrad.sweep.launchers.base.note_attempt`). An array
task that Slurm killed (``scancel``, time limit, node failure) is reported as a failed
job; so is one that Slurm no longer lists at all (neither ``squeue`` nor ``sacct``, as
for a task cancelled while it was pending), instead of being waited for forever.
Relaunching the sweep resumes them from their last checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ...errors import DomainGradError
from ..execute import JobOutcome, run_job
from ..jobs import Job
from ..progress import SweepProgress
from .base import LaunchOptions, count_running, lost_outcome, note_attempt

POLL_SECONDS = 1.0
#: seconds between two looks for array tasks that Slurm no longer lists
VANISHED_CHECK_SECONDS = 10.0
#: consecutive looks that must miss a task before it is reported lost
VANISHED_CHECKS = 2


def make_executor(options: LaunchOptions):
    """The submitit executor described by ``options.submitit``.

    Keys: ``folder`` (logs), ``cluster`` (slurm, local, debug or None = Slurm, which must
    be available) and ``parameters`` (given to ``AutoExecutor.update_parameters``).

    Raises:
        DomainGradError: submitit missing, no Slurm here and no ``cluster`` asked for,
            or a parameter submitit refuses.
    """
    try:
        import submitit
    except ImportError as exc:
        raise DomainGradError(
            "--launcher slurm needs submitit: pip install 'domaingrad[slurm]' (or pip install submitit)"
        ) from exc
    conf = options.submitit
    cluster = conf.get("cluster")
    if cluster is None:
        if shutil.which("sbatch") is None:
            raise DomainGradError(
                "--launcher slurm: no Slurm on this machine (sbatch is not on PATH), so the jobs cannot be "
                "submitted. Run the sweep on a Slurm login node, or pass --submitit-cluster local to run the "
                "array tasks as processes on this machine on purpose (or use --launcher local)."
            )
        cluster = "slurm"
    elif cluster != "slurm":
        where = "as processes on this machine" if cluster == "local" else "one after another in this process"
        print(
            f"domaingrad sweep: warning: --submitit-cluster {cluster}: the jobs run {where}, not on Slurm",
            file=sys.stderr,
            flush=True,
        )
    try:
        executor = submitit.AutoExecutor(folder=conf["folder"], cluster=cluster)
        params: dict[str, Any] = {"name": "domaingrad-sweep", "cpus_per_task": options.threads_per_job}
        params.update(conf.get("parameters", {}))
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError, RuntimeError) as exc:
        raise DomainGradError(f"submitit refused the executor options: {exc}") from exc
    return executor


def run_array_task(job: Job, threads: int) -> JobOutcome:
    """The array task of one job: note the Slurm job and node in ``out.txt``, then run the job process."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        array = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        name = f"{array[0]}_{array[1]}" if None not in array else env["SLURM_JOB_ID"]
        note_attempt(job, f"Slurm job {name} (job id {env['SLURM_JOB_ID']}, node {env.get('SLURMD_NODENAME', '?')})")
    return run_job(job, threads)


def listed_by_squeue(job_ids: Sequence[str]) -> set[str] | None:
    """The ids among ``job_ids`` (array tasks ``MAIN_INDEX`` or plain ids) that ``squeue``
    lists as pending or running; None when squeue cannot tell (missing, controller down)."""
    mains = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        result = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i", "--jobs", ",".join(mains)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # every id already gone from the controller: squeue says so instead of listing nothing
        return set() if "Invalid job id" in result.stderr else None
    return {line.strip() for line in result.stdout.splitlines()} & set(job_ids)


def launch_submitit(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Submit the jobs as one job array and wait for them; returns their outcomes.

    Raises:
        DomainGradError: see :func:`make_executor`.
    """
    executor = make_executor(options)
    threads = [options.threads_per_job] * len(jobs)
    submitted = executor.map_array(run_array_task, list(jobs), threads)
    on_slurm = executor.cluster == "slurm"
    pending = list(zip(submitted, jobs))
    outcomes = []
    missing: dict[str, int] = {}  # job id -> consecutive looks that found it nowhere
    last_look = time.monotonic()
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
            if on_slurm and pending and time.monotonic() - last_look > VANISHED_CHECK_SECONDS:
                last_look = time.monotonic()
                pending = _drop_vanished(pending, missing, outcomes, progress)
            if pending:
                progress.set_running(count_running([job for _, job in pending]))
                time.sleep(POLL_SECONDS)
    except BaseException:
        for handle, _ in pending:
            handle.cancel(check=False)
        raise
    return outcomes


def _drop_vanished(pending, missing: dict[str, int], outcomes: list[JobOutcome], progress: SweepProgress):
    """Report the pending tasks that neither sacct (submitit's state UNKNOWN) nor squeue has
    listed for :data:`VANISHED_CHECKS` looks in a row as lost; returns the others."""
    unknown = [(handle, job) for handle, job in pending if handle.state.upper() == "UNKNOWN"]
    listed = listed_by_squeue([handle.job_id for handle, _ in unknown]) if unknown else set()
    if listed is None:
        return pending
    gone = {handle.job_id for handle, _ in unknown if handle.job_id not in listed}
    for job_id in list(missing):
        if job_id not in gone:
            del missing[job_id]
    for job_id in gone:
        missing[job_id] = missing.get(job_id, 0) + 1
    still = []
    for handle, job in pending:
        if missing.get(handle.job_id, 0) < VANISHED_CHECKS or handle.done():
            still.append((handle, job))
            continue
        outcome = lost_outcome(
            job,
            f"Slurm no longer lists array task {handle.job_id} (not in squeue, no accounting record in sacct: "
            "cancelled before it started, or removed); relaunch the sweep to run it",
        )
        outcomes.append(outcome)
        progress.finished(job, outcome)
    return still
