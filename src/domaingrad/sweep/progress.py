"""The progress view of a running sweep: one tqdm bar over the jobs to run, with the
counts of done, running, failed and left jobs and tqdm's ETA, plus one line per
finished job (and the tail of its stderr when it failed)."""

from __future__ import annotations

import sys
import textwrap
import time
from typing import IO

from tqdm import tqdm

from ..layout import ERR
from .execute import JobOutcome
from .jobs import Job


class SweepProgress:
    """Counts and display of a launch.

    Args:
        n_jobs: jobs this launch runs.
        stream: where the per-job lines go (default stdout).
        bar: show the bar (None: only when stderr is a terminal, tqdm's rule).
    """

    def __init__(
        self, n_jobs: int, stream: IO[str] | None = None, bar: bool | None = None, bar_stream: IO[str] | None = None
    ):
        self.n_jobs = n_jobs
        self.stream = stream or sys.stdout
        self.done = self.failed = self.elsewhere = self.running = 0
        self.failures: list[tuple[Job, JobOutcome]] = []
        self.start = time.monotonic()
        self.bar = tqdm(
            total=n_jobs,
            unit="job",
            desc="sweep",
            file=bar_stream or sys.stderr,
            dynamic_ncols=True,
            disable=None if bar is None else not bar,
        )
        self._refresh()

    @property
    def finished_jobs(self) -> int:
        return self.done + self.failed + self.elsewhere

    def eta_seconds(self) -> float | None:
        """Seconds until every job has finished at the rate so far (None before the first)."""
        if not self.finished_jobs:
            return None
        return (time.monotonic() - self.start) / self.finished_jobs * (self.n_jobs - self.finished_jobs)

    @property
    def left(self) -> int:
        return self.n_jobs - self.done - self.failed - self.elsewhere - self.running

    def set_running(self, n: int) -> None:
        if n != self.running:
            self.running = n
            self._refresh()

    def finished(self, job: Job, outcome: JobOutcome) -> None:
        """Count a finished attempt and print its line."""
        self.running = max(0, self.running - 1)
        if outcome.done:
            self.done += 1
            status = "done"
        elif outcome.running_elsewhere:
            self.elsewhere += 1
            status = "skipped (running elsewhere)"
        else:
            self.failed += 1
            self.failures.append((job, outcome))
            status = f"FAILED (exit {outcome.returncode})"
        line = (
            f"[{self.finished_jobs}/{self.n_jobs}] {status}: {job.id} {job.describe()} "
            f"({outcome.seconds:.1f} s; running {self.running}, left {self.left}, "
            f"ETA {_clock(self.eta_seconds())})"
        )
        if outcome.failed:
            line += f"\n  last lines of {job.output_dir / ERR}:\n" + textwrap.indent(outcome.error or "(empty)", "    ")
        tqdm.write(line, file=self.stream)
        self.bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix_str(
            f"done {self.done} | running {self.running} | failed {self.failed} | left {self.left}", refresh=True
        )

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
