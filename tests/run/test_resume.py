"""Resume: a run killed at any moment and restarted ends identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from domaingrad.run.output import read_records

ARGS = [
    "train",
    "--dataset",
    "Debug28",
    "--test-envs",
    "1",
    "--steps",
    "24",
    "--checkpoint-freq",
    "4",
    "--hparams",
    '{"batch_size": 6}',
    "--seed",
    "3",
    "--trial-seed",
    "1",
    "--no-progress",
]
TIMING_KEYS = {"step_time", "mem_gb", "wall_time"}


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "domaingrad", *ARGS, "--output-dir", str(out)]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def run_until_killed(out: Path, n_records: int, extra_delay: float) -> None:
    """Start a run, kill -9 it once results.jsonl holds ``n_records`` lines (+ a delay)."""
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            results = out / "results.jsonl"
            if results.exists() and len(results.read_text().splitlines()) >= n_records:
                time.sleep(extra_delay)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_runs_resume_to_identical_results(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(command(ref), check=True, capture_output=True)
    expected = comparable(read_records(ref / "results.jsonl")[0])
    assert [r["step"] for r in expected] == [0, 4, 8, 12, 16, 20, 23]

    out = tmp_path / "killed"
    run_until_killed(out, 1, 0.0)  # right after a record lands
    run_until_killed(out, 3, 0.15)  # somewhere between checkpoints
    assert not (out / "done").exists()
    done = subprocess.run(command(out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from the checkpoint" in (out / "out.txt").read_text()

    got, bad = read_records(out / "results.jsonl")
    assert bad == []
    assert comparable(got) == [dict(r, args=dict(r["args"], output_dir=str(out))) for r in expected]
    a = torch.load(ref / "model.pkl", weights_only=False)["model_dict"]
    b = torch.load(out / "model.pkl", weights_only=False)["model_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconcile_restores_or_deduplicates_the_checkpoint_record(tmp_path):
    """The three states a kill can leave around the checkpoint of step 4."""
    from domaingrad.run.output import RunDirectory

    rec = [{"step": s, "env0_in_acc": s / 10} for s in (0, 4)]
    line = [json.dumps(r, sort_keys=True) for r in rec]
    state = {"record": rec[1]}
    for written in (
        line[0] + "\n",  # killed before the append
        line[0] + "\n" + line[1][:9],  # killed mid-append
        line[0] + "\n" + line[1] + "\n",
    ):  # killed after the append
        (tmp_path / "results.jsonl").write_text(written)
        kept = RunDirectory(tmp_path).reconcile_results(state)
        assert kept == rec
        assert read_records(tmp_path / "results.jsonl") == (rec, [])
