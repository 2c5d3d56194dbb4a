"""``domaingrad sweep launch|status|delete-incomplete``: DomainBed's ``scripts/sweep.py``.

``launch`` lists the jobs (from the flags, or from ``SWEEP_DIR/sweep.json`` when no
job flag is given), records them in the manifest and runs every job that is not done:
jobs never started start, interrupted or failed ones resume from their last checkpoint.
``status`` counts the jobs by state and shows the errors of failed ones.
``delete-incomplete`` deletes the directories of jobs that are neither done nor running.
Each is a subcommand with its own options (:mod:`.options`).

Only cheap modules are imported at module level (the CLI builds its parser from here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections import Counter

from ..errors import DomainGradError
from . import TRAIN_OPTIONS
from .options import JOB_FLAGS, add_parser


def run(ns: argparse.Namespace) -> int:
    """Run ``domaingrad sweep ACTION`` (``launch``, ``status``, ``delete-incomplete``); returns the exit code.

    Raises:
        DomainGradError: bad flags, an unreadable manifest, no confirmation possible.
    """
    from ..layout import JobState
    from .jobs import iter_states

    if os.path.exists(ns.output_dir) and not os.path.isdir(ns.output_dir):
        raise DomainGradError(f"--output-dir {ns.output_dir} exists and is not a directory; give a sweep directory")
    jobs = select_jobs(ns)
    states = list(iter_states(jobs))
    print(f"sweep {os.path.abspath(ns.output_dir)}: {summarize(states)}")
    if ns.action == "status":
        return show_status(states, getattr(ns, "list", False))
    if ns.action in ("delete-incomplete", "delete_incomplete"):
        return delete_incomplete([j for j, s in states if s in (JobState.INCOMPLETE, JobState.FAILED)], ns)
    return launch(jobs, states, ns)


def summarize(states) -> str:
    """``N jobs: a done, b running, ...`` in a fixed order of states."""
    from ..layout import JobState

    counts = Counter(s for _, s in states)
    parts = [f"{counts[s]} {s.value}" for s in JobState if counts[s]]
    return f"{len(states)} jobs" + (": " + ", ".join(parts) if parts else "")


def select_jobs(ns: argparse.Namespace):
    """The sweep's jobs: from the job flags, else from the manifest (rebased to OUTPUT_DIR)."""
    from .jobs import make_jobs
    from .manifest import manifest_jobs

    if any(getattr(ns, name) not in (None, False) for name in JOB_FLAGS):
        return make_jobs(spec_from_flags(ns), ns.output_dir)
    listed = manifest_jobs(ns.output_dir)
    if listed:
        for job in listed:
            job.args["output_dir"] = os.path.join(os.path.abspath(ns.output_dir), job.id)
        return listed
    if ns.action == "launch":
        return make_jobs(spec_from_flags(ns), ns.output_dir)
    raise DomainGradError(
        f"{ns.output_dir} has no sweep.json; give the sweep's flags (--datasets, --algorithms, "
        "...) to say which jobs it has"
    )


def spec_from_flags(ns: argparse.Namespace):
    """The :class:`SweepSpec` of the flags, DomainBed's defaults for the ones not given.

    Raises:
        DomainGradError: contradictory or out-of-range flags, hyperparameters refused by
            an algorithm of the sweep.
    """
    from ..algorithms import ALGORITHMS, resolve_algorithm_name
    from ..data import DATASETS, resolve_dataset_name
    from .jobs import SweepSpec, check_spec, hparams_of_run

    if ns.hparams_seeds is not None and (ns.n_hparams is not None or ns.n_hparams_from is not None):
        raise DomainGradError("give either --hparams-seeds or --n-hparams-from/--n-hparams, not both")
    if ns.trial_seeds is not None and ns.n_trials is not None:
        raise DomainGradError("give either --trial-seeds or --n-trials, not both")
    hparams, hparams_seeds = ns.hparams, ns.hparams_seeds
    if ns.hparams_from is not None:
        if hparams is not None:
            raise DomainGradError("give either --hparams or --hparams-from, not both")
        hparams = hparams_of_run(ns.hparams_from)
        if hparams_seeds is None and ns.n_hparams is None and ns.n_hparams_from is None:
            hparams_seeds = [0]
    # canonical spellings (--algorithms erm -> ERM): the job arguments, hashes and records keep them
    datasets = (
        [resolve_dataset_name(d) for d in ns.datasets] if ns.datasets else [d for d in DATASETS if "Debug" not in d]
    )
    algorithms = [resolve_algorithm_name(a) for a in ns.algorithms] if ns.algorithms else list(ALGORITHMS)
    spec = SweepSpec(
        datasets=tuple(dict.fromkeys(datasets)),
        algorithms=tuple(dict.fromkeys(algorithms)),
        test_envs=None if ns.test_envs is None else tuple(ns.test_envs),
        single_test_envs=bool(ns.single_test_envs),
        n_hparams_from=0 if ns.n_hparams_from is None else ns.n_hparams_from,
        n_hparams=20 if ns.n_hparams is None else ns.n_hparams,
        hparams_seeds=None if hparams_seeds is None else tuple(dict.fromkeys(hparams_seeds)),
        n_trials=3 if ns.n_trials is None else ns.n_trials,
        trial_seeds=None if ns.trial_seeds is None else tuple(dict.fromkeys(ns.trial_seeds)),
        hparams=hparams,
        steps=ns.steps,
        checkpoint_freq=ns.checkpoint_freq,
        data_dir=ns.data_dir,
        holdout_fraction=0.2 if ns.holdout_fraction is None else ns.holdout_fraction,
        train_options={
            name: (os.path.abspath(getattr(ns, name)) if name == "class_map" else getattr(ns, name))
            for name in TRAIN_OPTIONS
            if getattr(ns, name) is not None
        },
    )
    check_spec(spec)
    return spec


def show_status(states, list_all: bool) -> int:
    """Print failed and running jobs (every job with ``list_all``); returns 0."""
    from ..layout import JobState
    from .jobs import err_tail

    for job, state in states:
        if list_all or state in (JobState.FAILED, JobState.RUNNING):
            print(f"  {state.value:<12} {job.id} {job.describe()}")
        if state is JobState.FAILED:
            tail = err_tail(job.output_dir) or "(err.txt is empty)"
            print("\n".join("      | " + line for line in tail.splitlines()))
    return 0


def confirm(ns: argparse.Namespace, question: str) -> bool:
    """Ask ``question`` unless --skip-confirmation; False when the answer is not yes.

    Raises:
        DomainGradError: no terminal to ask on and no --skip-confirmation.
    """
    if getattr(ns, "skip_confirmation", False):
        return True
    try:
        answer = input(f"{question} (y/n) ")
    except EOFError as exc:
        raise DomainGradError("cannot ask for confirmation (no input); pass --skip-confirmation") from exc
    if answer.strip().lower()[:1] != "y":
        print("Nevermind!")
        return False
    return True


def delete_incomplete(jobs, ns: argparse.Namespace) -> int:
    """Delete the directories of unfinished jobs, never a done or running one."""
    from ..layout import DONE
    from .worker import acquire_lock

    print(f"About to delete {len(jobs)} incomplete or failed jobs.")
    if not jobs or not confirm(ns, "Are you sure?"):
        return 0
    deleted = 0
    for job in jobs:
        lock = acquire_lock(job.output_dir, wait=0.0)
        if lock is None:
            print(f"  kept {job.id}: it is running")
            continue
        try:
            if (job.output_dir / DONE).exists():
                print(f"  kept {job.id}: it finished meanwhile")
                continue
            shutil.rmtree(job.output_dir)
            deleted += 1
        finally:
            os.close(lock)
    print(f"Deleted {deleted} job directories.")
    return 0


def launch_options(ns: argparse.Namespace):
    """The :class:`LaunchOptions` of the flags.

    Raises:
        DomainGradError: non-positive counts or a malformed --slurm-option.
    """
    from .launchers import LaunchOptions

    workers = ns.workers if ns.workers is not None else (os.cpu_count() or 1)
    if workers < 1 or ns.threads_per_job < 1:
        raise DomainGradError("--workers and --threads-per-job must be positive integers")
    extra = {}
    for item in ns.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DomainGradError(f"--slurm-option expects KEY=VALUE, got {item!r}")
        extra[key] = value
    params = {
        "slurm_partition": ns.slurm_partition,
        "timeout_min": ns.slurm_time,
        "gpus_per_node": ns.slurm_gpus_per_node,
        "cpus_per_task": ns.slurm_cpus_per_task,
        "mem_gb": ns.slurm_mem_gb,
        "slurm_array_parallelism": ns.slurm_array_parallelism,
        "slurm_additional_parameters": extra or None,
    }
    submitit = {
        "folder": ns.submitit_folder or os.path.join(ns.output_dir, ".submitit"),
        "cluster": ns.submitit_cluster,
        "parameters": {k: v for k, v in params.items() if v is not None},
    }
    return LaunchOptions(ns.threads_per_job, workers, ns.ray_address, submitit, ray_timeout=ns.ray_timeout)


def launch(jobs, states, ns: argparse.Namespace) -> int:
    """Run every job that is neither done nor running; returns 0, or 1 if a job failed."""
    from ..layout import JobState
    from .launchers import get_launcher
    from .manifest import merge_manifest
    from .progress import SweepProgress

    options = launch_options(ns)
    to_run = [j for j, s in states if s not in (JobState.DONE, JobState.RUNNING)]
    running = sum(s is JobState.RUNNING for _, s in states)
    print(
        f"About to launch {len(to_run)} jobs with the {ns.launcher} launcher"
        + (f" ({running} running elsewhere are left alone)." if running else ".")
    )
    if not to_run:
        merge_manifest(ns.output_dir, jobs)
        return 0
    if not confirm(ns, "Are you sure?"):
        return 0
    merge_manifest(ns.output_dir, jobs)
    progress = SweepProgress(len(to_run), bar=ns.progress)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        get_launcher(ns.launcher)(to_run, options, progress)
    except KeyboardInterrupt:
        progress.close()
        print(
            f"sweep interrupted: {progress.done} jobs finished in this launch; relaunch the same command to "
            "run the rest (unfinished jobs resume from their last checkpoint)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    return report_launch(progress)


def _interrupt(signum, frame):  # SIGTERM: stop the jobs cleanly like Ctrl-C
    raise KeyboardInterrupt


def report_launch(progress) -> int:
    """Print the end-of-launch summary; 1 when some job failed."""
    print(
        f"launch finished: {progress.done} done, {progress.failed} failed"
        + (f", {progress.elsewhere} running elsewhere" if progress.elsewhere else "")
    )
    if progress.failures:
        print(
            "failed jobs (stderr in each job's err.txt; relaunch to retry them, they resume from "
            "their last checkpoint):"
        )
        for job, outcome in progress.failures:
            print(f"  {job.output_dir}  exit {outcome.returncode}")
        return 1
    return 0


__all__ = ["add_parser", "run"]
