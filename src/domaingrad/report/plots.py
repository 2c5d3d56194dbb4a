"""PNG figures: per-environment box plots and training curves.

The box plots follow Fig. 3 of Mansilla, Echeveste, Milone, Ferrante, "Domain
Generalization via Gradient Surgery", ICCV 2021.

Drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no
display is needed and the caller's matplotlib backend is left alone.

- ``box_<selection>_<dataset>.png`` (``/`` in either name written as ``_``, e.g.
  ``box_70_10_20_PACS.png``): one panel per test environment; per algorithm a box
  of the selected accuracies over trial seeds (box = quartiles, orange line = median,
  green triangle = mean, whiskers = minimum and maximum, as that Fig. 3; a legend names
  the mean and median marks), the number of trials ``n=`` under each box; an asterisk
  above an algorithm whose paired Wilcoxon test against the baseline gives p < 0.05.
  The title announces the asterisk only when some test of the figure has enough
  trials to reach p < 0.05 (:func:`.stats.smallest_p_value`), and otherwise says that
  it cannot. ``sharey``: one y axis for all panels (``--plot-sharey``), else each panel
  fits its own data.
- ``curves_<dataset>.png``: one panel per test environment; accuracy on the test
  environment (its in split, or its test part for 70/10/20 runs) against the training
  step, one thin line per run with a single test env, coloured by algorithm.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .names import count_environments, environment_names, order_algorithms, order_datasets
from .records import SPLIT_70_10_20
from .stats import ALPHA, smallest_p_value
from .summary import Report, Section

#: the mean and median marks of the box plots (the legend draws the same)
MEAN_COLOUR, MEDIAN_COLOUR = "green", "C1"
MEAN_PROPS: dict[str, Any] = {"marker": "^", "markerfacecolor": MEAN_COLOUR, "markeredgecolor": MEAN_COLOUR}
MEDIAN_PROPS: dict[str, Any] = {"color": MEDIAN_COLOUR}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def planned_files(report: Report, directory: Path) -> list[Path]:
    """Every PNG :func:`write_plots` would write into ``directory`` for ``report``."""
    datasets = order_datasets(r["args"]["dataset"] for r in report.sweep.records)
    files = [directory / f"box_{_safe(s.method.key)}_{_safe(d)}.png" for s in report.sections for d in datasets]
    return files + [directory / f"curves_{_safe(d)}.png" for d in datasets]


def write_plots(report: Report, directory: Path, sharey: bool = False) -> list[Path]:
    """Draw every figure of :func:`planned_files` (overwriting; the caller checks first); returns the paths.

    ``sharey``: the box plots' panels share one y axis (:func:`box_figure`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in order_datasets(r["args"]["dataset"] for r in report.sweep.records):
        for section in report.sections:
            path = directory / f"box_{_safe(section.method.key)}_{_safe(dataset)}.png"
            _save(box_figure(report, section, dataset, sharey=sharey), path)
            written.append(path)
        path = directory / f"curves_{_safe(dataset)}.png"
        _save(curves_figure(report, dataset), path)
        written.append(path)
    return written


def _save(figure: Figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    FigureCanvasAgg(figure).print_png(str(tmp))
    tmp.replace(path)


def _env_names(report: Report, dataset: str) -> list[str]:
    n_envs = max(count_environments(r) for r in report.sweep.records if r["args"]["dataset"] == dataset)
    return environment_names(dataset, n_envs)


def box_figure(report: Report, section: Section, dataset: str, sharey: bool = False) -> Figure:
    """Fig. 3 of Mansilla et al. (ICCV 2021) for one dataset and selection method: one panel per test env.

    Accuracies in percent. ``sharey``: every panel on the same y axis (limits from all
    panels' values), so that test environments can be compared by eye; otherwise each
    panel's limits fit its own values.
    """
    envs = _env_names(report, dataset)
    algorithms = order_algorithms(r["args"]["algorithm"] for r in report.sweep.records)
    significant = {(t.test_env, t.algorithm) for t in section.tests if t.dataset == dataset and t.significant}
    figure = Figure(figsize=(max(4.0, 1.0 + 0.55 * len(algorithms)) * len(envs), 4.2), layout="constrained")
    axes = figure.subplots(1, len(envs), squeeze=False, sharey=sharey)[0]
    panels = [
        [
            [100 * s.test_acc for s in section.selected if (s.dataset, s.algorithm, s.test_env) == (dataset, a, env)]
            for a in algorithms
        ]
        for env in range(len(envs))
    ]
    every_value = [v for data in panels for d in data for v in d]
    for env, (ax, env_name, data) in enumerate(zip(axes, envs, panels)):
        positions = [i + 1 for i, d in enumerate(data) if d]
        if positions:
            ax.boxplot(
                [d for d in data if d],
                positions=positions,
                whis=(0, 100),
                showmeans=True,
                meanprops=MEAN_PROPS,
                medianprops=MEDIAN_PROPS,
            )
        for i, algorithm in enumerate(algorithms):
            if (env, algorithm) in significant and data[i]:
                ax.annotate(
                    "*", (i + 1, max(data[i])), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=14
                )
            if data[i]:  # the number of trials, at the bottom of the panel
                ax.text(
                    i + 1,
                    0.01,
                    f"n={len(data[i])}",
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize="small",
                )
        ax.set_xticks(range(1, len(algorithms) + 1), algorithms, rotation=45, ha="right")
        ax.set_xlim(0.5, len(algorithms) + 0.5)
        values = every_value if sharey else [v for d in data for v in d]
        if values:  # headroom for the asterisks, room below for n=
            pad = max(0.5, 0.08 * (max(values) - min(values)))
            ax.set_ylim(min(values) - 2 * pad, max(values) + 2 * pad)
        ax.set_title(f"test env {env}: {env_name}")
        if env == 0 or not sharey:
            ax.set_ylabel("accuracy (%)")
    if every_value:
        axes[0].legend(
            handles=[
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="^",
                    markerfacecolor=MEAN_COLOUR,
                    markeredgecolor=MEAN_COLOUR,
                    label="mean",
                ),
                Line2D([], [], color=MEDIAN_COLOUR, label="median"),
            ],
            fontsize="small",
            loc="best",
        )
    figure.suptitle(f"{dataset}: {section.method.name}" + _significance_title(report, section, dataset))
    return figure


def _significance_title(report: Report, section: Section, dataset: str) -> str:
    """The title's word on the asterisks: announced only if some test of the figure can reach p < ALPHA."""
    if report.baseline is None:
        return ""
    n_pairs = [len(t.trial_seeds) for t in section.tests if t.dataset == dataset]
    if any(smallest_p_value(n) < ALPHA for n in n_pairs):
        return f"; * p < {ALPHA} vs {report.baseline} (paired Wilcoxon)"
    n = max(n_pairs, default=0)
    return (
        f"; paired Wilcoxon vs {report.baseline}: {n} paired trial(s) cannot give p < {ALPHA} "
        f"(smallest p {smallest_p_value(n):.3g})"
    )


def curves_figure(report: Report, dataset: str) -> Figure:
    """Test-environment accuracy against step for every single-test-env run of ``dataset``."""
    envs = _env_names(report, dataset)
    algorithms = order_algorithms(r["args"]["algorithm"] for r in report.sweep.records)
    colours = {a: f"C{i % 10}" for i, a in enumerate(algorithms)}
    kind = "test" if report.protocol == SPLIT_70_10_20 else "in"
    figure = Figure(figsize=(4.0 * len(envs), 3.5), layout="constrained")
    axes = figure.subplots(1, len(envs), squeeze=False)[0]
    labelled: set[tuple[int, str]] = set()
    for job_id, records in report.sweep.records_by_job.items():
        args = records[0]["args"]
        if args["dataset"] != dataset or len(args["test_envs"]) != 1 or not _used(report, job_id):
            continue
        env, algorithm = args["test_envs"][0], args["algorithm"]
        points = sorted((r["step"], 100 * r[f"env{env}_{kind}_acc"]) for r in records)
        label = algorithm if (env, algorithm) not in labelled else None
        labelled.add((env, algorithm))
        axes[env].plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=colours[algorithm],
            alpha=0.5,
            linewidth=1,
            label=label,
        )
    for env, (ax, env_name) in enumerate(zip(axes, envs)):
        ax.set_title(f"test env {env}: {env_name}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"test-env accuracy, {kind} split (%)")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ordered = sorted(zip(labels, handles), key=lambda lh: algorithms.index(lh[0]))
            ax.legend([h for _, h in ordered], [lab for lab, _ in ordered], fontsize="small")
    figure.suptitle(f"{dataset}: training curves (one line per run)")
    return figure


def _used(report: Report, job_id: str) -> bool:
    job = next(j for j in report.sweep.jobs if j.id == job_id)
    return job.done or report.sweep.include_incomplete
