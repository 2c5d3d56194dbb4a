"""Read a sweep directory: every job's results.jsonl records, what is unreadable, what is missing.

Layout (DomainBed's, ``domainbed/scripts/sweep.py``; see :mod:`domaingrad.layout`):
``SWEEP_DIR/<job id>/results.jsonl`` (one JSON record per checkpoint) and
``SWEEP_DIR/<job id>/done`` once the job finished. domaingrad's ``sweep`` also writes
``SWEEP_DIR/sweep.json`` listing every launched job; when present it says which jobs are
missing, when absent (DomainBed's own sweep directories) the sub-directories are all
there is. Files are read by :func:`domaingrad.layout.read_results` and
:func:`domaingrad.layout.read_manifest`, the readers ``domaingrad sweep`` uses too, and
job states are :class:`domaingrad.layout.JobState`, as ``domaingrad sweep status`` names
them.

Nothing here raises on bad content: an unreadable file or line becomes a :class:`Problem`
(path, 1-based line number, what is wrong) and is skipped. DomainBed's ``load_records``
instead stops at the first bad line.

What would silently change the numbers becomes a :class:`Flag` that the report prints on
stderr and writes into every output format: a ``done`` job without a usable record (its
cells average fewer trials) and a step recorded twice by one run (counted once: the last
record of that step is kept, where DomainBed's ``load_records`` keeps both).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DomainGradError
from ..layout import DONE, ERR, JOB_MARKERS, RESULTS, SPLIT_70_10_20, JobState, ManifestError, Problem, read_manifest
from ..layout import read_results as _read_lines
from ..sweep.jobs import job_state
from .names import count_environments

#: ``args`` keys every record needs to be grouped as DomainBed groups them
REQUIRED_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")


@dataclass(frozen=True)
class Flag:
    """Something about the records used that changes or limits the report's numbers.

    Printed on stderr (``warning:`` or ``note:``, by ``level``) and written into every
    output format (Markdown/LaTeX notes, CSV ``notes`` rows, the JSON ``flags`` list).

    Attributes:
        kind: what it is about: ``empty_done_jobs``, ``duplicate_steps``, ``mixed_args``,
            ``no_single_test_env`` or ``loo_missing_pairs``.
        message: the sentence shown to the user.
        jobs: the job directories (names under the sweep directory) concerned.
        level: ``warning`` (numbers changed or lost) or ``note`` (why cells are X).
    """

    kind: str
    message: str
    jobs: tuple[str, ...] = ()
    level: str = "warning"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "level": self.level, "message": self.message, "jobs": list(self.jobs)}


@dataclass
class JobResults:
    """What the report read of one job: its directory (or its sweep.json entry when the
    directory does not exist), state and records.

    Attributes:
        id: the job directory's name.
        path: the job directory.
        state: as ``domaingrad sweep status`` names it (``not launched``: listed in
            sweep.json, no directory).
        n_records, last_step: how many usable records, up to which step.
        args: the job's train arguments (sweep.json's, else its last record's).
        listed: whether sweep.json lists it.
        repeated_steps: step -> how many records of one run had that step (only steps
            recorded more than once; the last of them is used).
    """

    id: str
    path: Path
    state: JobState
    n_records: int = 0
    last_step: int | None = None
    args: dict | None = None
    listed: bool = False
    repeated_steps: dict[float, int] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state is JobState.DONE

    def describe(self) -> str:
        """One line: id, state, what the job is (dataset, algorithm, test envs, seeds)."""
        a = self.args or {}
        what = ", ".join(
            f"{k}={a[k]}" for k in ("dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed") if k in a
        )
        if self.n_records:
            steps = f", {self.n_records} records up to step {self.last_step}"
        else:
            steps = ", no record yet" if self.state in (JobState.INCOMPLETE, JobState.RUNNING) else ""
        if self.state is JobState.FAILED:
            steps += f"; its error is in {self.path / ERR}"
        return f"{self.id}: {self.state.value}{steps}" + (f" ({what})" if what else "")


@dataclass
class Sweep:
    """Everything read from a sweep directory.

    Attributes:
        root: the sweep directory.
        records: the records used for reporting, job by job (jobs sorted by id), in file order.
        records_by_job: job id -> its usable records (also those of incomplete jobs).
        jobs: every job seen (directories and sweep.json entries), sorted by id.
        problems: unreadable files and lines, skipped.
        manifest: whether sweep.json was present and readable.
        include_incomplete: whether records of jobs without ``done`` are in ``records``.
        flags: what the report must say about the records (:class:`Flag`): done jobs
            without a usable record, steps recorded twice.
    """

    root: Path
    records: list[dict] = field(default_factory=list)
    records_by_job: dict[str, list[dict]] = field(default_factory=dict)
    jobs: list[JobResults] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manifest: bool = False
    include_incomplete: bool = False
    flags: list[Flag] = field(default_factory=list)

    def job_of(self) -> dict[int, str]:
        """``id(record)`` -> the id of the job whose results.jsonl holds it, for every record read."""
        return {id(r): job_id for job_id, records in self.records_by_job.items() for r in records}

    def jobs_in_state(self, state: JobState | str) -> list[JobResults]:
        """The jobs in ``state`` (a :class:`JobState` or its value, e.g. ``"incomplete"``)."""
        return [j for j in self.jobs if j.state == JobState(state)]

    def status_lines(self) -> list[str]:
        """Human-readable summary: counts, then every job not done, then every problem."""
        by_state = {s: self.jobs_in_state(s) for s in JobState}
        source = "sweep.json and the job directories" if self.manifest else "the job directories (no sweep.json)"
        counts = ", ".join(
            f"{len(by_state[s])} {s.value}"
            for s in (JobState.DONE, JobState.FAILED, JobState.RUNNING, JobState.INCOMPLETE, JobState.NOT_LAUNCHED)
        )
        lines = [f"{len(self.records)} records used from {self.root}; jobs from {source}: {counts}"]
        if by_state[JobState.FAILED]:
            lines.append("failed jobs (their records are left out unless --latest):")
            lines += [f"  {j.describe()}" for j in by_state[JobState.FAILED]]
        unfinished = by_state[JobState.RUNNING] + by_state[JobState.INCOMPLETE]
        if unfinished:
            how = (
                "their records so far are included (--latest)"
                if self.include_incomplete
                else "their records are left out; --latest includes them up to their latest checkpoint, "
                "as DomainBed's collect_results does"
            )
            lines.append(f"running and incomplete jobs (no `done` file; {how}):")
            lines += [f"  {j.describe()}" for j in unfinished]
        if by_state[JobState.NOT_LAUNCHED]:
            lines.append("jobs listed in sweep.json without a directory (not launched, or deleted):")
            lines += [f"  {j.describe()}" for j in by_state[JobState.NOT_LAUNCHED]]
        if self.problems:
            lines.append(f"{len(self.problems)} unreadable entries skipped:")
            lines += [f"  {p}" for p in self.problems]
        return lines


def record_error(record: object) -> str | None:
    """Why a parsed JSON value is not a usable results.jsonl record, or None if it is.

    A usable record is a JSON object with a finite numeric ``step``, ``args`` holding
    :data:`REQUIRED_ARGS` (``test_envs`` a non-empty list of environment indices) and
    numeric ``env{i}_in_acc``/``env{i}_out_acc`` for every environment ``i`` (and
    ``env{i}_test_acc`` when ``args["split_protocol"]`` is
    :data:`domaingrad.layout.SPLIT_70_10_20`).
    """
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    step = record.get("step")
    if not _is_number(step):
        return "no numeric 'step'"
    if isinstance(step, float) and not math.isfinite(step):
        return f"'step' is {step!r}, expected a finite number (the runs' checkpoints are ordered by step)"
    args = record.get("args")
    if not isinstance(args, dict):
        return "no 'args' object"
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        return f"'args' lacks {', '.join(missing)}"
    if not (isinstance(args["dataset"], str) and isinstance(args["algorithm"], str)):
        return "args.dataset and args.algorithm must be strings"
    if not (_is_int(args["trial_seed"]) and (_is_int(args["hparams_seed"]) or isinstance(args["hparams_seed"], str))):
        return "args.trial_seed must be an integer and args.hparams_seed an integer or a string"
    n_envs = count_environments(record)
    if n_envs == 0:
        return "no 'env0_out_acc'"
    test_envs = args["test_envs"]
    if (
        not isinstance(test_envs, list)
        or not test_envs
        or len(set(map(repr, test_envs))) != len(test_envs)
        or not all(_is_int(e) and 0 <= e < n_envs for e in test_envs)
    ):
        return f"args.test_envs = {test_envs!r} is not a non-empty list of distinct indices below {n_envs}"
    kinds = ("in", "out", "test") if args.get("split_protocol") == SPLIT_70_10_20 else ("in", "out")
    bad = [f"env{i}_{k}_acc" for i in range(n_envs) for k in kinds if not _is_number(record.get(f"env{i}_{k}_acc"))]
    if bad:
        return f"missing or non-numeric {', '.join(bad)}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(path: Path) -> tuple[list[dict], list[Problem]]:
    """Parse one results.jsonl: (usable records in file order, problems with line numbers).

    Never raises for content: unreadable files, undecodable, truncated or non-JSON lines
    and records lacking DomainBed's keys (:func:`record_error`) are returned as problems.
    """
    if not path.exists():
        return [], [Problem(path, None, "cannot read: No such file or directory")]
    return _read_lines(path, check=record_error)


def _manifest(root: Path) -> tuple[dict[str, dict] | None, list[Problem]]:
    """sweep.json as {job id: args}, or None when absent or unreadable (then a problem)."""
    try:
        return read_manifest(root), []
    except ManifestError as exc:
        message = f"unreadable sweep manifest ({exc.reason}); missing jobs cannot be listed, using the job directories"
        return None, [Problem(exc.path, None, message)]


def load_sweep(root: str | os.PathLike, include_incomplete: bool = False) -> Sweep:
    """Read every job of a sweep directory.

    Args:
        root: the sweep directory (DomainBed's or domaingrad's).
        include_incomplete: also use records of jobs without ``done`` (DomainBed's
            collect_results always does); otherwise they are only listed as incomplete.

    Raises:
        DomainGradError: if ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise DomainGradError(
            f"sweep directory {root} does not exist or is not a directory; "
            "expected the directory given to `domaingrad sweep launch` (one sub-directory per job)"
        )
    manifest, problems = _manifest(root)
    sweep = Sweep(root=root, problems=problems, manifest=manifest is not None, include_incomplete=include_incomplete)
    ids = {p.name for p in root.iterdir() if p.is_dir() and any((p / m).exists() for m in JOB_MARKERS)}
    ids |= set(manifest or {})
    for job_id in sorted(ids):
        sweep.jobs.append(_read_job(sweep, root / job_id, (manifest or {}).get(job_id), job_id in (manifest or {})))
    sweep.flags += _load_flags(sweep)
    return sweep


def _run_key(record: dict) -> str:
    """What identifies the run a record belongs to within one results.jsonl: all its args."""
    return json.dumps(record["args"], sort_keys=True, default=repr)


def drop_repeated_steps(records: list[dict]) -> tuple[list[dict], dict[float, int]]:
    """Keep one record per (run, step): the LAST one in file order, at its place.

    A step appears twice when a run appended a checkpoint's record and was restarted from
    an earlier checkpoint without truncating results.jsonl (DomainBed's train.py does not
    resume; a copy of two attempts into one file does the same). A run is the records with
    identical ``args`` (a DomainBed job directory holds one).

    Returns:
        (records kept in file order, {step: number of records it had} for repeated steps).
    """
    last: dict[tuple[str, float], int] = {}
    counts: dict[tuple[str, float], int] = {}
    for i, r in enumerate(records):
        key = (_run_key(r), r["step"])
        last[key] = i
        counts[key] = counts.get(key, 0) + 1
    kept = [r for i, r in enumerate(records) if last[(_run_key(r), r["step"])] == i]
    repeated: dict[float, int] = {}
    for (_, step), n in counts.items():
        if n > 1:
            repeated[step] = max(repeated.get(step, 0), n)
    return kept, repeated


def _step_text(step: float) -> str:
    return str(int(step)) if float(step).is_integer() else repr(step)


def _load_flags(sweep: Sweep) -> list[Flag]:
    flags = []
    empty = [j for j in sweep.jobs if j.done and not j.n_records]
    if empty:
        shown = "; ".join(j.describe() for j in empty)
        flags.append(
            Flag(
                "empty_done_jobs",
                f"{len(empty)} job(s) are done but have no usable record in {RESULTS} (empty, missing or "
                f"unreadable), so they are left out and their cells average fewer trials: {shown}. "
                "Rerun them (delete the job directory, or its `done` file, and relaunch the sweep)",
                tuple(j.id for j in empty),
            )
        )
    repeated = [j for j in sweep.jobs if j.repeated_steps]
    if repeated:
        shown = "; ".join(
            f"{j.id}: " + ", ".join(f"step {_step_text(s)} x{n}" for s, n in sorted(j.repeated_steps.items()))
            for j in repeated
        )
        flags.append(
            Flag(
                "duplicate_steps",
                f"{len(repeated)} job(s) record the same step more than once in {RESULTS}; each step is "
                f"counted once, using the LAST record of it: {shown}",
                tuple(j.id for j in repeated),
            )
        )
    return flags


def _read_job(sweep: Sweep, path: Path, manifest_args: dict | None, listed: bool) -> JobResults:
    job = JobResults(id=path.name, path=path, state=job_state(path), args=manifest_args, listed=listed)
    records: list[dict] = []
    if (path / RESULTS).exists():
        records, problems = read_results(path / RESULTS)
        sweep.problems += problems
        records, job.repeated_steps = drop_repeated_steps(records)
    if records:
        job.n_records, job.last_step = len(records), max(r["step"] for r in records)
        job.args = job.args or records[-1]["args"]
        sweep.records_by_job[job.id] = records
        if job.done or sweep.include_incomplete:
            sweep.records += records
    return job


__all__ = [
    "DONE",
    "RESULTS",
    "Flag",
    "REQUIRED_ARGS",
    "SPLIT_70_10_20",
    "JobResults",
    "Problem",
    "Sweep",
    "drop_repeated_steps",
    "load_sweep",
    "read_results",
    "record_error",
]
