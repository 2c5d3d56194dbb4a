"""`domaingrad report --top-hparams`: the hyperparameters each selection method picks.

As DomainBed's scripts/list_top_hparams.py lists them, for every dataset, algorithm, test env and trial seed.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from domaingrad.report.records import load_sweep
from domaingrad.report.summary import build_report
from domaingrad.report.top_hparams import top_hparams
from tests.report.conftest import make_record, write_job

#: hparams_seed -> (training-domain val acc, test env's out acc (oracle val), test env's in acc (reported), lr)
DRAWS = {0: (0.6, 0.9, 0.55, 1e-3), 1: (0.7, 0.2, 0.45, 1e-4)}


@pytest.fixture
def sweep(sweep_dir):
    """ERM, test env 0, trial seeds 0 and 1, two hparams draws; training-domain validation prefers draw 1,
    the oracle draw 0; leave-one-domain-out finds draw 0's runs with test envs [0, 1] and [0, 2] only."""
    for trial in (0, 1):
        for h, (val, oracle_val, reported, lr) in DRAWS.items():
            for test_envs in [[0]] + ([[0, 1], [0, 2]] if h == 0 else []):
                records = [
                    make_record(
                        step,
                        [reported + 0.01 * trial, 0.9, 0.9],
                        [oracle_val, val, val],
                        test_envs=test_envs,
                        trial_seed=trial,
                        hparams_seed=h,
                    )
                    for step in (0, 100)
                ]
                for r in records:
                    r["hparams"] = {"batch_size": 64, "lr": lr}
                name = "_".join(map(str, test_envs))
                write_job(sweep_dir, f"t{trial}_h{h}_env{name}", records)
    return sweep_dir


def test_text_lists_the_selected_hparams_per_method(sweep, run_cli):
    code, out, err = run_cli("report", sweep, "--top-hparams")
    assert code == 0, err
    iid = out[out.index("## Model selection: training-domain") : out.index("## Model selection: leave-one")]
    loo = out[out.index("## Model selection: leave-one") : out.index("## Model selection: test-domain")]
    oracle = out[out.index("## Model selection: test-domain") :]
    assert "### ColoredMNIST, ERM, test env 0 (+90%)" in iid
    assert (
        "- trial_seed 1:\n"
        "  1. hparams_seed 1: step 0, val 70.0%, reported 46.0%\n"
        "     hparams: batch_size=64, lr=0.0001\n"
        "     jobs: t1_h1_env0\n"
    ) in iid
    assert "  1. hparams_seed 0: step 100, val 90.0%, reported 56.0%" in oracle and "hparams_seed 1" not in oracle
    # leave-one-domain-out scores draw 0 by its runs with two test envs, which it lists too
    assert "  1. hparams_seed 0: step 0, val 90.0%, reported 55.0%" in loo
    assert "jobs: t0_h0_env0, t0_h0_env0_1, t0_h0_env0_2" in loo
    assert "  2." not in out  # only the selected run, unless --top-hparams-all
    assert "| Algorithm |" not in out  # the listing replaces the tables


def test_json_agrees_with_the_tables_and_lists_every_run_on_request(sweep, run_cli):
    code, out, err = run_cli("report", sweep, "--top-hparams-all", "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["kind"] == "top_hparams" and [s["selection"] for s in document["selections"]] == [
        "iid",
        "loo",
        "oracle",
    ]
    iid = document["selections"][0]["groups"]
    assert [(g["dataset"], g["algorithm"], g["test_env"], g["trial_seed"]) for g in iid] == [
        ("ColoredMNIST", "ERM", 0, 0),
        ("ColoredMNIST", "ERM", 0, 1),
    ]
    assert [r["hparams_seed"] for r in iid[0]["runs"]] == [1, 0] and [r["rank"] for r in iid[0]["runs"]] == [1, 2]
    assert iid[0]["runs"][0]["hparams"] == {"batch_size": 64, "lr": 1e-4} and iid[0]["runs"][0]["jobs"] == [
        "t0_h1_env0"
    ]
    assert [len(g["runs"]) for g in document["selections"][1]["groups"]] == [1, 1]  # only draw 0 has the pairs
    # rank 1 is what the tables report, for every method and group
    report = build_report(load_sweep(sweep), selection="auto")
    for section, listed in zip(report.sections, document["selections"]):
        chosen = {(s.trial_seed, s.test_env): (s.hparams_seed, s.step, s.test_acc) for s in section.selected}
        assert chosen == {
            (g["trial_seed"], g["test_env"]): (
                g["runs"][0]["hparams_seed"],
                g["runs"][0]["step"],
                g["runs"][0]["test_acc"],
            )
            for g in listed["groups"]
        }


def test_csv_and_refused_latex(sweep, run_cli):
    code, out, err = run_cli("report", sweep, "--top-hparams", "--format", "csv", "--selection", "oracle")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["selection"], r["trial_seed"], r["hparams_seed"], r["rank"]) for r in rows] == [
        ("oracle", "0", "0", "1"),
        ("oracle", "1", "0", "1"),
        ("notes", "", "", ""),  # test envs 1 and 2 only have runs with two test envs
    ]
    assert "there is none for ColoredMNIST ERM: test env 1, 2" in rows[-1]["note"]
    assert json.loads(rows[0]["hparams"]) == {"batch_size": 64, "lr": 0.001}
    code, _, err = run_cli("report", sweep, "--top-hparams", "--format", "latex")
    assert code == 2 and "--top-hparams writes --format markdown (text), csv or json, not latex" in err


def test_python_api_ranks_as_the_selection_does(sweep):
    report = build_report(load_sweep(sweep), selection="iid")
    (first, second) = top_hparams(report, all_runs=True)
    assert (first.trial_seed, second.trial_seed) == (0, 1)
    assert [(r.hparams_seed, r.val_acc) for r in first.runs] == [(1, 0.7), (0, 0.6)]
