"""``domaingrad report SWEEP_DIR``: model selection, tables, statistics and plots of a finished sweep.

``add_parser`` imports nothing heavy; the work happens in :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import DomainGradError
from ..layout import SPLIT_70_10_20

SELECTIONS = ("auto", "all", "iid", "loo", "oracle", SPLIT_70_10_20)
FORMATS = ("markdown", "latex", "csv", "json")

DESCRIPTION = """\
Read every job's results.jsonl under SWEEP_DIR (DomainBed's layout, also sweeps written by
DomainBed itself) and print DomainBed's result tables: per dataset, rows = algorithms, columns
= test environments + Avg, mean +/- standard error over trial seeds of the selected accuracy.
Unreadable lines are reported (path:line) and skipped; jobs without `done` and jobs listed in
sweep.json but absent are listed on stderr. Done jobs without a record, steps recorded twice
(counted once, the last record kept) and the runs leave-one-domain-out lacks are flagged on
stderr and in the output. Runs of a dataset that differ in an argument a sweep keeps fixed
(steps, checkpoint_freq, holdout_fraction, hparams, ...) are refused unless --allow-mixed."""

SELECTION_HELP = (
    "model selection: iid = training-domain validation, loo = leave-one-domain-out, "
    "oracle = test-domain validation (last checkpoint) (Gulrajani and Lopez-Paz, ICLR 2021); "
    "70/10/20 = best source validation, reported on the held-out domain's test part (Mansilla et "
    "al., ICCV 2021); all = iid+loo+oracle (+70/10/20 for 70/10/20 runs), auto (default) = "
    "70/10/20 for runs with args.split_protocol '70/10/20', else iid+loo+oracle like DomainBed's "
    "collect_results. Between hparams draws, equal validation accuracies go to the highest "
    "hparams_seed and a NaN one ranks below every number, as in DomainBed"
)


#: earlier spellings of --selection values, still accepted
SELECTION_ALIASES = {"seed002": SPLIT_70_10_20}


def _selection_name(value: str) -> str:
    return SELECTION_ALIASES.get(value, value)


def add_parser(subparsers) -> None:
    """Register ``report`` on the CLI's subparsers (argparse only)."""
    p = subparsers.add_parser(
        "report", help="model selection, result tables, Wilcoxon tests and plots of a sweep", description=DESCRIPTION
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="sweep directory (one sub-directory per job)")
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="auto",
        type=_selection_name,
        help=SELECTION_HELP + " (the old spelling seed002 is accepted for 70/10/20)",
    )
    p.add_argument("--format", choices=FORMATS, default="markdown", help="output format (default markdown)")
    p.add_argument("--output", "-o", metavar="FILE", default=None, help="write the report to FILE (default stdout)")
    p.add_argument(
        "--baseline",
        metavar="ALG",
        default=None,
        help="paired Wilcoxon test of every algorithm against ALG per test env; * marks p < 0.05",
    )
    p.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="write box plots (as Fig. 3 of Mansilla et al., ICCV 2021) and training curves as PNG into DIR",
    )
    p.add_argument(
        "--in-domain",
        "--in_domain",
        dest="in_domain",
        action="store_true",
        help="add DMG's in-domain tables: mean accuracy on the source envs' held-out split",
    )
    p.add_argument(
        "--latest",
        action="store_true",
        help="also use jobs without `done` (their records up to their latest checkpoint), "
        "as DomainBed's collect_results does",
    )
    p.add_argument(
        "--plot-sharey",
        action="store_true",
        help="with --plots: one y axis for all test environments of a box plot (default: each panel fits its data)",
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="merge runs of a dataset that differ in arguments other than the swept ones (dataset, algorithm, "
        "test_envs, hparams_seed, trial_seed), e.g. --steps; refused by default, flagged in the output if allowed",
    )
    p.add_argument(
        "--top-hparams",
        action="store_true",
        help="instead of the tables, list the hyperparameters each selection method picks per dataset, "
        "algorithm, test environment and trial seed (DomainBed's list_top_hparams.py); --format markdown "
        "(text), csv or json",
    )
    p.add_argument(
        "--top-hparams-all",
        action="store_true",
        help="like --top-hparams, listing every hyperparameter draw in the method's ranking, not only the selected one",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --output file or plot files")


def run(ns: argparse.Namespace) -> int:
    """Build and write the report; returns 0. Raises DomainGradError (exit code 2) on bad input."""
    from .records import load_sweep
    from .render import render
    from .summary import build_report

    output = Path(ns.output) if ns.output else None
    if ns.plot_sharey and not ns.plots:
        raise DomainGradError("--plot-sharey applies to the box plots: add --plots DIR")
    listing = ns.top_hparams or ns.top_hparams_all
    if listing and ns.format == "latex":
        raise DomainGradError("--top-hparams writes --format markdown (text), csv or json, not latex")
    if output is not None:
        _refuse_overwrite([output], ns.force, "--output")
        if not output.parent.is_dir():
            raise DomainGradError(f"--output: directory {output.parent} does not exist; create it first")
    sweep = load_sweep(ns.sweep_dir, include_incomplete=ns.latest)
    for line in sweep.status_lines():
        print(line, file=sys.stderr)
    report = build_report(sweep, ns.selection, ns.baseline, ns.in_domain, allow_mixed=ns.allow_mixed)
    for flag in report.flags:
        print(f"{flag.level}: {flag.message}", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    plot_dir = Path(ns.plots) if ns.plots else None
    if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
        raise DomainGradError(f"--plots: {plot_dir} is a file, expected a directory (it is created if absent)")
    if plot_dir is not None:
        from .plots import planned_files, write_plots  # matplotlib only when plots are asked for

        _refuse_overwrite(planned_files(report, plot_dir), ns.force, "--plots")
    if listing:
        from .top_hparams import render_top_hparams

        text = render_top_hparams(report, ns.format, all_runs=ns.top_hparams_all)
    else:
        text = render(report, ns.format)
    if output is None:
        sys.stdout.write(text)
    else:
        _atomic_write(output, text)
        print(f"wrote {output}", file=sys.stderr)
    if plot_dir is not None:
        for path in write_plots(report, plot_dir, sharey=ns.plot_sharey):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _refuse_overwrite(paths: list[Path], force: bool, option: str) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise DomainGradError(
            f"{option}: {shown} {verb}; nothing was written. Pass --force to overwrite, or choose another {option} path"
        )
    for p in existing:
        if p.is_dir():
            raise DomainGradError(f"{option}: {p} is a directory, expected a file path")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
