"""The files of one run's output directory, written so that nothing is lost or duplicated.

Layout (DomainBed-compatible, see :mod:`domaingrad.layout`): ``results.jsonl`` (one JSON
record per checkpoint), ``out.txt`` (human log, appended across resumes),
``checkpoint.pt`` (resume state, removed once the run is done), ``model.pkl`` (final
model, DomainBed's format) and ``done``.

Ordering makes resume exact: at each checkpoint the resume state, which embeds that
checkpoint's record, is written atomically *first*; the record is appended to
results.jsonl *second*. After a kill at any moment, :meth:`RunDirectory.reconcile_results`
rewrites results.jsonl to hold exactly the records up to the saved checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import DomainGradError
from ..layout import CHECKPOINT, DONE, LOG, MODEL, RESULTS, read_results

#: arguments that do not change results, so a resume may differ in them (``output_dir``:
#: a moved or re-spelled directory is still the run's own directory)
RESUME_IGNORED_ARGS = frozenset({"progress", "num_workers", "output_dir"})


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
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


class RunDirectory:
    """One run's output directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def is_done(self) -> bool:
        return self.file(DONE).exists()

    def check_startable(
        self,
        args: dict[str, Any],
        defaults: dict[str, Any] | None = None,
        normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Decide whether a run with ``args`` may start or resume here.

        An argument missing from a saved run's arguments (a run checkpointed by an older
        version) matches when the current value equals its entry in ``defaults``; the
        saved arguments go through ``normalize`` (e.g. older spellings) before the
        comparison.

        Returns:
            The saved resume state when there is one with the same arguments, else None
            (a fresh start).

        Raises:
            DomainGradError: the directory holds a finished run, a run with other
                arguments, or results without resume state (nothing is overwritten).
        """
        if self.path.exists() and not self.path.is_dir():
            raise DomainGradError(f"--output-dir {self.path} exists and is not a directory")
        if self.is_done:
            n = len(read_records(self.file(RESULTS))[0])
            raise DomainGradError(
                f"{self.path} already holds a finished run ('done' marker, {n} records in {RESULTS}); "
                "it is left untouched. Choose another --output-dir, or delete that one yourself."
            )
        checkpoint = self.file(CHECKPOINT)
        if checkpoint.exists():
            try:
                state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
                raise DomainGradError(
                    f"cannot read the resume state {checkpoint} ({exc}); move it away to start the run afresh"
                ) from exc
            saved_args = {**{k: v for k, v in (defaults or {}).items() if k not in state["args"]}, **state["args"]}
            if normalize is not None:
                saved_args = normalize(saved_args)
            differ = sorted(
                k
                for k in set(args) | set(saved_args)
                if k not in RESUME_IGNORED_ARGS and args.get(k) != saved_args.get(k)
            )
            if differ:
                details = "; ".join(f"{k}: saved {saved_args.get(k)!r}, now {args.get(k)!r}" for k in differ)
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
        with open(self.file(RESULTS), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def log(self, line: str) -> None:
        with open(self.file(LOG), "a") as f:
            f.write(line + "\n")
