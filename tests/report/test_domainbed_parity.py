"""Same selections and tables as DomainBed's collect_results (transcribed reference in domainbed_reference.py).

Two kinds of random sweeps: continuous accuracies (no ties), and accuracies that are
ratios of small counts, so that equal validation accuracies are frequent and exact, with
NaN validation accuracies (an empty split) sprinkled in, job directories named in an
order unrelated to hparams_seed and some results.jsonl files not in step order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from domaingrad.report.records import load_sweep
from domaingrad.report.selection import (
    IIDAccuracySelectionMethod,
    LeaveOneOutSelectionMethod,
    OracleSelectionMethod,
    select,
)
from domaingrad.report.summary import build_report
from tests.report import domainbed_reference as ref
from tests.report.conftest import make_record, write_job

DATASETS = {"ColoredMNIST": 3, "RotatedMNIST": 6}
ALGORITHMS = ["ERM", "IRM", "AgrSum"]
#: domaingrad's method and its transcribed DomainBed counterpart
PAIRS = {
    "iid": (IIDAccuracySelectionMethod, ref.IIDAccuracySelectionMethod),
    "loo": (LeaveOneOutSelectionMethod, ref.LeaveOneOutSelectionMethod),
    "oracle": (OracleSelectionMethod, ref.OracleSelectionMethod),
}


def _env_sets(dataset, n_envs):
    envs = [[e] for e in range(n_envs)]
    if dataset == "ColoredMNIST":  # leave-one-domain-out needs the pairs
        envs += [[a, b] for a in range(n_envs) for b in range(a + 1, n_envs)]
    return envs


def _random_sweep(root, rng):
    """Random accuracies; 2 hparams x 3 trials; every single test env plus LOO pairs for
    ColoredMNIST; some (algorithm, env, trial) jobs left out so that X and partial averages occur."""
    job = 0
    for dataset, n_envs in DATASETS.items():
        for algorithm in ALGORITHMS:
            for trial in range(3):
                for test_envs in _env_sets(dataset, n_envs):
                    if rng.rand() < 0.12:
                        continue
                    for hseed in range(2):
                        records = [
                            make_record(
                                step,
                                list(rng.rand(n_envs)),
                                list(rng.rand(n_envs)),
                                dataset=dataset,
                                algorithm=algorithm,
                                test_envs=test_envs,
                                trial_seed=trial,
                                hparams_seed=hseed,
                            )
                            for step in (0, 100, 200)
                        ]
                        write_job(root, f"{job:04d}", records)
                        job += 1


def _tied_nan_sweep(root, rng):
    """3 hparams x 3 trials x 3 checkpoints. Validation accuracies (out accs of single-test-env
    runs: training-domain validation and oracle; in accs of two-test-env runs: leave-one-out)
    are 2/4 or 3/4, each NaN with probability 0.08, and for 10% of the (algorithm,
    trial, test envs) one environment's validation split is NaN in every run and checkpoint
    (then, where that split is used, all runs tie at minus infinity). Reported accuracies
    (test env in accs) are k/8. Job directories get random names (DomainBed's are hashes)
    and a third of the jobs write their checkpoints in a shuffled step order."""
    names = rng.permutation(10_000)
    job = 0
    for dataset, n_envs in DATASETS.items():
        for algorithm in ALGORITHMS:
            for trial in range(3):
                for test_envs in _env_sets(dataset, n_envs):
                    empty = rng.randint(n_envs) if rng.rand() < 0.1 else None
                    for hseed in range(3):
                        if rng.rand() < 0.1:
                            continue
                        records = []
                        for step in (0, 100, 200):
                            val = [float(v) for v in rng.randint(2, 4, n_envs) / 4]
                            val = [math.nan if rng.rand() < 0.08 or e == empty else v for e, v in enumerate(val)]
                            reported = [float(v) for v in rng.randint(0, 9, n_envs) / 8]
                            in_accs, out_accs = (reported, val) if len(test_envs) == 1 else (val, reported)
                            records.append(
                                make_record(
                                    step,
                                    in_accs,
                                    out_accs,
                                    dataset=dataset,
                                    algorithm=algorithm,
                                    test_envs=test_envs,
                                    trial_seed=trial,
                                    hparams_seed=hseed,
                                )
                            )
                        if rng.rand() < 1 / 3:
                            records = [records[i] for i in rng.permutation(len(records))]
                        write_job(root, f"{names[job]:04d}", records)
                        job += 1


def _assert_tables_equal(sweep, report, algorithms):
    """Every table of every section equals the reference's; returns the number of non-X cells."""
    n_cells = 0
    for section in report.sections:
        expected = ref.results_tables(sweep.records, PAIRS[section.method.key][1], algorithms, list(DATASETS), DATASETS)
        assert [t.dataset or "Averages" for t in section.tables] == list(expected)
        for table in section.tables:
            got = [[c.text for c in row] + [avg] for row, (_, avg) in zip(table.cells, table.avg)]
            assert table.rows == algorithms
            assert got == expected[table.dataset or "Averages"], (section.method.key, table.dataset)
            n_cells += sum(c != "X" for row in got for c in row)
    return n_cells


@pytest.mark.parametrize("seed", [0, 1])
def test_tables_equal_domainbeds(sweep_dir, seed):
    _random_sweep(sweep_dir, np.random.RandomState(seed))
    sweep = load_sweep(sweep_dir)
    report = build_report(sweep, selection="all")
    assert _assert_tables_equal(sweep, report, ALGORITHMS) > 50  # real numbers, not only X
    loo = next(s for s in report.sections if s.method.key == "loo").tables[0]
    assert any(c.text != "X" for row in loo.cells for c in row)


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def _reference_choices(records, method):
    """{group: (hparams_seed, val_acc, test_acc, ranked runs)} of DomainBed's selection."""
    out = {}
    for group in ref.get_grouped_records(ref.Q(records)):
        ranked = method.hparams_accs(group["records"])
        if len(ranked):
            acc, run = ranked[0]
            key = (group["trial_seed"], group["dataset"], group["algorithm"], group["test_env"])
            out[key] = (run[0]["args"]["hparams_seed"], float(acc["val_acc"]), acc["test_acc"], ranked)
    return out


def _coverage(expected):
    """Counts of groups (ties, nan_last, all_nan): ties = the best val_acc is a number shared
    by runs with different reported accuracies (the tie-break decides the number); nan_last
    = the best val_acc is a number and some run's is NaN; all_nan = two or more runs, all NaN."""
    ties = nan_last = all_nan = 0
    for *_, ranked in expected.values():
        vals = [float(acc["val_acc"]) for acc, _ in ranked]
        best = [acc["test_acc"] for (acc, _), v in zip(ranked, vals) if _same(v, vals[0])]
        ties += not math.isnan(vals[0]) and len(set(best)) > 1
        nan_last += not math.isnan(vals[0]) and any(math.isnan(v) for v in vals)
        all_nan += len(vals) > 1 and all(math.isnan(v) for v in vals)
    return ties, nan_last, all_nan


def _nan_first_runs(records, key):
    """Runs (in any group) whose first candidate checkpoint has a NaN val_acc and a later one a
    number: there Python's max (DomainBed's Q.argmax) keeps the NaN checkpoint."""
    count = 0
    for group in ref.get_grouped_records(ref.Q(records)):
        for _, run in group["records"].group("args.hparams_seed"):
            if key == "iid":
                vals = [ref.IIDAccuracySelectionMethod._step_acc(r)["val_acc"] for r in ref.get_test_records(run)]
            else:
                steps = run.group("step").map(lambda _, rs: ref.LeaveOneOutSelectionMethod._step_acc(rs))
                vals = [s["val_acc"] for s in steps.filter_not_none()]
            if vals and math.isnan(vals[0]) and any(not math.isnan(v) for v in vals[1:]):
                count += 1
    return count


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ties_and_nan_select_as_domainbed(sweep_dir, seed):
    _tied_nan_sweep(sweep_dir, np.random.RandomState(seed))
    sweep = load_sweep(sweep_dir)
    records = sweep.records
    for key, (method, reference) in PAIRS.items():
        expected = _reference_choices(records, reference)
        got = {(s.trial_seed, s.dataset, s.algorithm, s.test_env): s for s in select(records, method)}
        assert list(got) == list(expected), key
        for group, (hparams_seed, val_acc, test_acc, _) in expected.items():
            s = got[group]
            assert (s.hparams_seed, s.test_acc) == (hparams_seed, test_acc), (key, group)
            assert _same(s.val_acc, val_acc), (key, group)
        # the sweep really exercises what this test is about, for every method:
        ties, nan_last, all_nan = _coverage(expected)
        assert (ties >= 3, nan_last >= 3, all_nan >= 1) == (True, True, True), (key, ties, nan_last, all_nan)
        if key != "oracle":
            assert _nan_first_runs(records, key) >= 1, key
    report = build_report(sweep, selection="all")
    assert _assert_tables_equal(sweep, report, ALGORITHMS) > 40
