"""Starting one job as a fresh Python process and collecting its outcome (all launchers).

The job process (:mod:`domaingrad.sweep.worker`) gets a fixed torch thread count
through ``--threads`` and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, its stdout goes
nowhere (``out.txt`` holds the same log) and its stderr is appended to
``JOB_DIR/err.txt`` after a header line per attempt. On Linux the process is killed
when the process that started it dies (``PR_SET_PDEATHSIG``), so killing the sweep
leaves no job running behind; the job's lock covers other systems.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from ..layout import ATTEMPT_HEADER, DONE, ERR, FAILED
from .jobs import Job, err_tail
from .worker import EXIT_RUNNING_ELSEWHERE

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class JobOutcome:
    """What became of one launched job.

    Attributes:
        id: the job's directory name.
        returncode: the job process's exit code (negative: killed by that signal;
            None: the launcher lost the job, see ``error``).
        seconds: wall time of the attempt.
        done: the job directory holds ``done``.
        error: the tail of the attempt's stderr when it failed, else "".
    """

    id: str
    returncode: int | None
    seconds: float
    done: bool
    error: str = ""

    @property
    def running_elsewhere(self) -> bool:
        return self.returncode == EXIT_RUNNING_ELSEWHERE

    @property
    def failed(self) -> bool:
        return not self.done and not self.running_elsewhere


def job_command(job: Job, threads: int) -> list[str]:
    """The command line of a job process."""
    return [sys.executable, "-m", "domaingrad.sweep.worker", json.dumps(job.args), "--threads", str(threads)]


def job_env(threads: int) -> dict[str, str]:
    """The environment of a job process: ours with the thread counts fixed."""
    env = dict(os.environ)
    env.update({name: str(threads) for name in THREAD_ENV})
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class StartedJob:
    """A job process that is running."""

    job: Job
    process: subprocess.Popen
    err: IO[bytes]
    start: float

    def finish(self, interrupted: bool = False) -> JobOutcome:
        """Collect the exit code (waits for it); marks the job failed unless ``interrupted``."""
        code = self.process.wait()
        self.err.close()
        return collect_outcome(self.job, code, time.monotonic() - self.start, interrupted)


def start_job(job: Job, threads: int) -> StartedJob:
    """Start the job's process (creating its directory); returns at once."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    err = open(job.output_dir / ERR, "ab")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    err.write(f"{ATTEMPT_HEADER} {stamp} on {socket.gethostname()} pid {os.getpid()} ===\n".encode())
    err.flush()
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(
        job_command(job, threads),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=job_env(threads),
        preexec_fn=preexec,
    )
    return StartedJob(job, process, err, time.monotonic())


def collect_outcome(job: Job, code: int | None, seconds: float, interrupted: bool = False) -> JobOutcome:
    """The outcome of a finished attempt; writes ``JOB_DIR/failed`` for a failed one.

    An attempt stopped by the user (``interrupted``) or refused because the job runs
    elsewhere is not marked failed.
    """
    done = (job.output_dir / DONE).exists()
    outcome = JobOutcome(job.id, code, seconds, done)
    if not done and code != EXIT_RUNNING_ELSEWHERE:
        outcome.error = err_tail(job.output_dir)
        if not interrupted:
            (job.output_dir / FAILED).write_text(json.dumps({"returncode": code, "time": time.time()}) + "\n")
    return outcome


def run_job(job: Job, threads: int) -> JobOutcome:
    """Run one job to its end in a fresh process (the task that Ray and submitit execute)."""
    started = start_job(job, threads)
    try:
        return started.finish()
    except BaseException:
        started.process.kill()
        started.finish(interrupted=True)
        raise
