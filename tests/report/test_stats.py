"""Paired Wilcoxon signed-rank tests against a baseline, checked against scipy and by enumeration."""

from __future__ import annotations

import itertools
import json

import pytest
from scipy import stats

from domaingrad.report.records import load_sweep
from domaingrad.report.render import render
from domaingrad.report.summary import build_report
from tests.report.conftest import cmnist_trials, write_job

ERM = [0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62]
UP = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]  # AgrSum better on every trial
MIXED = [0.01, -0.02, 0.03, -0.04, 0.05, -0.06, 0.07]  # IRM: W+ = 1+3+5+7 = 16, W- = 2+4+6 = 12


def _exact_two_sided_p(diffs):
    """Exact two-sided p-value of the signed-rank statistic by enumerating all 2^n sign patterns."""
    ranks = [sorted(abs(d) for d in diffs).index(abs(d)) + 1 for d in diffs]
    w = min(sum(r for r, d in zip(ranks, diffs) if d > 0), sum(r for r, d in zip(ranks, diffs) if d < 0))
    n = len(ranks)
    extreme = sum(
        1 for signs in itertools.product([0, 1], repeat=n) if sum(r for r, s in zip(range(1, n + 1), signs) if s) <= w
    )
    return min(1.0, 2 * extreme / 2**n)


@pytest.fixture
def report(sweep_dir):
    accs = {}
    for t in range(7):
        accs[("ERM", 0, t)] = ERM[t]
        accs[("AgrSum", 0, t)] = ERM[t] + UP[t]
        accs[("IRM", 0, t)] = ERM[t] + MIXED[t]
        accs[("AgrSum", 1, t)] = ERM[t] + UP[t]
        if t < 6:
            accs[("ERM", 1, t)] = ERM[t]  # env 1: the baseline lacks trial 6 -> 6 pairs
    write_job(sweep_dir, "job", cmnist_trials(accs))
    return build_report(load_sweep(sweep_dir), selection="iid", baseline="ERM")


def test_wilcoxon_matches_scipy_and_exact_enumeration(report):
    tests = {(t.algorithm, t.test_env): t for t in report.sections[0].tests}
    assert set(tests) == {("AgrSum", 0), ("IRM", 0), ("AgrSum", 1)}
    agr = tests[("AgrSum", 0)]
    assert agr.trial_seeds == list(range(7))
    assert agr.p_value == pytest.approx(2 / 2**7)  # every difference positive: the most extreme of 128
    assert agr.p_value == pytest.approx(stats.wilcoxon([e + u for e, u in zip(ERM, UP)], ERM).pvalue)
    irm = tests[("IRM", 0)]
    assert irm.p_value == pytest.approx(_exact_two_sided_p(MIXED))
    assert irm.p_value == pytest.approx(stats.wilcoxon([e + m for e, m in zip(ERM, MIXED)], ERM).pvalue)
    assert irm.p_value > 0.05 and agr.significant and not irm.significant
    paired = tests[("AgrSum", 1)]  # paired by trial seed: only the 6 seeds both have
    assert paired.trial_seeds == list(range(6)) and paired.p_value == pytest.approx(2 / 2**6)


def test_asterisk_in_tables_and_p_values_in_json(report):
    markdown = render(report, "markdown")
    dataset_table = markdown[markdown.index("### ColoredMNIST") : markdown.index("### Averages")]
    rows = {line.split(" | ")[0].strip("| "): line for line in dataset_table.splitlines() if line.startswith("| ")}
    agr_cells = rows["AgrSum"].strip("| ").split(" | ")
    irm_cells = rows["IRM"].strip("| ").split(" | ")
    assert agr_cells[1].endswith("*") and agr_cells[2].endswith("*")
    assert not irm_cells[1].endswith("*") and not rows["ERM"].count("*")
    assert "paired two-sided Wilcoxon signed-rank test against ERM" in markdown
    assert "$^*$" in render(report, "latex")
    document = json.loads(render(report, "json"))
    tests = {(t["algorithm"], t["test_env"]): t for t in document["selections"][0]["tests"]}
    assert tests[("AgrSum", 0)]["p_value"] == pytest.approx(2 / 128) and tests[("AgrSum", 0)]["significant"]
    rows = {r["algorithm"]: r for r in document["selections"][0]["tables"][0]["rows"]}
    assert list(rows) == ["ERM", "IRM", "AgrSum"]  # DomainBed's order, then names it does not know
    cell = rows["AgrSum"]["cells"][0]
    assert cell["p_value"] == pytest.approx(2 / 128)


def test_few_trials_note(sweep_dir):
    accs = {(a, 0, t): v + t / 100 for t in range(3) for a, v in (("ERM", 0.5), ("IRM", 0.6))}
    write_job(sweep_dir, "job", cmnist_trials(accs))
    report = build_report(load_sweep(sweep_dir), selection="iid", baseline="ERM")
    (test,) = report.sections[0].tests
    assert test.p_value == pytest.approx(0.25) and not test.significant
    assert any("p < 0.05 needs at least 6 trials" in n for n in report.notes)
