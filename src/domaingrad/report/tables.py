"""Result tables as DomainBed's ``domainbed/scripts/collect_results.py`` builds them.

Per dataset: rows = algorithms, columns = test environments + Avg; a cell is the mean +-
standard error over trial seeds of the selected accuracy (:func:`format_mean`), "X" when
no trial has a number; Avg = mean of the column means, "X" if any column is X. The
averages table: per (algorithm, dataset) the mean over trial seeds of each trial's mean
over its test envs, +- standard error; Avg = mean over datasets, "X" if any is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .names import count_environments, environment_names, order_algorithms, order_datasets
from .selection import Selected


def format_mean(data: Sequence[float], latex: bool) -> tuple[float | None, float | None, str]:
    """DomainBed's ``format_mean``: (mean, err, text) in percent for accuracies given as fractions.

    mean = 100 * mean(data); err = 100 * std(data / sqrt(n)) with numpy's population std
    (ddof=0), i.e. std/sqrt(n). Text "m.m +/- e.e" ("m.m $\\pm$ e.e" for LaTeX); no data
    gives (None, None, "X").
    """
    if len(data) == 0:
        return None, None, "X"
    mean = 100 * np.mean(list(data))
    err = 100 * np.std(list(data) / np.sqrt(len(data)))
    sep = " $\\pm$ " if latex else " +/- "
    return float(mean), float(err), f"{mean:.1f}{sep}{err:.1f}"


def format_avg(means: Sequence[float | None]) -> tuple[float | None, str]:
    """DomainBed's Avg column: mean of the means as "{:.1f}", or "X" if any mean is missing."""
    present = [m for m in means if m is not None]
    if not means or len(present) != len(means):
        return None, "X"
    value = sum(present) / len(present)
    return float(value), f"{value:.1f}"


@dataclass
class Cell:
    """One table cell: per-trial values (fractions) with their trial seeds, and DomainBed's summary."""

    values: list[float]
    trial_seeds: list[int]
    mean: float | None
    err: float | None
    text: str
    latex: str
    #: Wilcoxon p-value against the baseline (filled in by :mod:`.stats`), None if not tested
    p_value: float | None = None


@dataclass
class Table:
    """A per-dataset table (``dataset`` set) or the averages table (``dataset`` None)."""

    title: str
    dataset: str | None
    metric: str
    columns: list[str]
    rows: list[str]
    cells: list[list[Cell]]
    avg: list[tuple[float | None, str]] = field(default_factory=list)


def _cell(pairs: list[tuple[int, float]]) -> Cell:
    pairs = sorted(pairs)
    values = [v for _, v in pairs]
    mean, err, text = format_mean(values, latex=False)
    return Cell(values, [t for t, _ in pairs], mean, err, text, format_mean(values, latex=True)[2])


def build_tables(
    records: list[dict], selected: list[Selected], method_name: str, metric: str = "test_acc"
) -> list[Table]:
    """The per-dataset tables and the averages table for one selection method.

    Args:
        records: all records (datasets and algorithms are read from them, as DomainBed does,
            so an algorithm without any selected group still gets a row of X).
        selected: the selection outcome (:func:`.selection.select`).
        method_name: DomainBed's name of the selection method (for titles).
        metric: ``"test_acc"`` (out-of-domain, the reported number) or ``"in_domain_acc"``.
    """
    algorithms = order_algorithms(r["args"]["algorithm"] for r in records)
    datasets = order_datasets(r["args"]["dataset"] for r in records)
    label = "out-of-domain" if metric == "test_acc" else "in-domain (source held-out)"
    tables = []
    for dataset in datasets:
        n_envs = max(count_environments(r) for r in records if r["args"]["dataset"] == dataset)
        table = Table(
            f"Dataset: {dataset}, model selection method: {method_name}",
            dataset,
            label,
            [*environment_names(dataset, n_envs), "Avg"],
            list(algorithms),
            [],
        )
        for algorithm in algorithms:
            row = [
                _cell(
                    [
                        (s.trial_seed, getattr(s, metric))
                        for s in selected
                        if (s.dataset, s.algorithm, s.test_env) == (dataset, algorithm, env)
                    ]
                )
                for env in range(n_envs)
            ]
            table.cells.append(row)
            table.avg.append(format_avg([c.mean for c in row]))
        tables.append(table)
    tables.append(_averages_table(selected, algorithms, datasets, method_name, metric, label))
    return tables


def _averages_table(
    selected: list[Selected], algorithms: list[str], datasets: list[str], method_name: str, metric: str, label: str
) -> Table:
    table = Table(
        f"Averages, model selection method: {method_name}", None, label, [*datasets, "Avg"], list(algorithms), []
    )
    for algorithm in algorithms:
        row = []
        for dataset in datasets:
            per_trial: dict[int, list[float]] = {}
            for s in selected:
                if (s.algorithm, s.dataset) == (algorithm, dataset):
                    per_trial.setdefault(s.trial_seed, []).append(getattr(s, metric))
            row.append(_cell([(t, float(np.mean(v))) for t, v in per_trial.items()]))
        table.cells.append(row)
        table.avg.append(format_avg([c.mean for c in row]))
    return table
