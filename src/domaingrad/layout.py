"""The on-disk layout of runs and sweeps, and the split protocols: every file name, marker
and protocol name that more than one layer reads, and the one reader of ``results.jsonl``
and ``sweep.json``.

A *run directory* (DomainBed's ``scripts/train.py`` layout, Gulrajani and Lopez-Paz, "In
Search of Lost Domain Generalization", ICLR 2021, plus domaingrad's resume state)::

    results.jsonl        one JSON record per checkpoint (DomainBed's keys)
    out.txt              the human log, appended across resumes
    checkpoint.pt        the resume state, removed once the run is done
    model.pkl            the final model (DomainBed's keys)
    model_step{N}.pkl    the model at checkpoint N (--save-model-every-checkpoint)
    done                 written last: the run finished

A *sweep directory* (DomainBed's ``scripts/sweep.py`` layout) holds one run directory per
job, named by the md5 of the job's arguments, each with three more files written by
``domaingrad sweep``: ``lock`` (held by the process running the job), ``failed`` (the exit
status of a failed last attempt) and ``err.txt`` (stderr of every attempt); and
``sweep.json``, the manifest of every job ever launched there (format below).

Nothing here imports torch: the report reads sweeps without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from .errors import DomainGradError

# -- a run directory ------------------------------------------------------------------------
RESULTS = "results.jsonl"
LOG = "out.txt"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pkl"
DONE = "done"


def model_step_file(step: int) -> str:
    """The file name of the model saved at checkpoint ``step``, e.g. ``model_step100.pkl``."""
    return f"model_step{step}.pkl"


# -- a sweep's job directory --------------------------------------------------------------
LOCK = "lock"
FAILED = "failed"
ERR = "err.txt"
#: first characters of the header line written to err.txt before each attempt
ATTEMPT_HEADER = "=== domaingrad sweep attempt"
#: files that show a directory is a job that started (DomainBed writes out.txt/err.txt first)
JOB_MARKERS = (RESULTS, DONE, FAILED, LOG, ERR)

# -- a sweep directory ----------------------------------------------------------------------
#: ``{"version": 1, "jobs": [{"id": "<job directory name>", "args": {<train arguments>}}, ...]}``
MANIFEST = "sweep.json"
MANIFEST_LOCK = ".sweep.json.lock"
MANIFEST_VERSION = 1

# -- split protocols ------------------------------------------------------------------------
#: DomainBed's in/out split of every environment by ``holdout_fraction``
SPLIT_DOMAINBED = "domainbed"
#: the per-domain train/validation/test parts of 70%/10%/20% of Mansilla, Echeveste, Milone,
#: Ferrante, "Domain Generalization via Gradient Surgery", ICCV 2021, Section 4.1; runs record
#: ``env{i}_in_acc`` (train part), ``env{i}_out_acc`` (validation part) and ``env{i}_test_acc``
SPLIT_70_10_20 = "70/10/20"
#: every value of ``TrainArgs.split_protocol`` (``--split-protocol``)
SPLIT_PROTOCOLS = (SPLIT_DOMAINBED, SPLIT_70_10_20)


class JobState(str, Enum):
    """The state of one job of a sweep, as ``domaingrad sweep status`` and ``domaingrad
    report`` both name it (DomainBed's ``done`` / ``incomplete`` / ``not launched``, plus
    ``running`` and ``failed``)."""

    NOT_LAUNCHED = "not launched"  # no job directory (listed in sweep.json only)
    INCOMPLETE = "incomplete"  # directory exists, not done, not running, last attempt did not fail
    FAILED = "failed"  # last attempt exited with an error (see err.txt)
    RUNNING = "running"  # a process holds the job's lock
    DONE = "done"


class Problem(NamedTuple):
    """Something on disk that could not be used; ``line`` is 1-based or None."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


def step_record_error(record: object) -> str | None:
    """Why a parsed line is not a results record at all (a JSON object with a ``step``),
    or None; the run's own check when it resumes."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "step" not in record:
        return "no 'step'"
    return None


def read_results(
    path: Path, check: Callable[[Any], str | None] = step_record_error
) -> tuple[list[dict], list[Problem]]:
    """Parse one ``results.jsonl``: (usable records in file order, problems with line numbers).

    Never raises for content: an unreadable file, undecodable, truncated or non-JSON
    lines, and records that ``check`` refuses (it returns why, or None for a usable
    record) are returned as problems and skipped. A missing file gives no record and no
    problem. DomainBed's ``load_records`` instead stops at the first bad line.
    """
    if not path.exists():
        return [], []
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
        error = check(record)
        if error:
            problems.append(Problem(path, number, f"not a results record: {error}"))
        else:
            records.append(record)
    return records, problems


class ManifestError(DomainGradError):
    """``sweep.json`` exists but cannot be read; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot read the sweep manifest {path} ({reason}); it is left untouched. "
            "Move it away to start a new manifest."
        )


def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    """``SWEEP_DIR/sweep.json``."""
    return Path(sweep_dir) / MANIFEST


def read_manifest(sweep_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The jobs listed in ``SWEEP_DIR/sweep.json`` as {job id: train arguments}, in file
    order; None when there is no manifest (e.g. a sweep written by DomainBed).

    Raises:
        ManifestError: the file exists but is not a version-1 manifest.
    """
    path = manifest_path(sweep_dir)
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {content.get('version')!r}, expected {MANIFEST_VERSION}")
        jobs = {}
        for entry in content["jobs"]:
            if not isinstance(entry["id"], str) or not isinstance(entry["args"], dict):
                raise ValueError(f"a job entry needs a string 'id' and an object 'args', got {entry!r:.80}")
            jobs[entry["id"]] = dict(entry["args"])
        return jobs
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(path, str(exc)) from exc


def manifest_bytes(jobs: dict[str, dict[str, Any]]) -> bytes:
    """The content of a ``sweep.json`` listing ``jobs`` ({job id: train arguments})."""
    data = {"version": MANIFEST_VERSION, "jobs": [{"id": i, "args": args} for i, args in jobs.items()]}
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
