"""The command line of ``domaingrad sweep``: the subcommands ``launch``, ``status`` and
``delete-incomplete``, each with its own ``--help`` and only its own options.

All three take ``--output-dir`` and the job flags (DomainBed's ``scripts/sweep.py``
flag names, dashed or underscored), which say which jobs the sweep has; ``launch``
adds how to run them (launcher, workers, Ray, Slurm), ``status`` adds ``--list``, and
``launch`` and ``delete-incomplete`` add ``--skip-confirmation``.

argparse only: the CLI builds its parser from here at start-up.
"""

from __future__ import annotations

import argparse

from ..layout import SPLIT_PROTOCOLS
from . import TRAIN_OPTIONS

#: the flags that define which jobs a sweep has (any given: jobs from flags, else from the manifest)
JOB_FLAGS = (
    "datasets",
    "algorithms",
    "test_envs",
    "single_test_envs",
    "n_hparams_from",
    "n_hparams",
    "hparams_seeds",
    "n_trials",
    "trial_seeds",
    "hparams",
    "hparams_from",
    "steps",
    "checkpoint_freq",
    "data_dir",
    "holdout_fraction",
    *TRAIN_OPTIONS,
)

#: subcommand -> its one-line help
ACTIONS = {
    "launch": "launch (or relaunch) every job that is not done; interrupted and failed jobs resume",
    "status": "count the jobs by state and show the errors of failed ones",
    "delete-incomplete": "delete the directories of jobs that are neither done nor running",
}

SWEEP_DESCRIPTION = (
    "A sweep is datasets x algorithms x test environments x hyperparameter draws x trials, one directory "
    "per job in --output-dir (DomainBed's scripts/sweep.py). Without job flags (--datasets, --algorithms, "
    "...), each subcommand uses the jobs listed in OUTPUT_DIR/sweep.json. "
    "`domaingrad sweep ACTION --help` lists the options of each."
)


def _option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *extra: str, **kwargs) -> None:
    """``--name-with-dashes`` plus DomainBed's ``--name_with_underscores``."""
    flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + list(extra)
    parser.add_argument(*flags, dest=name, **kwargs)


def add_parser(subparsers) -> None:
    """Register ``domaingrad sweep launch|status|delete-incomplete`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep",
        help="launch, inspect or clean a sweep of training runs (DomainBed's sweep.py)",
        description=SWEEP_DESCRIPTION,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    launch = actions.add_parser("launch", help=ACTIONS["launch"], description=_describe("launch"))
    status = actions.add_parser("status", help=ACTIONS["status"], description=_describe("status"))
    delete = actions.add_parser(
        "delete-incomplete",
        aliases=["delete_incomplete"],
        help=ACTIONS["delete-incomplete"],
        description=_describe("delete-incomplete"),
    )
    for parser in (launch, status, delete):
        _add_job_options(parser)
    _add_launch_options(launch)
    _option(status, "list", action="store_true", help="list every job with its state")
    for parser in (launch, delete):
        _option(
            parser, "skip_confirmation", "--yes", "-y", action="store_true", help="do not ask before launching/deleting"
        )
    _add_slurm_options(launch)


def _describe(action: str) -> str:
    text = {
        "launch": "List the jobs (from the job flags, or from OUTPUT_DIR/sweep.json when none is given), record "
        "them in sweep.json and run every job that is neither done nor running elsewhere: jobs never started "
        "start, interrupted or failed ones resume from their last checkpoint.",
        "status": "Count the sweep's jobs by state (not launched, incomplete, failed, running, done) and show the "
        "last error of each failed job; --list shows every job.",
        "delete-incomplete": "Delete the directories of the sweep's jobs that are neither done nor running (a "
        "running job holds its lock and is kept); sweep.json keeps listing them, so a relaunch reruns them.",
    }[action]
    return text + " Without job flags, the jobs listed in OUTPUT_DIR/sweep.json."


def _add_job_options(p: argparse.ArgumentParser) -> None:
    """``--output-dir`` and the job flags, shared by the three subcommands."""
    _option(p, "output_dir", required=True, help="the sweep directory")
    jobs = p.add_argument_group("jobs (DomainBed's defaults: every dataset and algorithm, 20 draws, 3 trials)")
    _option(
        jobs,
        "datasets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="dataset names (any case), or package.module:Class for your own (importable by every job process)",
    )
    _option(
        jobs,
        "algorithms",
        nargs="+",
        default=None,
        metavar="NAME",
        help="algorithm names (any case), or package.module:Class for your own (importable by every job "
        "process: installed or on PYTHONPATH)",
    )
    _option(
        jobs,
        "test_envs",
        nargs="+",
        type=int,
        default=None,
        metavar="I",
        help="only jobs whose test environments include one of these (default: all)",
    )
    _option(
        jobs,
        "single_test_envs",
        action="store_true",
        default=None,
        help="one test environment per job (default: also every pair, for leave-one-domain-out)",
    )
    _option(jobs, "n_hparams_from", type=int, default=None, help="first hparams_seed (default 0)")
    _option(jobs, "n_hparams", type=int, default=None, help="hparams_seed runs to N-1 (default 20)")
    _option(
        jobs,
        "hparams_seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="S",
        help="exactly these hyperparameter draws, e.g. 3 7 (0 = defaults)",
    )
    _option(jobs, "n_trials", type=int, default=None, help="trial seeds 0..N-1 (default 3)")
    _option(jobs, "trial_seeds", nargs="+", type=int, default=None, metavar="T", help="exactly these trial seeds")
    _option(jobs, "hparams", default=None, help="JSON object of fixed hyperparameters for every job")
    _option(
        jobs,
        "hparams_from",
        default=None,
        metavar="RUN_DIR",
        help="fix every hyperparameter to those of a finished run (its results.jsonl); the draws "
        "default to hparams_seed 0 only, so --n-trials reruns that set on more trials",
    )
    _option(jobs, "steps", type=int, default=None)
    _option(jobs, "checkpoint_freq", type=int, default=None)
    _option(jobs, "data_dir", default=None, help="data root (default: the embedded digits)")
    _option(jobs, "holdout_fraction", type=float, default=None, help="default 0.2")
    _option(
        jobs,
        "weights",
        default=None,
        help="as `domaingrad train --weights` (image datasets: none, imagenet or a state-dict path)",
    )
    _option(jobs, "image_size", type=int, default=None, help="as `domaingrad train --image-size`")
    _option(
        jobs, "split_protocol", default=None, choices=SPLIT_PROTOCOLS, help="as `domaingrad train --split-protocol`"
    )
    _option(jobs, "class_map", default=None, metavar="FILE", help="as `domaingrad train --class-map`")
    _option(
        jobs, "corrupt_images", default=None, choices=["error", "skip"], help="as `domaingrad train --corrupt-images`"
    )
    _option(
        jobs,
        "clean_eval",
        action="store_true",
        default=None,
        help="as `domaingrad train --clean-eval` (evaluate training domains on clean images)",
    )


def _add_launch_options(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("launching")
    _option(
        run,
        "launcher",
        "--command-launcher",
        "--command_launcher",
        default="local",
        choices=["sequential", "local", "ray", "slurm"],
        help="default: local",
    )
    _option(
        run,
        "workers",
        type=int,
        default=None,
        help="parallel jobs (local, and a Ray instance started here); default: the number of CPUs",
    )
    _option(run, "threads_per_job", type=int, default=1, help="torch threads of each job (default 1)")
    _option(run, "ray_address", default=None, help="connect to this running Ray cluster, e.g. auto or host:6379")
    _option(
        run,
        "ray_timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up connecting to --ray-address after this long (default 60)",
    )
    bar = run.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show the progress bar (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    slurm = p.add_argument_group("slurm launcher (submitit)")
    _option(
        slurm,
        "submitit_cluster",
        choices=["slurm", "local", "debug"],
        default=None,
        help="default: slurm (an error where sbatch is missing); local or debug run without Slurm on purpose",
    )
    _option(slurm, "submitit_folder", default=None, help="submitit logs (default OUTPUT_DIR/.submitit)")
    _option(slurm, "slurm_partition", default=None)
    _option(slurm, "slurm_time", type=int, default=None, metavar="MINUTES", help="time limit per job")
    _option(slurm, "slurm_gpus_per_node", type=int, default=None)
    _option(slurm, "slurm_cpus_per_task", type=int, default=None, help="default: --threads-per-job")
    _option(slurm, "slurm_mem_gb", type=int, default=None)
    _option(slurm, "slurm_array_parallelism", type=int, default=None, help="array tasks running at once")
    _option(
        slurm,
        "slurm_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option (repeatable), e.g. account=myproj",
    )


__all__ = ["ACTIONS", "JOB_FLAGS", "add_parser"]
