"""Same tables as DomainBed's collect_results on a random sweep (transcribed reference in domainbed_reference.py)."""
from __future__ import annotations

import numpy as np
import pytest

from domaingrad.report.records import load_sweep
from domaingrad.report.summary import build_report
from tests.report import domainbed_reference as ref
from tests.report.conftest import make_record, write_job

DATASETS = {"ColoredMNIST": 3, "RotatedMNIST": 6}
ALGORITHMS = ["ERM", "IRM", "AgrSum"]


def _random_sweep(root, rng):
    """Random accuracies; 2 hparams x 3 trials; every single test env plus LOO pairs for
    ColoredMNIST; some (algorithm, env, trial) jobs left out so that X and partial averages occur."""
    job = 0
    for dataset, n_envs in DATASETS.items():
        for algorithm in ALGORITHMS:
            for trial in range(3):
                envs = [[e] for e in range(n_envs)]
                if dataset == "ColoredMNIST":
                    envs += [[a, b] for a in range(n_envs) for b in range(a + 1, n_envs)]
                for test_envs in envs:
                    if rng.rand() < 0.12:
                        continue
                    for hseed in range(2):
                        records = [make_record(step, list(rng.rand(n_envs)), list(rng.rand(n_envs)),
                                               dataset=dataset, algorithm=algorithm, test_envs=test_envs,
                                               trial_seed=trial, hparams_seed=hseed) for step in (0, 100, 200)]
                        write_job(root, f"{job:04d}", records)
                        job += 1


@pytest.mark.parametrize("seed", [0, 1])
def test_tables_equal_domainbeds(sweep_dir, seed):
    _random_sweep(sweep_dir, np.random.RandomState(seed))
    sweep = load_sweep(sweep_dir)
    report = build_report(sweep, selection="all")
    methods = {"iid": ref.IIDAccuracySelectionMethod, "loo": ref.LeaveOneOutSelectionMethod,
               "oracle": ref.OracleSelectionMethod}
    n_cells = 0
    for section in report.sections:
        expected = ref.results_tables(sweep.records, methods[section.method.key], ALGORITHMS, list(DATASETS),
                                      DATASETS)
        assert [t.dataset or "Averages" for t in section.tables] == list(expected)
        for table in section.tables:
            got = [[c.text for c in row] + [avg] for row, (_, avg) in zip(table.cells, table.avg)]
            assert table.rows == ALGORITHMS
            assert got == expected[table.dataset or "Averages"]
            n_cells += sum(c != "X" for row in got for c in row)
    assert n_cells > 50  # the comparison covered real numbers, not only X
    loo = next(s for s in report.sections if s.method.key == "loo").tables[0]
    assert any(c.text != "X" for row in loo.cells for c in row)
