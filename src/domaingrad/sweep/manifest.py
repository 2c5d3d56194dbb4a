"""``SWEEP_DIR/sweep.json``: the list of every job ever launched in a sweep directory.

Format (version 1, :mod:`domaingrad.layout`)::

    {"version": 1, "jobs": [{"id": "<job directory name>", "args": {<TrainArgs fields>}}, ...]}

Launching merges the new jobs into the manifest and never drops an entry, so
``domaingrad report`` can say which jobs of a partial sweep are missing. The file is
replaced atomically; a manifest that cannot be read is never overwritten.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from ..layout import MANIFEST_LOCK, manifest_bytes, manifest_path, read_manifest
from ..run.output import atomic_write_bytes
from .jobs import Job


def manifest_jobs(sweep_dir: str | os.PathLike) -> list[Job]:
    """The jobs listed in ``SWEEP_DIR/sweep.json``, in file order (empty when there is no
    manifest); read by :func:`domaingrad.layout.read_manifest`.

    Raises:
        ManifestError: the file exists but is not a version-1 manifest.
    """
    return [Job(job_id, args) for job_id, args in (read_manifest(sweep_dir) or {}).items()]


def merge_manifest(sweep_dir: str | os.PathLike, jobs: Sequence[Job]) -> list[Job]:
    """Add ``jobs`` to the manifest (entries already listed by id are kept as they are).

    Returns:
        Every job now listed, old ones first.

    Raises:
        ManifestError: the existing manifest cannot be read.
    """
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / MANIFEST_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two launches into one directory merge in turn
        return _merge(sweep_dir, jobs)


def _merge(sweep_dir: str | os.PathLike, jobs: Sequence[Job]) -> list[Job]:
    listed = manifest_jobs(sweep_dir)
    known = {job.id for job in listed}
    added = []
    for job in jobs:
        if job.id not in known:
            known.add(job.id)
            added.append(job)
    merged = listed + added
    if added or not manifest_path(sweep_dir).exists():
        atomic_write_bytes(manifest_path(sweep_dir), manifest_bytes({job.id: job.args for job in merged}))
    return merged
