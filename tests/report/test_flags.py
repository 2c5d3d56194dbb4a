"""What would silently change a report's numbers is flagged (stderr and every output format) or refused.

Done jobs without a record, steps recorded twice, runs that differ in an argument a sweep
keeps fixed, and the runs leave-one-domain-out needs but does not find.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from domaingrad.errors import DomainGradError
from domaingrad.report.records import load_sweep
from domaingrad.report.summary import build_report
from tests.report.conftest import cmnist_trials, make_record, write_job

FORMATS = ("markdown", "latex", "csv", "json")


def _manifest(root, jobs):
    """sweep.json listing ``jobs`` ({id: (algorithm, test env, trial seed)})."""
    entries = [
        {
            "id": job_id,
            "args": {"dataset": "ColoredMNIST", "algorithm": a, "test_envs": [e], "hparams_seed": 0, "trial_seed": t},
        }
        for job_id, (a, e, t) in jobs.items()
    ]
    (root / "sweep.json").write_text(json.dumps({"version": 1, "jobs": entries}))


def _outputs(run_cli, sweep, *extra):
    """{format: text} of the report in every format, and the stderr of the markdown run."""
    texts, stderr = {}, None
    for fmt in FORMATS:
        code, out, err = run_cli("report", sweep, "--selection", "iid", "--format", fmt, *extra)
        assert code == 0, err
        texts[fmt] = out
        stderr = stderr if stderr is not None else err
    return texts, stderr


def _note_rows(csv_text, kind):
    return [r for r in csv.DictReader(io.StringIO(csv_text)) if r["table"] == "notes" and r["column"] == kind]


def test_a_done_job_without_records_is_flagged_everywhere(sweep_dir, run_cli):
    accs = {("ERM", 0, t): 0.5 + 0.1 * t for t in range(3)}
    jobs = {}
    for (a, e, t), acc in accs.items():
        write_job(sweep_dir, f"trial{t}", cmnist_trials({(a, e, t): acc}))
        jobs[f"trial{t}"] = (a, e, t)
    write_job(sweep_dir, "emptied", [])  # `done`, and an empty results.jsonl
    (write_job(sweep_dir, "no_file", []) / "results.jsonl").unlink()  # `done`, no results.jsonl at all
    jobs.update(emptied=("ERM", 0, 3), no_file=("ERM", 0, 4))
    _manifest(sweep_dir, jobs)
    texts, err = _outputs(run_cli, sweep_dir)
    # the cell averages 3 trials, not the 5 the sweep ran: said on stderr ...
    assert "warning: 2 job(s) are done but have no usable record in results.jsonl" in err
    assert "emptied: done (dataset=ColoredMNIST, algorithm=ERM, test_envs=[0], hparams_seed=0, trial_seed=3)" in err
    assert "no_file: done" in err
    # ... and in every format
    assert "Warning: 2 job(s) are done but have no usable record" in texts["markdown"]
    assert "Warning: 2 job(s) are done but have no usable record" in texts["latex"]
    (row,) = _note_rows(texts["csv"], "empty_done_jobs")
    assert "emptied" in row["text"] and "no_file" in row["text"]
    document = json.loads(texts["json"])
    (flag,) = [f for f in document["flags"] if f["kind"] == "empty_done_jobs"]
    assert flag["jobs"] == ["emptied", "no_file"] and flag["level"] == "warning"
    assert document["selections"][0]["tables"][0]["rows"][0]["cells"][0]["trial_seeds"] == [0, 1, 2]


def test_repeated_steps_are_counted_once_keeping_the_last(sweep_dir, run_cli):
    # step 100 twice (a restart that re-appended it): first copy val .7 / test .3, last copy val .6 / test .4;
    # step 0: val .5 / test .1. Counted once with the last copy, training-domain validation picks step 100
    # with test .4; with both copies it would pick the first copy's .3 (Python's max keeps the first best).
    records = [
        make_record(0, [0.1, 0.9, 0.9], [0.5, 0.5, 0.5]),
        make_record(100, [0.3, 0.9, 0.9], [0.7, 0.7, 0.7]),
        make_record(100, [0.4, 0.9, 0.9], [0.6, 0.6, 0.6]),
    ]
    write_job(sweep_dir, "restarted", records)
    write_job(sweep_dir, "other", cmnist_trials({("IRM", 0, 0): 0.5}))  # one file, several runs: no repeat
    sweep = load_sweep(sweep_dir)
    assert [r["step"] for r in sweep.records_by_job["restarted"]] == [0, 100]
    assert sweep.records_by_job["restarted"][1]["env0_in_acc"] == 0.4
    texts, err = _outputs(run_cli, sweep_dir)
    assert "| ERM | 40.0 +/- 0.0 | X | X | X |" in texts["markdown"]
    assert "Total records: 4" in texts["markdown"]
    message = "1 job(s) record the same step more than once in results.jsonl; each step is counted once, using the LAST"
    assert f"warning: {message}" in err and "restarted: step 100 x2" in err and "other:" not in err
    assert message in texts["latex"] and _note_rows(texts["csv"], "duplicate_steps")
    document = json.loads(texts["json"])
    assert document["total_records"] == 4
    assert [f["jobs"] for f in document["flags"] if f["kind"] == "duplicate_steps"] == [["restarted"]]


def _trial_job(root, name, trial, **args):
    records = cmnist_trials({("ERM", 0, trial): 0.5 + 0.1 * trial})
    for r in records:
        r["args"].update(args)
    write_job(root, name, records)


def test_runs_differing_in_steps_are_refused_unless_allowed(sweep_dir, run_cli, tmp_path):
    _trial_job(sweep_dir, "short0", 0, steps=101)
    _trial_job(sweep_dir, "short1", 1, steps=101)
    _trial_job(sweep_dir, "long2", 2, steps=5001)
    out = tmp_path / "report.md"
    code, stdout, err = run_cli("report", sweep_dir, "--output", out)
    assert code == 2 and stdout == "" and not out.exists()
    assert (
        "ColoredMNIST: args.steps differs: steps=101 in 2 job(s) (short0, short1); steps=5001 in 1 job(s) (long2)"
        in err
    )
    assert f"the runs under {sweep_dir} differ in arguments that a sweep keeps fixed" in err
    assert "--allow-mixed" in err and "Traceback" not in err
    with pytest.raises(DomainGradError, match="args.steps differs"):
        build_report(load_sweep(sweep_dir), selection="iid")
    # merged on request, and said so in every format
    texts, err = _outputs(run_cli, sweep_dir, "--allow-mixed")
    assert "warning: the runs under" in err and "(merged: --allow-mixed)" in err
    assert "| ERM | 60.0 +/- 4.7 | X | X | X |" in texts["markdown"]
    assert "args.steps differs" in texts["markdown"] and "args.steps differs" in texts["latex"].replace("\\_", "_")
    assert _note_rows(texts["csv"], "mixed_args")
    document = json.loads(texts["json"])
    assert [f["jobs"] for f in document["flags"] if f["kind"] == "mixed_args"] == [["long2", "short0", "short1"]]


def test_other_fixed_arguments_are_compared_too(sweep_dir, run_cli):
    _trial_job(sweep_dir, "a", 0, holdout_fraction=0.2, hparams='{"lr": 0.001}')
    _trial_job(sweep_dir, "b", 1, holdout_fraction=0.3, hparams='{"lr": 0.01}')
    code, _, err = run_cli("report", sweep_dir)
    assert code == 2
    assert "args.holdout_fraction differs: holdout_fraction=0.2 in 1 job(s) (a); holdout_fraction=0.3" in err
    assert "args.hparams differs" in err


def test_swept_and_bookkeeping_arguments_do_not_count_as_mixed(sweep_dir):
    # what differs between the jobs of one sweep: the swept arguments, the seed they imply, the job's own
    # directory, and how it ran; the same hparams written as different JSON text are the same
    _trial_job(sweep_dir, "a", 0, seed=11, output_dir="/sweep/a", device="cpu", num_workers=0, hparams='{"lr":1e-3}')
    _trial_job(sweep_dir, "b", 1, seed=22, output_dir="/sweep/b", device="cuda", num_workers=4, hparams='{"lr": 0.001}')
    report = build_report(load_sweep(sweep_dir), selection="iid")
    assert not [f for f in report.flags if f.kind == "mixed_args"]


def _loo_sweep(root, pairs):
    """ERM on ColoredMNIST: every single test env, and the runs with the two test envs in ``pairs``."""
    for env in range(3):
        write_job(root, f"single{env}", [make_record(s, [0.5, 0.6, 0.7], [0.8] * 3, test_envs=[env]) for s in (0, 100)])
    for a, b in pairs:
        write_job(root, f"pair{a}{b}", [make_record(s, [0.5, 0.6, 0.7], [0.8] * 3, test_envs=[a, b]) for s in (0, 100)])


def test_all_x_leave_one_domain_out_says_which_runs_are_missing(sweep_dir, run_cli):
    _loo_sweep(sweep_dir, pairs=[])
    code, out, err = run_cli("report", sweep_dir)
    assert code == 0, err
    loo = out[out.index("## Model selection: leave-one-domain-out") : out.index("## Model selection: test-domain")]
    assert "| ERM | X | X | X | X |" in loo
    expected = (
        "leave-one-domain-out cross-validation: every cell of its tables is X. It scores a run with test "
        "environment t at a step by the mean, over every other environment v, of env{v}_in_acc of the run with "
        "test_envs [t, v]"
    )
    assert f"note: {expected}" in err and f"Note: {expected}" in out
    assert "missing: ColoredMNIST ERM: test_envs [0, 1], [0, 2], [1, 2]." in err
    assert "without --single-test-envs" in err
    code, out, _ = run_cli("report", sweep_dir, "--format", "json")
    (flag,) = [f for f in json.loads(out)["flags"] if f["kind"] == "loo_missing_pairs"]
    assert flag["level"] == "note" and "test_envs [0, 1], [0, 2], [1, 2]" in flag["message"]


def test_partial_leave_one_domain_out_names_only_the_missing_pairs(sweep_dir):
    _loo_sweep(sweep_dir, pairs=[(0, 1), (0, 2)])  # test env 0 has its pairs; 1 and 2 lack [1, 2]
    report = build_report(load_sweep(sweep_dir), selection="loo")
    loo = report.sections[0].tables[0]
    assert [c.text for c in loo.cells[0]] == ["50.0 +/- 0.0", "X", "X"]
    (flag,) = [f for f in report.flags if f.kind == "loo_missing_pairs"]
    assert "2 of 3 groups have no number" in flag.message
    assert "missing: ColoredMNIST ERM: test_envs [1, 2]." in flag.message
    # other methods have no such note
    report = build_report(load_sweep(sweep_dir), selection="iid")
    assert not [f for f in report.flags if f.kind == "loo_missing_pairs"]


def test_a_test_env_with_only_paired_runs_is_explained(sweep_dir):
    write_job(sweep_dir, "single0", [make_record(0, [0.5, 0.6, 0.7], [0.8] * 3, test_envs=[0])])
    write_job(sweep_dir, "pair12", [make_record(0, [0.5, 0.6, 0.7], [0.8] * 3, test_envs=[1, 2])])
    report = build_report(load_sweep(sweep_dir), selection="oracle")
    assert [c.text for c in report.sections[0].tables[0].cells[0]] == ["50.0 +/- 0.0", "X", "X"]
    (flag,) = [f for f in report.flags if f.kind == "no_single_test_env"]
    assert "there is none for ColoredMNIST ERM: test env 1, 2" in flag.message
