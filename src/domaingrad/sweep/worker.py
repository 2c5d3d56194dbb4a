"""The process that runs one sweep job: ``python -m domaingrad.sweep.worker ARGS_JSON --threads N``.

``ARGS_JSON`` holds the job's train arguments as the manifest lists them; a user's
algorithm or dataset travels there as its ``package.module:Class`` spec and is imported
here (the module must be importable in this process: installed, or on ``PYTHONPATH``,
which job processes inherit).

Every launcher starts each job as this fresh Python process, so a job sees the same
process state (torch thread count, RNGs, imports) whichever launcher ran it, and the
results are bit-identical across launchers. The process holds an exclusive ``flock`` on
``JOB_DIR/lock`` while it runs (:func:`domaingrad.layout.acquire_lock`; the training run
it starts in the same process takes the same lock re-entrantly): a second process given
the same job (a relaunch while an orphan still runs, two launches at once) exits with
:data:`EXIT_RUNNING_ELSEWHERE` instead of writing into the same directory, and
``domaingrad sweep status`` shows the job as running.

Exit codes: 0 done (or already done), 1 crash or non-finite loss, 2 bad arguments
(DomainGradError), 75 running elsewhere, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

# the lock helpers live in the layout, which the training run also uses (re-exported here)
from ..layout import LOCK_WAIT_SECONDS, acquire_lock

__all__ = ["EXIT_RUNNING_ELSEWHERE", "LOCK_WAIT_SECONDS", "acquire_lock", "main", "run"]

EXIT_RUNNING_ELSEWHERE = 75


def run(args: dict, threads: int) -> int:
    """Run one job's training in this process; returns the exit code."""
    from ..layout import DONE, FAILED

    job_dir = Path(args["output_dir"])
    lock = acquire_lock(job_dir)
    if lock is None:
        print(
            f"domaingrad sweep: job {job_dir.name} is being run by another process (its lock is held); "
            "not starting it twice",
            file=sys.stderr,
        )
        return EXIT_RUNNING_ELSEWHERE
    if (job_dir / DONE).exists():
        print(f"domaingrad sweep: job {job_dir.name} is already done", file=sys.stderr)
        return 0
    (job_dir / FAILED).unlink(missing_ok=True)

    import torch

    torch.set_num_threads(threads)
    from ..errors import DomainGradError, report_error
    from ..run import TrainArgs, train

    try:
        with open(os.devnull, "w") as quiet:  # out.txt holds the same lines
            train(TrainArgs.from_dict(args), stream=quiet)
    except KeyboardInterrupt:
        print("domaingrad: interrupted; relaunch the sweep to resume from the last checkpoint", file=sys.stderr)
        return 130
    except DomainGradError as exc:
        return report_error(exc)
    except Exception:  # noqa: BLE001 - any crash is reported by the sweep, with its traceback
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m domaingrad.sweep.worker")
    parser.add_argument("args_json", help="the job's TrainArgs fields as a JSON object")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ns = parser.parse_args(argv)
    return run(json.loads(ns.args_json), ns.threads)


if __name__ == "__main__":
    sys.exit(main())
