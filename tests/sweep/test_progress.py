"""The progress view: counts of done, running, failed and left jobs, ETA, failure tails."""

from __future__ import annotations

import io

from domaingrad.sweep.execute import JobOutcome
from domaingrad.sweep.jobs import SweepSpec, make_jobs
from domaingrad.sweep.progress import SweepProgress
from domaingrad.sweep.worker import EXIT_RUNNING_ELSEWHERE


def test_progress_counts_eta_and_failure_tail(tmp_path):
    jobs = make_jobs(SweepSpec(("ColoredMNIST",), ("ERM",), single_test_envs=True, n_hparams=2, n_trials=1), tmp_path)
    lines, bar = io.StringIO(), io.StringIO()
    progress = SweepProgress(len(jobs), stream=lines, bar=True, bar_stream=bar)
    assert progress.eta_seconds() is None
    progress.set_running(2)
    assert "done 0 | running 2 | failed 0 | left 4" in bar.getvalue()
    progress.finished(jobs[0], JobOutcome(jobs[0].id, 0, 3.0, done=True))
    progress.set_running(2)
    progress.finished(jobs[1], JobOutcome(jobs[1].id, 1, 1.5, done=False, error="Traceback\nValueError: boom"))
    progress.finished(jobs[2], JobOutcome(jobs[2].id, EXIT_RUNNING_ELSEWHERE, 0.1, done=False))
    progress.set_running(1)
    assert (progress.done, progress.failed, progress.elsewhere, progress.running, progress.left) == (1, 1, 1, 1, 2)
    assert "done 1 | running 1 | failed 1 | left 2" in bar.getvalue()
    assert 0 <= progress.eta_seconds() < 60
    progress.close()
    text = lines.getvalue()
    assert f"[1/6] done: {jobs[0].id} ColoredMNIST ERM test_envs=[0] hparams_seed=0 trial_seed=0 (3.0 s;" in text
    assert f"[2/6] FAILED (exit 1): {jobs[1].id}" in text and "    ValueError: boom" in text
    assert f"[3/6] skipped (running elsewhere): {jobs[2].id}" in text
    assert "ETA 0:00:0" in text
    assert [job.id for job, _ in progress.failures] == [jobs[1].id]
