"""Bad lines are reported by path and line and skipped; missing and incomplete jobs are listed."""

from __future__ import annotations

import json
import math

import pytest

from domaingrad.report.records import load_sweep, read_results
from domaingrad.sweep.jobs import job_state
from tests.report.conftest import make_record, write_job


def test_garbage_and_truncated_lines_are_reported_and_skipped(sweep_dir):
    good = [make_record(s, [0.9] * 3, [0.8] * 3) for s in (0, 100, 200)]
    path = write_job(sweep_dir, "job", []) / "results.jsonl"
    lines = [
        json.dumps(good[0]),
        "not json at all",
        json.dumps(good[1]),
        "",
        json.dumps([1, 2]),
        json.dumps({"step": 5, "args": {"dataset": "ColoredMNIST"}}),
        json.dumps(good[2])[:-1],
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n" + b"\xff\xfe\n" + json.dumps(good[2])[:40].encode())
    records, problems = read_results(path)
    assert [r["step"] for r in records] == [0, 100]
    found = {p.line: p.message for p in problems}
    assert set(found) == {2, 5, 6, 7, 8, 9} and all(p.path == path for p in problems)
    assert found[2].startswith("not valid JSON")
    assert found[5] == "not a results record: expected a JSON object, got list"
    assert "'args' lacks algorithm, test_envs, trial_seed, hparams_seed" in found[6]
    assert found[8] == "not UTF-8 text"
    assert found[9].startswith("truncated last line")
    assert f"{path}:9: truncated last line" in str(problems[-1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"test_envs": [0, 0]}, "not a non-empty list of distinct indices below 3"),
        ({"test_envs": [3]}, "not a non-empty list of distinct indices below 3"),
        ({"test_envs": []}, "not a non-empty list"),
        ({"trial_seed": [0]}, "args.trial_seed must be an integer"),
        ({"algorithm": None}, "args.algorithm must be strings"),
    ],
)
def test_records_that_would_break_grouping_are_refused(sweep_dir, change, message):
    bad = make_record(0, [0.9] * 3, [0.8] * 3)
    bad["args"].update(change)
    no_acc = make_record(0, [0.9] * 3, [0.8] * 3)
    del no_acc["env1_in_acc"]
    write_job(sweep_dir, "job", [make_record(0, [0.9] * 3, [0.8] * 3), bad, no_acc])
    sweep = load_sweep(sweep_dir)
    assert len(sweep.records) == 1 and [p.line for p in sweep.problems] == [2, 3]
    assert message in sweep.problems[0].message and "env1_in_acc" in sweep.problems[1].message


def test_step_must_be_finite_accuracies_may_be_nan(sweep_dir):
    # checkpoints are ordered by step, so a NaN or infinite step is refused; a NaN accuracy (an
    # empty split) is kept, and model selection ranks it as DomainBed does
    nan_acc = make_record(200, [0.9] * 3, [float("nan"), 0.8, 0.8])
    write_job(
        sweep_dir,
        "job",
        [make_record(float("nan"), [0.9] * 3, [0.8] * 3), make_record(float("inf"), [0.9] * 3, [0.8] * 3), nan_acc],
    )
    sweep = load_sweep(sweep_dir)
    assert [r["step"] for r in sweep.records] == [200] and math.isnan(sweep.records[0]["env0_out_acc"])
    why = "expected a finite number (the runs' checkpoints are ordered by step)"
    assert [(p.line, p.message) for p in sweep.problems] == [
        (1, f"not a results record: 'step' is nan, {why}"),
        (2, f"not a results record: 'step' is inf, {why}"),
    ]


def test_unreadable_results_file_is_a_problem_not_a_crash(sweep_dir):
    write_job(sweep_dir, "ok", [make_record(0, [0.9] * 3, [0.8] * 3)])
    (sweep_dir / "broken" / "results.jsonl").mkdir(parents=True)  # a directory where a file should be
    (sweep_dir / "broken" / "done").write_text("")
    sweep = load_sweep(sweep_dir)
    assert len(sweep.records) == 1
    (problem,) = sweep.problems
    assert problem.path == sweep_dir / "broken" / "results.jsonl" and problem.message.startswith("cannot read")


def test_missing_and_incomplete_jobs_from_manifest(sweep_dir):
    record = make_record(0, [0.9] * 3, [0.8] * 3)
    write_job(sweep_dir, "finished", [record])
    write_job(
        sweep_dir, "running", [make_record(s, [0.9] * 3, [0.8] * 3, algorithm="IRM") for s in (0, 100)], done=False
    )
    (sweep_dir / "plots").mkdir()  # not a job: ignored
    manifest = {
        "version": 1,
        "jobs": [
            {
                "id": i,
                "args": {
                    "dataset": "ColoredMNIST",
                    "algorithm": "ERM",
                    "test_envs": [0],
                    "hparams_seed": 0,
                    "trial_seed": t,
                },
            }
            for t, i in enumerate(["finished", "running", "never_ran", "crashed"])
        ],
    }
    write_job(sweep_dir, "crashed", [], done=False)
    (sweep_dir / "crashed" / "failed").write_text('{"returncode": 1}')
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    sweep = load_sweep(sweep_dir)
    # the states `domaingrad sweep status` names (one vocabulary, domaingrad.layout.JobState)
    assert sweep.manifest and [(j.id, j.state) for j in sweep.jobs] == [
        ("crashed", "failed"),
        ("finished", "done"),
        ("never_ran", "not launched"),
        ("running", "incomplete"),
    ]
    assert [job_state(j.path) for j in sweep.jobs] == [j.state for j in sweep.jobs]
    assert sweep.records == [record]  # the incomplete job's records are left out by default
    status = "\n".join(sweep.status_lines())
    assert "1 done, 1 failed, 0 running, 1 incomplete, 1 not launched" in status
    assert f"crashed: failed; its error is in {sweep_dir / 'crashed' / 'err.txt'}" in status
    assert "running: incomplete, 2 records up to step 100" in status and "--latest" in status
    assert "never_ran: not launched (dataset=ColoredMNIST, algorithm=ERM, test_envs=[0]" in status
    assert len(load_sweep(sweep_dir, include_incomplete=True).records) == 3


def test_a_job_whose_lock_is_held_is_reported_running(sweep_dir):
    import fcntl

    write_job(sweep_dir, "busy", [make_record(0, [0.9] * 3, [0.8] * 3)], done=False)
    with open(sweep_dir / "busy" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (job,) = load_sweep(sweep_dir).jobs
        assert job.state == "running" and "busy: running, 1 records up to step 0" in job.describe()
    assert load_sweep(sweep_dir).jobs[0].state == "incomplete"


def test_domainbed_sweep_without_manifest_and_bad_manifest(sweep_dir):
    write_job(sweep_dir, "a" * 32, [make_record(0, [0.9] * 3, [0.8] * 3)])
    (sweep_dir / "b").mkdir()
    (sweep_dir / "b" / "out.txt").write_text("crashed before the first checkpoint")
    sweep = load_sweep(sweep_dir)
    assert not sweep.manifest and [j.state for j in sweep.jobs] == ["done", "incomplete"]
    assert "b: incomplete, no record yet" in "\n".join(sweep.status_lines())
    (sweep_dir / "sweep.json").write_text("{truncated")
    sweep = load_sweep(sweep_dir)
    assert not sweep.manifest and "unreadable sweep manifest" in sweep.problems[0].message
    assert len(sweep.records) == 1
