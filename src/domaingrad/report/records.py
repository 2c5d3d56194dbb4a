"""Read a sweep directory: every job's results.jsonl records, what is unreadable, what is missing.

Layout (DomainBed's, ``domainbed/scripts/sweep.py``): ``SWEEP_DIR/<job id>/results.jsonl``
(one JSON record per checkpoint) and ``SWEEP_DIR/<job id>/done`` once the job finished.
domaingrad's ``sweep`` also writes ``SWEEP_DIR/sweep.json`` =
``{"version": 1, "jobs": [{"id": "<dir name>", "args": {...}}]}`` listing every launched
job; when present it says which jobs are missing, when absent (DomainBed's own sweep
directories) the sub-directories are all there is.

Nothing here raises on bad content: an unreadable file or line becomes a :class:`Problem`
(path, 1-based line number, what is wrong) and is skipped. DomainBed's ``load_records``
instead stops at the first bad line.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DomainGradError
from .names import count_environments

RESULTS = "results.jsonl"
DONE = "done"
#: written by ``domaingrad sweep`` when a job's last attempt exited with an error (stderr in err.txt)
FAILED = "failed"
MANIFEST = "sweep.json"
#: ``args["split_protocol"]`` of runs using the 70/10/20 per-domain train/validation/test split of
#: Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021, Sec. 4.1
SPLIT_70_10_20 = "70/10/20"
#: ``args`` keys every record needs to be grouped as DomainBed groups them
REQUIRED_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")
#: files that show a directory is a job that started (DomainBed writes out.txt/err.txt first)
_JOB_MARKERS = (RESULTS, DONE, FAILED, "out.txt", "err.txt")


@dataclass(frozen=True)
class Problem:
    """Something in the sweep directory that could not be used; ``line`` is 1-based or None."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


@dataclass
class Job:
    """One job directory (or one job listed in sweep.json whose directory does not exist)."""

    id: str
    path: Path
    done: bool
    failed: bool = False
    n_records: int = 0
    last_step: int | None = None
    args: dict | None = None
    listed: bool = False

    @property
    def state(self) -> str:
        """``done``; ``failed`` (the sweep's ``failed`` marker, no ``done``); ``incomplete``
        (records but no ``done``); or ``not started`` (no record)."""
        if self.done:
            return "done"
        if self.failed:
            return "failed"
        return "incomplete" if self.n_records else "not started"

    def describe(self) -> str:
        """One line: id, state, what the job is (dataset, algorithm, test envs, seeds)."""
        a = self.args or {}
        what = ", ".join(f"{k}={a[k]}" for k in ("dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed")
                         if k in a)
        steps = f", {self.n_records} records up to step {self.last_step}" if self.n_records else ""
        if self.failed and not self.done:
            steps += f"; its error is in {self.path / 'err.txt'}"
        return f"{self.id}: {self.state}{steps}" + (f" ({what})" if what else "")


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
    """

    root: Path
    records: list[dict] = field(default_factory=list)
    records_by_job: dict[str, list[dict]] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    manifest: bool = False
    include_incomplete: bool = False

    def jobs_in_state(self, state: str) -> list[Job]:
        return [j for j in self.jobs if j.state == state]

    def status_lines(self) -> list[str]:
        """Human-readable summary: counts, then every job not done, then every problem."""
        done, failed, incomplete, missing = (self.jobs_in_state(s)
                                             for s in ("done", "failed", "incomplete", "not started"))
        source = "sweep.json and the job directories" if self.manifest else "the job directories (no sweep.json)"
        lines = [f"{len(self.records)} records used from {self.root}; jobs from {source}: "
                 f"{len(done)} done, {len(failed)} failed, {len(incomplete)} incomplete, {len(missing)} not started"]
        if failed:
            lines.append("failed jobs (their records are left out unless --latest):")
            lines += [f"  {j.describe()}" for j in failed]
        if incomplete:
            how = ("their records so far are included (--latest)" if self.include_incomplete else
                   "their records are left out; --latest includes them up to their latest checkpoint, "
                   "as DomainBed's collect_results does")
            lines.append(f"incomplete jobs (no `done` file; {how}):")
            lines += [f"  {j.describe()}" for j in incomplete]
        if missing:
            lines.append("jobs without any record (not started, crashed early, or deleted):")
            lines += [f"  {j.describe()}" for j in missing]
        if self.problems:
            lines.append(f"{len(self.problems)} unreadable entries skipped:")
            lines += [f"  {p}" for p in self.problems]
        return lines


def record_error(record: object) -> str | None:
    """Why a parsed JSON value is not a usable results.jsonl record, or None if it is.

    A usable record is a JSON object with a finite numeric ``step``, ``args`` holding
    :data:`REQUIRED_ARGS` (``test_envs`` a non-empty list of environment indices) and
    numeric ``env{i}_in_acc``/``env{i}_out_acc`` for every environment ``i`` (and
    ``env{i}_test_acc`` when ``args["split_protocol"] == "70/10/20"``).
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
    if (not isinstance(test_envs, list) or not test_envs or len(set(map(repr, test_envs))) != len(test_envs)
            or not all(_is_int(e) and 0 <= e < n_envs for e in test_envs)):
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
    and records lacking DomainBed's keys are returned as problems.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [Problem(path, None, f"cannot read: {exc.strerror or exc}")]
    records, problems = [], []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: possibly cut while being written
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(Problem(path, number, "not UTF-8 text"))
            continue
        except json.JSONDecodeError as exc:
            hint = "truncated last line (no newline at the end)" if last else "not valid JSON"
            problems.append(Problem(path, number, f"{hint}: {exc.msg} (column {exc.colno})"))
            continue
        error = record_error(record)
        if error:
            problems.append(Problem(path, number, f"not a results record: {error}"))
        else:
            records.append(record)
    return records, problems


def read_manifest(root: Path) -> tuple[dict[str, dict] | None, list[Problem]]:
    """sweep.json as {job id: args}, or None when absent or unreadable (then a problem)."""
    path = root / MANIFEST
    if not path.exists():
        return None, []
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("version") != 1:
            raise ValueError(f"unsupported version {content.get('version')!r} (expected 1)")
        return {str(job["id"]): dict(job.get("args") or {}) for job in content["jobs"]}, []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        message = f"unreadable sweep manifest ({exc}); missing jobs cannot be listed, using the job directories"
        return None, [Problem(path, None, message)]


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
        raise DomainGradError(f"sweep directory {root} does not exist or is not a directory; "
                              "expected the directory given to `domaingrad sweep launch` (one sub-directory per job)")
    manifest, problems = read_manifest(root)
    sweep = Sweep(root=root, problems=problems, manifest=manifest is not None, include_incomplete=include_incomplete)
    ids = {p.name for p in root.iterdir() if p.is_dir() and any((p / m).exists() for m in _JOB_MARKERS)}
    ids |= set(manifest or {})
    for job_id in sorted(ids):
        sweep.jobs.append(_read_job(sweep, root / job_id, (manifest or {}).get(job_id), job_id in (manifest or {})))
    return sweep


def _read_job(sweep: Sweep, path: Path, manifest_args: dict | None, listed: bool) -> Job:
    job = Job(id=path.name, path=path, done=(path / DONE).exists(), failed=(path / FAILED).exists(),
              args=manifest_args, listed=listed)
    records: list[dict] = []
    if (path / RESULTS).exists():
        records, problems = read_results(path / RESULTS)
        sweep.problems += problems
    if records:
        job.n_records, job.last_step = len(records), max(r["step"] for r in records)
        job.args = job.args or records[-1]["args"]
        sweep.records_by_job[job.id] = records
        if job.done or sweep.include_incomplete:
            sweep.records += records
    return job
