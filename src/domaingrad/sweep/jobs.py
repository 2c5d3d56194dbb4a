"""The jobs of a sweep: DomainBed's ``sweep.py`` job list, job directories and job states.

A sweep is datasets x algorithms x test environments x hyperparameter draws x trials
(DomainBed ``scripts/sweep.py``, ``make_args_list``). Each job is one training run in
``SWEEP_DIR/<md5 of the job's train args as sorted JSON>``, finished when it holds
``done``. The directory name is computed as DomainBed computes it (the args dict
without ``output_dir``, ``json.dumps(..., sort_keys=True)``, md5), so the same sweep gets
the same directory names; ``checkpoint_freq`` joins the hashed args only when set,
like DomainBed's optional ``steps`` and ``hparams``.

Beyond DomainBed (what its users asked for): an explicit list of test environments,
only one test environment per job (``single_test_envs``), a chosen subset of
hyperparameter draws (``hparams_seeds``) and of trials (``trial_seeds``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DomainGradError
from ..layout import ATTEMPT_HEADER, DONE, ERR, FAILED, LOCK, JobState
from ..rng import seed_hash

#: train arguments fixed by the sweep for every job (not part of the hashed args)
JOB_FIXED_ARGS = {"progress": False}


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep covers; defaults are DomainBed's ``sweep.py`` defaults.

    Attributes:
        datasets, algorithms: registered names.
        test_envs: restrict to jobs whose test environments include one of these
            (None: every environment).
        single_test_envs: one test environment per job; otherwise also every pair of
            test environments (DomainBed; leave-one-domain-out selection needs them).
        n_hparams_from, n_hparams: hyperparameter draws ``range(n_hparams_from, n_hparams)``.
        hparams_seeds: explicit draws, replacing the range.
        n_trials / trial_seeds: trials ``range(n_trials)`` or an explicit list.
        hparams: fixed hyperparameters (JSON text) applied to every job.
        steps, checkpoint_freq: None means the dataset's defaults.
        data_dir: data root (None: the embedded digits); made absolute.
        holdout_fraction: DomainBed's out-split fraction.
        task: DomainBed's task name.
        train_options: further :class:`domaingrad.run.TrainArgs` fields for every job
            (``weights``, ``image_size``, ``split_protocol``, ``class_map``,
            ``corrupt_images``, ``clean_eval``); like ``steps``, part of the job hash only when given, so
            job names stay DomainBed's otherwise.
    """

    datasets: tuple[str, ...]
    algorithms: tuple[str, ...]
    test_envs: tuple[int, ...] | None = None
    single_test_envs: bool = False
    n_hparams_from: int = 0
    n_hparams: int = 20
    hparams_seeds: tuple[int, ...] | None = None
    n_trials: int = 3
    trial_seeds: tuple[int, ...] | None = None
    hparams: str | None = None
    steps: int | None = None
    checkpoint_freq: int | None = None
    data_dir: str | None = None
    holdout_fraction: float = 0.2
    task: str = "domain_generalization"
    train_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One training run of a sweep.

    Attributes:
        id: the directory name, md5 of ``hashed_args`` (DomainBed's ``args_hash``).
        args: every :class:`domaingrad.run.TrainArgs` field the job runs with
            (``output_dir`` = ``SWEEP_DIR/id``).
    """

    id: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return Path(self.args["output_dir"])

    def describe(self) -> str:
        a = self.args
        return (
            f"{a['dataset']} {a['algorithm']} test_envs={a['test_envs']} "
            f"hparams_seed={a['hparams_seed']} trial_seed={a['trial_seed']}"
        )


def num_environments(dataset: str) -> int:
    """Number of environments of a dataset (its ``ENVIRONMENTS``), without loading it.

    Raises:
        DomainGradError: for an unknown dataset name, or a dataset class listing no
            environments.
    """
    from ..data import dataset_class

    n_envs = len(dataset_class(dataset).ENVIRONMENTS)
    if n_envs == 0:
        raise DomainGradError(
            f"dataset {dataset} lists no environments (its class attribute ENVIRONMENTS); a sweep "
            "counts them from it, without loading the data, to make its jobs"
        )
    return n_envs


def env_sets_to_test(n_envs: int, single: bool, only: Sequence[int] | None = None) -> list[list[int]]:
    """Test environments of the jobs, in DomainBed's order.

    DomainBed's ``all_test_env_combinations``: ``[i]`` then every ``[i, j]``, j > i; with
    ``single`` only ``[i]``. With ``only``, the combinations that contain a listed
    environment (so leave-one-domain-out still finds every pair it needs).

    Raises:
        DomainGradError: an environment index out of range, or pairs asked of a dataset
            with fewer than 3 environments.
    """
    if only is not None:
        bad = [e for e in only if not 0 <= e < n_envs]
        if bad:
            raise DomainGradError(
                f"--test-envs {bad} out of range: the dataset has {n_envs} environments (0..{n_envs - 1})"
            )
    if not single and n_envs < 3:
        raise DomainGradError(
            f"pairs of test environments need at least 3 environments (got {n_envs}); use --single-test-envs"
        )
    combos = []
    for i in range(n_envs):
        combos.append([i])
        if not single:
            combos += [[i, j] for j in range(i + 1, n_envs)]
    if only is not None:
        combos = [c for c in combos if set(c) & set(only)]
    return combos


def job_id(hashed_args: dict[str, Any]) -> str:
    """DomainBed's job directory name: md5 of the args as sorted JSON."""
    return hashlib.md5(json.dumps(hashed_args, sort_keys=True).encode("utf-8")).hexdigest()


def make_jobs(spec: SweepSpec, sweep_dir: str | os.PathLike) -> list[Job]:
    """Every job of ``spec``, in DomainBed's order (trial, dataset, algorithm, test envs, hparams).

    ``seed`` is DomainBed's ``seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)``.

    Raises:
        DomainGradError: unknown dataset or algorithm, bad test environments.
    """
    from ..algorithms import algorithm_class

    for algorithm in spec.algorithms:
        algorithm_class(algorithm)
    sweep_dir = Path(sweep_dir).absolute()
    hparams_seeds = (
        list(spec.hparams_seeds) if spec.hparams_seeds is not None else list(range(spec.n_hparams_from, spec.n_hparams))
    )
    trials = list(spec.trial_seeds) if spec.trial_seeds is not None else list(range(spec.n_trials))
    data_dir = None if spec.data_dir is None else os.path.abspath(spec.data_dir)
    combos = {d: env_sets_to_test(num_environments(d), spec.single_test_envs, spec.test_envs) for d in spec.datasets}
    jobs = []
    for trial_seed in trials:
        for dataset in spec.datasets:
            for algorithm in spec.algorithms:
                for test_envs in combos[dataset]:
                    for hparams_seed in hparams_seeds:
                        hashed = {
                            "dataset": dataset,
                            "algorithm": algorithm,
                            "test_envs": test_envs,
                            "holdout_fraction": spec.holdout_fraction,
                            "hparams_seed": hparams_seed,
                            "data_dir": data_dir,
                            "task": spec.task,
                            "trial_seed": trial_seed,
                            "seed": seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed),
                        }
                        for name in ("steps", "hparams", "checkpoint_freq"):
                            if getattr(spec, name) is not None:
                                hashed[name] = getattr(spec, name)
                        hashed.update({k: v for k, v in spec.train_options.items() if v is not None})
                        jobs.append(_job(hashed, sweep_dir))
    return jobs


def _job(hashed: dict[str, Any], sweep_dir: Path) -> Job:
    from ..run import TrainArgs

    name = job_id(hashed)
    fields = set(TrainArgs.__dataclass_fields__)
    args = {k: v for k, v in hashed.items() if k in fields}
    args.update(JOB_FIXED_ARGS, output_dir=str(sweep_dir / name))
    return Job(name, {**asdict(TrainArgs()), **args})


def lock_is_held(job_dir: Path) -> bool:
    """Whether some process holds the job's lock (i.e. is running it)."""
    try:
        fd = os.open(job_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return True
        raise
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def job_state(job_dir: Path) -> JobState:
    """The state of one job directory (DomainBed: ``done`` file, else directory exists)."""
    if (job_dir / DONE).exists():
        return JobState.DONE
    if not job_dir.exists():
        return JobState.NOT_LAUNCHED
    if lock_is_held(job_dir):
        return JobState.RUNNING
    if (job_dir / FAILED).exists():
        return JobState.FAILED
    return JobState.INCOMPLETE


def err_tail(job_dir: Path, lines: int = 8) -> str:
    """The last ``lines`` lines of the last attempt's stderr (``err.txt``)."""
    path = job_dir / ERR
    if not path.exists():
        return ""
    text = path.read_text(errors="replace")
    last = text.rsplit(ATTEMPT_HEADER, 1)[-1].split("\n", 1)[-1] if ATTEMPT_HEADER in text else text
    return "\n".join(last.rstrip("\n").splitlines()[-lines:])


def iter_states(jobs: Sequence[Job]) -> Iterator[tuple[Job, JobState]]:
    for job in jobs:
        yield job, job_state(job.output_dir)


def check_spec(spec) -> None:
    """Refuse a spec that would give no job or jobs that cannot start.

    Raises:
        DomainGradError: naming the flag and what is expected.
    """
    from ..hparams import parse_hparams_json
    from ..registry import resolve_hparams
    from ..run.args import check_task

    if spec.task == "domain_adaptation":
        raise DomainGradError(
            "a sweep's task must be domain_generalization, got 'domain_adaptation': sweeps have no "
            "--uda-holdout-fraction; run domain adaptation with `domaingrad train --task domain_adaptation "
            "--uda-holdout-fraction F` and an algorithm that uses unlabelled data"
        )
    check_task(spec.task, 0.0)  # an unknown task name
    if spec.hparams_seeds is None and not 0 <= spec.n_hparams_from < spec.n_hparams:
        raise DomainGradError(
            f"--n-hparams-from {spec.n_hparams_from} --n-hparams {spec.n_hparams} gives no "
            "draw; need 0 <= n_hparams_from < n_hparams"
        )
    if spec.trial_seeds is None and spec.n_trials < 1:
        raise DomainGradError(f"--n-trials must be at least 1, got {spec.n_trials}")
    for name in ("hparams_seeds", "trial_seeds"):
        if any(v < 0 for v in getattr(spec, name) or ()):
            raise DomainGradError(f"--{name.replace('_', '-')} must be non-negative integers")
    for name in ("steps", "checkpoint_freq"):
        if getattr(spec, name) is not None and getattr(spec, name) < 1:
            raise DomainGradError(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0 < spec.holdout_fraction < 1:
        raise DomainGradError(f"--holdout-fraction must be in (0, 1), got {spec.holdout_fraction}")
    overrides = parse_hparams_json(spec.hparams)
    for dataset in spec.datasets:
        for algorithm in spec.algorithms:
            resolve_hparams(algorithm, dataset, 0, 0, overrides)


def hparams_of_run(run_dir: str) -> str:
    """The hyperparameters of a finished run as JSON text (its last results.jsonl record).

    Raises:
        DomainGradError: no done run or no readable record there.
    """
    import json
    from pathlib import Path

    from ..layout import DONE, RESULTS, read_results

    path = Path(run_dir)
    records, _ = read_results(path / RESULTS)
    if not (path / DONE).exists() or not records or "hparams" not in records[-1]:
        raise DomainGradError(
            f"--hparams-from {run_dir}: expected a finished run directory (with 'done' and "
            f"{RESULTS} records holding 'hparams')"
        )
    return json.dumps(records[-1]["hparams"], sort_keys=True)
