"""The files of one run's output directory, written so that nothing is lost or duplicated.

Layout (DomainBed-compatible, see :mod:`domaingrad.layout`): ``results.jsonl`` (one JSON
record per checkpoint), ``out.txt`` (human log, appended across resumes),
``checkpoint.pt`` (resume state, removed once the run is done), ``model.pkl`` (final
model, DomainBed's format) and ``done``.

Ordering makes resume exact: at each checkpoint the model file of that step
(``--save-model-every-checkpoint``) is written atomically *first*, the resume state, which
embeds that checkpoint's record, atomically *second*, and the record is appended to
results.jsonl *last*. After a kill at any moment, :meth:`RunDirectory.reconcile_results`
rewrites results.jsonl to hold exactly the records up to the saved checkpoint, and every
model file of a saved checkpoint exists. Temporaries of atomic writes cut by a kill are
removed when the run starts again (:meth:`RunDirectory.remove_stale_files`).

One process at a time: the run holds an exclusive ``flock`` on ``lock`` in its directory
while it runs (:meth:`RunDirectory.locked`); a second process on the same directory is
refused with the PID of the first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import DomainGradError
from ..layout import (
    CHECKPOINT,
    DONE,
    LOCK,
    LOG,
    MODEL,
    RESULTS,
    TMP_SUFFIX,
    acquire_lock,
    is_write_temporary,
    lock_holder,
    read_results,
    release_lock,
)

#: arguments that do not change results, so a resume may differ in them (``output_dir``:
#: a moved or re-spelled directory is still the run's own directory)
RESUME_IGNORED_ARGS = frozenset({"progress", "num_workers", "output_dir"})
#: arguments whose value None means "choose for me" (``--eval-batch-size auto``): None now
#: matches any saved value, and the resumed run keeps the saved one (so a run started by
#: an older version, or with an explicit value, resumes with the same evaluation batches)
RESUME_AUTO_ARGS = frozenset({"eval_batch_size"})


#: below this much free space (bytes) on the run's file system, a failed ``torch.save`` is
#: taken for a full disk: torch reports one as ``RuntimeError`` ("unexpected pos ...",
#: "file write failed"), not as ``OSError(ENOSPC)``
LOW_DISK_BYTES = 256 * 2**20


class DiskFullError(DomainGradError):
    """A run's file could not be written because its file system is full.

    The partial temporary is removed and every file written before is intact, so the
    same command resumes from the last checkpoint once space is freed.

    Attributes:
        path: the file that could not be written.
        free_bytes: free space on its file system when the write failed (bytes).
    """

    def __init__(self, path: Path, free_bytes: int):
        self.path = path
        self.free_bytes = free_bytes
        super().__init__(
            f"no space left on the device to write {path} ({free_bytes / 2**20:.0f} MiB free); "
            "the files written before are intact. Free some space and rerun the same command: "
            "it resumes from the last checkpoint."
        )


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return 0


@contextlib.contextmanager
def _raising_disk_full(path: Path, tmp: Path | None = None) -> Iterator[None]:
    """Turn a write failure of ``path`` on a full file system into :class:`DiskFullError`,
    removing the partial temporary ``tmp``; any other failure propagates unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        free = _free_bytes(path)
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (isinstance(exc, RuntimeError) and free < LOW_DISK_BYTES):
            raise DiskFullError(path, free) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Raises:
        DiskFullError: the file system is full; ``path`` is unchanged.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with _raising_disk_full(path, tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``.

    Raises:
        DiskFullError: the file system is full; ``path`` is unchanged.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with _raising_disk_full(path, tmp):
        torch.save(obj, tmp)
    os.replace(tmp, path)


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a results.jsonl file (:func:`domaingrad.layout.read_results`).

    Returns:
        (records, bad_lines): the parsed records and the 1-based numbers of lines that
        are not complete JSON objects with a ``step`` (e.g. a line cut by a kill).
    """
    records, problems = read_results(path)
    return records, [p.line for p in problems if p.line is not None]


class RunFinishedError(DomainGradError):
    """The output directory holds this very run, finished: nothing to do.

    :func:`domaingrad.run.train` (so ``domaingrad train``) reports it and returns the
    run's last record (exit 0); :func:`domaingrad.run.run_training` raises it.

    Attributes:
        path: the run directory.
        records: the records of its ``results.jsonl`` (at least one).
    """

    def __init__(self, path: Path, records: list[dict]):
        self.path = path
        self.records = records
        model = path / MODEL
        where = f"{len(records)} records in {path / RESULTS}" + (
            f", the final model in {model}" if model.exists() else ""
        )
        super().__init__(
            f"{path} already holds this finished run ({where}); nothing to do. "
            "Choose another --output-dir to train it again."
        )


def differing_args(
    args: dict[str, Any],
    saved: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> str:
    """The arguments in which ``args`` and a saved run's arguments ``saved`` differ, as
    ``"seed: saved 0, now 9; ..."``, or ``""`` when they match.

    An argument missing from ``saved`` (a run written by an older version) matches when
    the current value equals its entry in ``defaults``; ``saved`` goes through
    ``normalize`` (e.g. older spellings) first; :data:`RESUME_IGNORED_ARGS` never count,
    nor does an argument of :data:`RESUME_AUTO_ARGS` that is None now.
    """
    saved_args = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    if normalize is not None:
        saved_args = normalize(saved_args)
    differ = sorted(
        k
        for k in set(args) | set(saved_args)
        if k not in RESUME_IGNORED_ARGS
        and args.get(k) != saved_args.get(k)
        and not (k in RESUME_AUTO_ARGS and args.get(k) is None)
    )
    return "; ".join(f"{k}: saved {saved_args.get(k)!r}, now {args.get(k)!r}" for k in differ)


def _write_error(path: Path, exc: OSError) -> DomainGradError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return DomainGradError(
        f"cannot write the run's files in --output-dir {path}: {reason}{where}. "
        "Choose a directory you can write to, or fix its permissions."
    )


class RunDirectory:
    """One run's output directory.

    Raises:
        DomainGradError: ``path`` is empty (``--output-dir ""`` would write into the
            current directory).
    """

    def __init__(self, path: str | os.PathLike):
        if not str(os.fspath(path)).strip():
            raise DomainGradError(
                "--output-dir is empty; give the directory for the run's files, e.g. --output-dir train_output "
                "(use --output-dir . for the current directory)"
            )
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def is_done(self) -> bool:
        return self.file(DONE).exists()

    def check_writable(self) -> None:
        """Refuse, before anything is written, a directory the run could not write: one
        under a file, one whose nearest existing parent (or itself) is not writable, or an
        unfinished run whose files are not writable.

        Raises:
            DomainGradError: saying which path is the problem and what to do.
        """
        existing = self.path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            what = "exists and is not a directory" if existing == self.path else f"is under the file {existing}"
            raise DomainGradError(f"--output-dir {self.path} {what}; choose a directory path (nothing was written)")
        if self.is_done:
            return  # a finished run is only read
        if not os.access(existing, os.W_OK | os.X_OK):
            problem = "is not writable" if existing == self.path else f"cannot be created: {existing} is not writable"
            raise DomainGradError(
                f"--output-dir {self.path} {problem} (permission denied); choose a directory you can write to, "
                "or fix its permissions (nothing was written)"
            )
        if existing == self.path:
            for name in (RESULTS, LOG, LOCK):
                if self.file(name).exists() and not os.access(self.file(name), os.R_OK | os.W_OK):
                    raise DomainGradError(
                        f"--output-dir {self.path} holds an unfinished run whose {name} is not writable "
                        "(permission denied); fix its permissions to resume it, or choose another --output-dir"
                    )
            if self.file(CHECKPOINT).exists() and not os.access(self.file(CHECKPOINT), os.R_OK):
                raise DomainGradError(
                    f"--output-dir {self.path} holds an unfinished run whose {CHECKPOINT} is not readable "
                    "(permission denied); fix its permissions to resume it, or choose another --output-dir"
                )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (creating the directory) for the ``with`` block.

        Re-entrant in one process (the sweep worker holds it while it runs the training).
        If the block fails and the directory then holds nothing but the lock file this
        created, the directory is removed again when this created it.

        Raises:
            DomainGradError: another process holds the lock (with its PID when it
                recorded one), or the directory or its lock file cannot be written.
        """
        created = not self.path.exists()
        try:
            fd = acquire_lock(self.path)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only if it is still empty
            raise _write_error(self.path, exc) from exc
        if fd is None:
            holder = lock_holder(self.path)
            raise DomainGradError(
                f"--output-dir {self.path} is in use: another process "
                f"({holder or 'it recorded no PID'}) holds its lock {self.file(LOCK)} and is running a training "
                "run there. Wait for it to finish (then rerun the same command, which resumes or reports the "
                "finished run), or choose another --output-dir."
            )
        try:
            yield
        except BaseException:
            if created and [p.name for p in self.path.iterdir()] == [LOCK]:
                with contextlib.suppress(OSError):
                    self.file(LOCK).unlink()
                    self.path.rmdir()
            raise
        finally:
            release_lock(fd)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn an ``OSError`` of the ``with`` block (a write refused, e.g.
        ``PermissionError``) into a :class:`DomainGradError` naming the directory."""
        try:
            yield
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def remove_stale_files(self) -> list[str]:
        """Remove what a kill can leave that no run reads: temporaries of atomic writes
        (``*.tmp`` of the run's files) and, beside ``done``, the resume state of the
        finished run. Call it holding the lock.

        Returns:
            The names removed.
        """
        stale = [p for p in self.path.iterdir() if is_write_temporary(p.name)] if self.path.is_dir() else []
        if self.is_done and self.file(CHECKPOINT).exists():
            stale.append(self.file(CHECKPOINT))
        for path in stale:
            path.unlink(missing_ok=True)
        return sorted(p.name for p in stale)

    def finished_run(
        self,
        args: dict[str, Any],
        defaults: dict[str, Any] | None = None,
        normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> DomainGradError:
        """The error for a finished run here (``done``): :class:`RunFinishedError` when it
        was run with ``args`` (compared as :meth:`check_startable` compares them, with the
        arguments of its last record, else of ``model.pkl``), else a plain refusal.
        Removes the stale files a kill after ``done`` leaves (the resume state, write
        temporaries) when no other process holds the lock."""
        records = read_records(self.file(RESULTS))[0]
        saved = records[-1].get("args") if records else None
        if not isinstance(saved, dict) and self.file(MODEL).exists():
            with contextlib.suppress(Exception):
                saved = torch.load(self.file(MODEL), map_location="cpu", weights_only=False).get("args")
        if not records or not isinstance(saved, dict):
            return DomainGradError(
                f"{self.path} already holds a finished run ('done' marker, {len(records)} records in {RESULTS}) "
                "whose arguments cannot be read; it is left untouched. Choose another --output-dir, or delete "
                "that one yourself."
            )
        details = differing_args(args, saved, defaults, normalize)
        if details:
            return DomainGradError(
                f"{self.path} already holds a finished run ('done' marker, {len(records)} records in {RESULTS}) "
                f"with other arguments ({details}); it is left untouched. Rerun its own command to see it, "
                "choose another --output-dir, or delete that one yourself."
            )
        if any(is_write_temporary(p.name) for p in self.path.iterdir()) or self.file(CHECKPOINT).exists():
            with contextlib.suppress(OSError):
                fd = acquire_lock(self.path, wait=0.0)
                if fd is not None:
                    try:
                        self.remove_stale_files()
                    finally:
                        release_lock(fd)
        return RunFinishedError(self.path, records)

    def check_startable(
        self,
        args: dict[str, Any],
        defaults: dict[str, Any] | None = None,
        normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Decide whether a run with ``args`` may start or resume here.

        The arguments are compared by :func:`differing_args` (``defaults`` fill in those
        a run checkpointed by an older version lacks; ``normalize`` maps older
        spellings).

        Returns:
            The saved resume state when there is one with the same arguments, else None
            (a fresh start).

        Raises:
            RunFinishedError: the directory holds this run, finished (``done``).
            DomainGradError: the directory holds a finished run with other arguments, a
                run with other arguments, or results without resume state (nothing is
                overwritten).
        """
        if self.path.exists() and not self.path.is_dir():
            raise DomainGradError(f"--output-dir {self.path} exists and is not a directory")
        if self.is_done:
            raise self.finished_run(args, defaults, normalize)
        checkpoint = self.file(CHECKPOINT)
        if checkpoint.exists():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
                raise DomainGradError(
                    f"cannot read the resume state {checkpoint} ({exc}); move it away to start the run afresh"
                ) from exc
            details = differing_args(args, state["args"], defaults, normalize)
            if details:
                raise DomainGradError(
                    f"{self.path} holds an unfinished run with other arguments ({details}). "
                    "Rerun the same command to resume it, or choose another --output-dir."
                )
            return state
        for name in (RESULTS, MODEL):
            if self.file(name).exists():
                raise DomainGradError(
                    f"{self.path} holds {name} but no resume state ({CHECKPOINT}); it is not a run "
                    "this command can continue and is left untouched. Choose another --output-dir."
                )
        return None

    def reconcile_results(self, state: dict[str, Any]) -> list[dict]:
        """Make results.jsonl hold exactly the records up to the saved checkpoint.

        Records written after the checkpoint (impossible by the write order, but cheap
        to guard) and lines cut by a kill are dropped; the checkpoint's own record is
        restored from the resume state if the kill came before it was appended.

        Returns:
            The records now in results.jsonl.
        """
        records, _ = read_records(self.file(RESULTS))
        step = state["record"]["step"]
        kept = [r for r in records if r["step"] < step] + [state["record"]]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.file(RESULTS), text.encode())
        return kept

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.file(CHECKPOINT))

    def append_record(self, record: dict[str, Any]) -> None:
        """Append ``record`` to results.jsonl; a line cut by a full disk is dropped on
        resume (:meth:`reconcile_results`), as the checkpoint holds the record."""
        with _raising_disk_full(self.file(RESULTS)), open(self.file(RESULTS), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def log(self, line: str) -> None:
        with _raising_disk_full(self.file(LOG)), open(self.file(LOG), "a") as f:
            f.write(line + "\n")
