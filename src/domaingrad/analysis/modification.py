"""Modification ratio and frequency of gradient-surgery runs over training.

Zhou, Hu, Zhou, Guan, Jiang, "Rethinking Domain Generalization from Perspective of
Gradient Granularity" (CorGrad), ECAI 2024, Sec. 4.2-4.3, Figs. 6 and 7: training is
divided into ten equal groups of steps and the mean modification ratio (|cos| of the
projections, Fig. 6: CorGrad against the coarse-grained rule, PCGrad on the whole
network) and modification frequency (eq. 3, Fig. 7: CorGrad against the fine-grained,
element-wise rule) are plotted per group, one panel per dataset.

Reads finished (or running) `domaingrad train` runs: each PATH is a run directory or a
directory searched for runs (a sweep). Every surgery run records its own rule's
statistics (mod_ratio and mod_freq for PCGrad and CorGrad) and, on the same gradients,
those of the coarse rule (coarse_mod_ratio, coarse_mod_freq) and of the element-wise
rule (fine_mod_freq); each record holds the mean over the steps since the previous
checkpoint, so a group's value is the step-weighted mean of the records covering it
(use --checkpoint-freq at most a tenth of the run for ten distinct groups). Runs of the
same dataset and algorithm (seeds, test environments) are averaged.

Writes modification.json (per run and per curve, with the CorGrad comparisons),
modification.csv (one row per dataset, method, statistic and group) and
modification.png (row 1: ratio, Fig. 6; row 2: frequency, Fig. 7).
"""

from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DomainGradError
from ..layout import RESULTS
from . import _common

#: record key -> (row of the figure, granularity: whose rule the statistic is)
STATISTICS: dict[str, tuple[str, str]] = {
    "mod_ratio": ("ratio", "own rule"),
    "coarse_mod_ratio": ("ratio", "coarse: whole-network PCGrad"),
    "mod_freq": ("frequency", "own rule"),
    "coarse_mod_freq": ("frequency", "coarse: whole-network PCGrad"),
    "fine_mod_freq": ("frequency", "fine: element-wise"),
}
_STYLE = {"own rule": "-", "coarse: whole-network PCGrad": "--", "fine: element-wise": ":"}


def group_means(records: Sequence[dict[str, Any]], key: str, total_steps: int, groups: int = 10) -> np.ndarray:
    """Mean of ``key`` per group of steps, training cut into ``groups`` equal groups.

    Step ``t`` (0-based, of ``total_steps``) is in group ``t * groups // total_steps``. A
    record at step ``s`` holds the mean over the steps after the previous record up to
    ``s`` (the first record, step 0 alone: DomainBed's checkpoint means), so it weighs
    in each group with the number of its steps there.

    Args:
        records: results.jsonl records (dicts with ``step``), any order.
        key: the statistic; records without it, or with a non-finite value, are skipped.

    Returns:
        ``(groups,)`` float64, NaN for a group no record with ``key`` covers.

    Raises:
        ValueError: ``total_steps`` or ``groups`` below 1.
    """
    if total_steps < 1 or groups < 1:
        raise ValueError(f"total_steps and groups must be >= 1, got {total_steps} and {groups}")
    weight_sum, value_sum = np.zeros(groups), np.zeros(groups)
    previous = -1
    for record in sorted(records, key=lambda r: r["step"]):
        step = int(record["step"])
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps = np.arange(previous + 1, step + 1)
            counts = np.bincount(np.minimum(steps * groups // total_steps, groups - 1), minlength=groups)
            weight_sum += counts
            value_sum += counts * float(value)
        previous = step
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight_sum > 0, value_sum / np.maximum(weight_sum, 1), math.nan)


@dataclass
class RunStats:
    """The group means of one run: ``values[key]`` is ``(groups,)`` for each key of
    :data:`STATISTICS` the records hold."""

    path: str
    dataset: str
    method: str
    test_envs: list[int]
    total_steps: int
    records: int
    values: dict[str, list[float]]


@dataclass
class Curve:
    """One line of the figure: ``method``'s ``key`` on ``dataset``, mean over ``runs``."""

    dataset: str
    method: str
    key: str
    row: str
    granularity: str
    runs: int
    values: list[float]


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories: each path that holds results.jsonl, else every directory under it
    that does (a sweep), sorted.

    Raises:
        DomainGradError: a path that does not exist, or one with no run under it.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DomainGradError(f"{path} does not exist; give run directories or a sweep directory")
        runs = [path] if (path / RESULTS).is_file() else sorted(p.parent for p in path.rglob(RESULTS))
        if not runs:
            raise DomainGradError(f"{path}: no {RESULTS} in it or under it; expected `domaingrad train` runs")
        found += [r for r in runs if r not in found]
    return found


def run_stats(run_dir: str | os.PathLike, groups: int = 10) -> RunStats | None:
    """The :class:`RunStats` of one run, None when its records hold none of
    :data:`STATISTICS` (not a surgery run)."""
    records = _common.run_records(run_dir)
    if not records:
        return None
    args = records[-1].get("args", {})
    hparams = records[-1].get("hparams", {})
    method = str(args.get("algorithm", "?"))
    if hparams.get("surgery_batches") == "mixed":
        method += " (mixed batches)"
    total = int(args.get("steps") or max(r["step"] for r in records) + 1)
    values = {k: group_means(records, k, total, groups).tolist() for k in STATISTICS if any(k in r for r in records)}
    if not values:
        return None
    envs = [int(e) for e in args.get("test_envs", [])]
    return RunStats(str(run_dir), str(args.get("dataset", "?")), method, envs, total, len(records), values)


def modification_curves(runs: Sequence[RunStats]) -> list[Curve]:
    """The runs' group means averaged per (dataset, method, statistic), NaN-aware."""
    pooled: dict[tuple[str, str, str], list[list[float]]] = defaultdict(list)
    for run in runs:
        for key, values in run.values.items():
            pooled[(run.dataset, run.method, key)].append(values)
    curves = []
    for (dataset, method, key), lists in sorted(pooled.items()):
        stack = np.array(lists, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            counted = np.isfinite(stack).sum(0)
            mean = np.where(counted > 0, np.nansum(stack, 0) / np.maximum(counted, 1), math.nan)
        row, granularity = STATISTICS[key]
        curves.append(Curve(dataset, method, key, row, granularity, len(lists), mean.tolist()))
    return curves


def corgrad_comparisons(curves: Sequence[Curve], method: str = "CorGrad") -> list[dict[str, Any]]:
    """``method``'s own ratio and frequency against every other curve of the same dataset
    and row: the groups where it is above (of those both define) and the mean difference."""
    out = []
    for own in (c for c in curves if c.method == method and c.granularity == "own rule"):
        for other in curves:
            if other is own or (other.dataset, other.row) != (own.dataset, own.row):
                continue
            a, b = np.array(own.values), np.array(other.values)
            both = np.isfinite(a) & np.isfinite(b)
            out.append(
                {
                    "dataset": own.dataset,
                    "statistic": own.row,
                    "method": f"{own.method}: {own.key}",
                    "against": f"{other.method}: {other.key}",
                    "groups_above": int((a[both] > b[both]).sum()),
                    "groups_compared": int(both.sum()),
                    "mean_difference": float(np.mean(a[both] - b[both])) if both.any() else math.nan,
                }
            )
    return out


def _figure(curves: Sequence[Curve], groups: int):
    datasets = sorted({c.dataset for c in curves})
    figure, axes = _common.new_figure(2 * len(datasets), width=4.8, height=3.4, columns=len(datasets))
    methods = sorted({c.method for c in curves})
    x = np.arange(1, groups + 1)
    for column, dataset in enumerate(datasets):
        for r, (row, figure_name) in enumerate((("ratio", "Fig. 6"), ("frequency", "Fig. 7"))):
            ax = axes[r * len(datasets) + column]
            for c in (c for c in curves if c.dataset == dataset and c.row == row):
                color = f"C{methods.index(c.method)}"
                label = f"{c.method}, {c.granularity} (runs: {c.runs})"
                ax.plot(x, c.values, _STYLE[c.granularity], marker="o", ms=3, color=color, label=label)
            ax.set(xlabel=f"group of steps (1..{groups}, equal parts of training)", ylabel=f"modification {row}")
            ax.set_title(f"{figure_name}: modification {row}, {dataset}", fontsize=9)
            ax.set_xticks(x)
            ax.legend(fontsize=6)
    figure.suptitle("CorGrad (Zhou et al., ECAI 2024), Figs. 6-7", fontsize=9)
    figure.set_dpi(85)  # a 2 x D grid of busy panels: keeps the PNG near 150 KB
    return figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``domaingrad analyze modification``."""
    parser.add_argument("paths", nargs="+", help="run directories, or directories to search for runs (a sweep)")
    parser.add_argument("--groups", type=int, default=10, help="equal groups of steps (default 10, the paper's)")
    _common.add_output_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    """Run ``domaingrad analyze modification``; returns the exit code."""
    if ns.groups < 1:
        raise DomainGradError(f"--groups must be >= 1, got {ns.groups}")
    outputs = _common.Outputs(ns.output_dir, "modification", ns.force)
    runs, skipped = [], []
    for run_dir in find_runs(ns.paths):
        stats = run_stats(run_dir, ns.groups)
        if stats is None:
            skipped.append(str(run_dir))
        else:
            runs.append(stats)
    for skipped_dir in skipped:
        print(f"skipped {skipped_dir}: its records hold no surgery statistics")
    if not runs:
        raise DomainGradError(
            "none of the runs has surgery statistics (mod_ratio, mod_freq, coarse_*/fine_* keys); "
            "train AgrSum, PCGrad, CorGrad, ANDMask, ... runs"
        )
    for run in runs:
        if run.records - 1 < ns.groups:
            print(f"note: {run.path} has {run.records} records for {ns.groups} groups; groups share records")
    curves = modification_curves(runs)
    comparisons = corgrad_comparisons(curves)
    rows = [
        {k: v for k, v in asdict(c).items() if k != "values"} | {"group": g + 1, "value": value}
        for c in curves
        for g, value in enumerate(c.values)
    ]
    for c in curves:
        print(f"{c.dataset:>14} {c.method:>24} {c.key:>17}: " + " ".join(f"{v:.3f}" for v in c.values))
    for cmp in comparisons:
        print(
            f"{cmp['dataset']}: {cmp['method']} above {cmp['against']} in {cmp['groups_above']}/"
            f"{cmp['groups_compared']} groups (mean difference {cmp['mean_difference']:+.4f})"
        )
    summary = {
        "args": vars(ns),
        "runs": [asdict(r) for r in runs],
        "skipped": skipped,
        "curves": [asdict(c) for c in curves],
        "comparisons": comparisons,
    }
    for path in outputs.write(summary, rows, _figure(curves, ns.groups)):
        print(f"wrote {path}")
    return 0
