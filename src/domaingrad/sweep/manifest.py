"""``SWEEP_DIR/sweep.json``: the list of every job ever launched in a sweep directory.

Format (version 1)::

    {"version": 1, "jobs": [{"id": "<job directory name>", "args": {<TrainArgs fields>}}, ...]}

Launching merges the new jobs into the manifest and never drops an entry, so
``domaingrad report`` can say which jobs of a partial sweep are missing. The file is
replaced atomically; a manifest that cannot be read is never overwritten.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import DomainGradError
from ..run.output import atomic_write_bytes
from .jobs import Job

MANIFEST = "sweep.json"
LOCK = ".sweep.json.lock"
VERSION = 1


def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / MANIFEST


def read_manifest(sweep_dir: str | os.PathLike) -> list[Job]:
    """The jobs listed in ``SWEEP_DIR/sweep.json`` (empty when there is no manifest).

    Raises:
        DomainGradError: the file exists but is not a version-1 manifest.
    """
    path = manifest_path(sweep_dir)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
        return [Job(entry["id"], dict(entry["args"])) for entry in data["jobs"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DomainGradError(f"cannot read the sweep manifest {path} ({exc}); it is left untouched. "
                              "Move it away to start a new manifest.") from exc


def merge_manifest(sweep_dir: str | os.PathLike, jobs: Sequence[Job]) -> list[Job]:
    """Add ``jobs`` to the manifest (entries already listed by id are kept as they are).

    Returns:
        Every job now listed, old ones first.

    Raises:
        DomainGradError: the existing manifest cannot be read.
    """
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two launches into one directory merge in turn
        return _merge(sweep_dir, jobs)


def _merge(sweep_dir: str | os.PathLike, jobs: Sequence[Job]) -> list[Job]:
    listed = read_manifest(sweep_dir)
    known = {job.id for job in listed}
    added = []
    for job in jobs:
        if job.id not in known:
            known.add(job.id)
            added.append(job)
    merged = listed + added
    if added or not manifest_path(sweep_dir).exists():
        data = {"version": VERSION, "jobs": [{"id": job.id, "args": job.args} for job in merged]}
        atomic_write_bytes(manifest_path(sweep_dir), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    return merged
