"""The manifest, job states, status and delete-incomplete (no training)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from domaingrad.errors import DomainGradError
from domaingrad.layout import JobState
from domaingrad.sweep.jobs import SweepSpec, job_state, make_jobs
from domaingrad.sweep.manifest import manifest_jobs, merge_manifest
from domaingrad.sweep.worker import EXIT_RUNNING_ELSEWHERE

FLAGS = [
    "--datasets",
    "ColoredMNIST",
    "--algorithms",
    "ERM",
    "--single-test-envs",
    "--n-hparams",
    "2",
    "--n-trials",
    "1",
    "--steps",
    "3",
]


def spec(**kw) -> SweepSpec:
    base = dict(
        datasets=("ColoredMNIST",), algorithms=("ERM",), single_test_envs=True, n_hparams=2, n_trials=1, steps=3
    )
    return SweepSpec(**{**base, **kw})


def test_manifest_merges_and_never_drops_entries(tmp_path):
    first = make_jobs(spec(), tmp_path)  # 3 envs x 2 draws
    assert [j.id for j in merge_manifest(tmp_path, first)] == [j.id for j in first]
    more = make_jobs(spec(n_trials=2), tmp_path)  # the same 6 and 6 new
    merged = merge_manifest(tmp_path, more)
    assert len(merged) == 12 and [j.id for j in merged[:6]] == [j.id for j in first]
    merge_manifest(tmp_path, first[:1])  # a smaller launch drops nothing
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["version"] == 1
    assert [e["id"] for e in data["jobs"]] == [j.id for j in merged]
    assert data["jobs"][7]["args"] == more[7].args
    assert {e["args"]["trial_seed"] for e in data["jobs"]} == {0, 1}


def test_unreadable_manifest_is_refused_and_left_untouched(tmp_path, run_cli):
    (tmp_path / "sweep.json").write_text('{"version": 1, "jobs": [')
    with pytest.raises(DomainGradError, match="cannot read the sweep manifest"):
        merge_manifest(tmp_path, make_jobs(spec(), tmp_path))
    code, _, err = run_cli("sweep", "status", "--output-dir", tmp_path)
    assert code == 2 and "cannot read the sweep manifest" in err
    assert (tmp_path / "sweep.json").read_text() == '{"version": 1, "jobs": ['


def make_states(tmp_path):
    """Five job directories, one in each state; returns (jobs, the open fd holding one lock)."""
    jobs = make_jobs(spec(), tmp_path)[:5]
    merge_manifest(tmp_path, jobs)
    not_launched, incomplete, failed, running, done = jobs
    for job in jobs[1:]:
        job.output_dir.mkdir()
        (job.output_dir / "results.jsonl").write_text('{"step": 0}\n')
    (failed.output_dir / "failed").write_text('{"returncode": 1}')
    (failed.output_dir / "err.txt").write_text(
        "=== domaingrad sweep attempt 1 ===\nold error\n"
        "=== domaingrad sweep attempt 2 ===\nTraceback\nValueError: boom\n"
    )
    (done.output_dir / "done").write_text("done")
    fd = os.open(running.output_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return jobs, fd


def test_job_states_and_status_output(tmp_path, run_cli):
    jobs, fd = make_states(tmp_path)
    try:
        assert [job_state(j.output_dir) for j in jobs] == [
            JobState.NOT_LAUNCHED,
            JobState.INCOMPLETE,
            JobState.FAILED,
            JobState.RUNNING,
            JobState.DONE,
        ]
        code, out, err = run_cli("sweep", "status", "--output-dir", tmp_path)  # jobs from sweep.json
        assert code == 0, err
        assert "5 jobs: 1 not launched, 1 incomplete, 1 failed, 1 running, 1 done" in out
        assert f"failed       {jobs[2].id}" in out and "ValueError: boom" in out
        assert "old error" not in out  # only the last attempt's stderr
        assert f"running      {jobs[3].id}" in out
        code, out, _ = run_cli("sweep", "status", "--output-dir", tmp_path, *FLAGS)  # jobs from the flags
        assert "6 jobs: 2 not launched, 1 incomplete, 1 failed, 1 running, 1 done" in out
    finally:
        os.close(fd)
    assert job_state(jobs[3].output_dir) is JobState.INCOMPLETE


def test_delete_incomplete_keeps_done_and_running_jobs(tmp_path, run_cli, monkeypatch):
    jobs, fd = make_states(tmp_path)
    done_files = {p.name: p.read_bytes() for p in jobs[4].output_dir.iterdir()}
    try:
        monkeypatch.setattr("builtins.input", lambda prompt: "n")
        code, out, _ = run_cli("sweep", "delete-incomplete", "--output-dir", tmp_path)
        assert code == 0 and "About to delete 2" in out and "Nevermind" in out
        assert all(j.output_dir.exists() for j in jobs[1:])

        monkeypatch.setattr("builtins.input", lambda prompt: (_ for _ in ()).throw(EOFError))
        code, _, err = run_cli("sweep", "delete_incomplete", "--output_dir", tmp_path)
        assert code == 2 and "--skip-confirmation" in err
        assert all(j.output_dir.exists() for j in jobs[1:])

        code, out, _ = run_cli("sweep", "delete-incomplete", "--output-dir", tmp_path, "--yes")
        assert code == 0 and "Deleted 2 job directories" in out
    finally:
        os.close(fd)
    assert not jobs[1].output_dir.exists() and not jobs[2].output_dir.exists()
    assert jobs[3].output_dir.exists()  # running: kept
    assert {p.name: p.read_bytes() for p in jobs[4].output_dir.iterdir()} == done_files
    assert len(manifest_jobs(tmp_path)) == 5  # the manifest still lists all


def test_a_job_already_running_is_not_started_twice(tmp_path):
    job = make_jobs(spec(), tmp_path)[0]
    job.output_dir.mkdir(parents=True)
    fd = os.open(job.output_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "domaingrad.sweep.worker", json.dumps(job.args)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert result.returncode == EXIT_RUNNING_ELSEWHERE
    assert "being run by another process" in result.stderr
    assert sorted(p.name for p in job.output_dir.iterdir()) == ["lock"]


def test_launch_without_jobs_to_run_only_updates_the_manifest(tmp_path, run_cli):
    jobs, fd = make_states(tmp_path)
    os.close(fd)
    for job in jobs:
        job.output_dir.mkdir(exist_ok=True)
        (job.output_dir / "done").write_text("done")
    code, out, _ = run_cli(
        "sweep",
        "launch",
        "--output-dir",
        tmp_path,
        "--datasets",
        "ColoredMNIST",
        "--algorithms",
        "ERM",
        "--single-test-envs",
        "--test-envs",
        "0",
        "1",
        "--n-hparams",
        "2",
        "--n-trials",
        "1",
        "--steps",
        "3",
        "-y",
    )
    assert code == 0
    assert "About to launch 0 jobs" in out
    assert len(manifest_jobs(tmp_path)) == 5  # its 4 jobs are among the 5 listed
