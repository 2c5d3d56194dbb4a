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
    lock                 flock-ed by the process running the run; holds its PID and host

A *sweep directory* (DomainBed's ``scripts/sweep.py`` layout) holds one run directory per
job, named by the md5 of the job's arguments, each with two more files written by
``domaingrad sweep``: ``failed`` (the exit status of a failed last attempt) and ``err.txt``
(stderr of every attempt); and ``sweep.json``, the manifest of every job ever launched
there (format below).

Nothing here imports torch: the report reads sweeps without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
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


#: suffix of the temporary file of an atomic write (``NAME.tmp``, then renamed over ``NAME``)
TMP_SUFFIX = ".tmp"
_MODEL_STEP_NAME = re.compile(r"model_step[0-9]+\.pkl")


def is_write_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary of an atomic write of a run's file (e.g.
    ``checkpoint.pt.tmp``, ``model_step40.pkl.tmp``), which a kill mid-write leaves behind."""
    if not name.endswith(TMP_SUFFIX):
        return False
    base = name[: -len(TMP_SUFFIX)]
    return base in (RESULTS, CHECKPOINT, MODEL) or _MODEL_STEP_NAME.fullmatch(base) is not None


#: the run directory's lock file (see :func:`acquire_lock`)
LOCK = "lock"
#: seconds :func:`acquire_lock` retries by default, so that a momentary probe of the lock
#: (``domaingrad sweep status``) is not mistaken for a running process
LOCK_WAIT_SECONDS = 1.0

# -- a sweep's job directory --------------------------------------------------------------
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


# -- the lock of a run directory -----------------------------------------------------------
#: the locks this process holds: (st_dev, st_ino) of the lock file -> the descriptor holding it
_HELD_LOCKS: dict[tuple[int, int], int] = {}


def _file_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _held_here(key: tuple[int, int]) -> bool:
    """Whether this process holds the lock of the lock file ``key`` through the descriptor
    it registered (still open, still that file, still locked)."""
    fd = _HELD_LOCKS.get(key)
    if fd is None:
        return False
    try:
        if _file_key(fd) != key:  # closed without release_lock and the number reused
            raise OSError
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op on the description that holds it
    except OSError:
        del _HELD_LOCKS[key]
        return False
    return True


def acquire_lock(directory: Path, wait: float = LOCK_WAIT_SECONDS) -> int | None:
    """Take the exclusive ``flock`` on ``directory/lock`` (creating both if needed).

    Returns an open descriptor (keep it open while you work; :func:`release_lock` or
    closing it releases the lock), or None when another process holds the lock. Retries
    for ``wait`` seconds, so a momentary probe (``domaingrad sweep status``) is not
    mistaken for a running process. The holder writes ``"PID HOST"`` into the file
    (:func:`lock_holder` reads it).

    Re-entrant within one process: a process that already holds the lock (the sweep
    worker, which runs the training in the same process) gets a second descriptor at
    once; closing that one leaves the first one's lock in place (``flock`` locks belong to
    the open file description, and two descriptions of one file in one process would
    otherwise conflict).

    Raises:
        OSError: the directory or the lock file cannot be created or opened (e.g.
            ``PermissionError``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    key = _file_key(fd)
    if _held_here(key):
        return fd
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)
    _HELD_LOCKS[key] = fd
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # the lock holds without the note; lock_holder then names no process
    return fd


def release_lock(fd: int) -> None:
    """Release a lock taken by :func:`acquire_lock` and close ``fd``; a second descriptor
    of a re-entrant acquisition is only closed (the outer holder keeps the lock)."""
    key = _file_key(fd)
    if _HELD_LOCKS.get(key) == fd:
        del _HELD_LOCKS[key]
    os.close(fd)


def lock_holder(directory: Path) -> str | None:
    """Who holds (or last held) ``directory/lock``, e.g. ``"PID 1234 on node1"``, from the
    note :func:`acquire_lock` writes; None when there is no readable note."""
    try:
        note = (directory / LOCK).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    if not note or not note[0].isdigit():
        return None
    return f"PID {note[0]}" + (f" on {note[1]}" if len(note) > 1 else "")


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
