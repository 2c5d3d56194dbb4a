"""``domaingrad report --top-hparams``: the hyperparameters each selection method picks.

As DomainBed's ``domainbed/scripts/list_top_hparams.py`` (Gulrajani and Lopez-Paz, "In
Search of Lost Domain Generalization", ICLR 2021) lists them, for every dataset,
algorithm and test environment at once instead of one given on its command line: per
selection method and per trial seed, the runs (hyperparameter draws, ``hparams_seed``)
in the method's ranking (:meth:`.selection.SelectionMethod.hparams_accs`: best
validation accuracy first, ties to the highest ``hparams_seed``), each with its
validation and reported accuracy, the checkpoint step, its hyperparameters (the
record's ``hparams``) and its job directories. The first run is the one the tables
report. DomainBed's script lists every run; by default only the selected one is listed
(``all_runs`` / ``--top-hparams-all`` lists every run).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

from ..errors import DomainGradError
from .names import count_environments, environment_names, order_algorithms, order_datasets
from .selection import grouped_records
from .summary import Report


@dataclass(frozen=True)
class RankedRun:
    """One hyperparameter draw of a group, as a selection method ranks it.

    Attributes:
        rank: 1 for the selected run.
        hparams_seed: the draw.
        step: the checkpoint the method chose in that run.
        val_acc, test_acc: validation and reported accuracy (fractions) at that checkpoint.
        hparams: the record's ``hparams`` (None if the records do not hold them).
        jobs: the job directories (names under the sweep directory) of the run's records
            (for leave-one-domain-out, also the runs with two test environments).
    """

    rank: int
    hparams_seed: object
    step: float
    val_acc: float
    test_acc: float
    hparams: dict | None
    jobs: list[str]


@dataclass
class HparamsGroup:
    """The ranked runs of one (selection method, dataset, algorithm, test env, trial seed)."""

    selection: str
    dataset: str
    algorithm: str
    test_env: int
    test_env_name: str
    trial_seed: int
    runs: list[RankedRun] = field(default_factory=list)


def top_hparams(report: Report, all_runs: bool = False) -> list[HparamsGroup]:
    """The ranked runs of every group under every selection method of ``report``.

    Groups in the tables' order: selection methods as in the report, then datasets and
    algorithms in DomainBed's order, test environments and trial seeds increasing. Groups
    where no run qualifies (an X) are left out, as DomainBed's script prints no run for them.

    Args:
        report: from :func:`.summary.build_report`.
        all_runs: every run of each group in ranking order (DomainBed's script); else only
            the selected one.
    """
    records = report.sweep.records
    job_of = report.sweep.job_of()
    datasets = order_datasets(r["args"]["dataset"] for r in records)
    algorithms = order_algorithms(r["args"]["algorithm"] for r in records)
    names = {
        d: environment_names(d, max(count_environments(r) for r in records if r["args"]["dataset"] == d))
        for d in datasets
    }
    groups = grouped_records(records)
    groups.sort(key=lambda g: (datasets.index(g[0][1]), algorithms.index(g[0][2]), g[0][3], g[0][0]))
    out = []
    for section in report.sections:
        for (trial_seed, dataset, algorithm, test_env), group in groups:
            ranked = section.method.hparams_accs(group)
            if not ranked:
                continue
            entry = HparamsGroup(section.method.key, dataset, algorithm, test_env, names[dataset][test_env], trial_seed)
            for rank, (choice, run) in enumerate(ranked if all_runs else ranked[:1], start=1):
                entry.runs.append(
                    RankedRun(
                        rank,
                        choice.record["args"]["hparams_seed"],
                        choice.record["step"],
                        float(choice.val_acc),
                        float(choice.test_acc),
                        choice.record.get("hparams"),
                        sorted({job_of.get(id(r), "?") for r in run}),
                    )
                )
            out.append(entry)
    return out


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%" if value == value else "NaN"


def _step(step: float) -> str:
    return str(int(step)) if float(step).is_integer() else repr(step)


def _hparams_text(hparams: dict | None) -> str:
    if hparams is None:
        return "(not recorded)"
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(hparams.items())) or "(none)"


def to_text(report: Report, groups: list[HparamsGroup]) -> str:
    """Markdown: a section per selection method, a heading per (dataset, algorithm, test env), a list per trial."""
    lines = [
        f"# Top hyperparameters: {report.sweep.root}",
        "",
        f"Total records: {len(report.sweep.records)}",
        "",
        "Per trial seed: rank. hparams_seed, the chosen checkpoint's step, validation and reported accuracy, "
        "hyperparameters and job directories (as DomainBed's list_top_hparams.py); rank 1 is the run the "
        "tables report.",
        "",
    ]
    for section in report.sections:
        lines += [f"## Model selection: {section.method.name}", ""]
        shown = [g for g in groups if g.selection == section.method.key]
        if not shown:
            lines += ["No group has a selected run (every cell of its tables is X).", ""]
        for i, g in enumerate(shown):
            key = (g.dataset, g.algorithm, g.test_env)
            if i == 0 or key != (shown[i - 1].dataset, shown[i - 1].algorithm, shown[i - 1].test_env):
                lines += [f"### {g.dataset}, {g.algorithm}, test env {g.test_env} ({g.test_env_name})", ""]
            lines.append(f"- trial_seed {g.trial_seed}:")
            for r in g.runs:
                lines += [
                    f"  {r.rank}. hparams_seed {r.hparams_seed}: step {_step(r.step)}, val {_percent(r.val_acc)}, "
                    f"reported {_percent(r.test_acc)}",
                    f"     hparams: {_hparams_text(r.hparams)}",
                    f"     jobs: {', '.join(r.jobs)}",
                ]
            if i + 1 == len(shown) or key != (shown[i + 1].dataset, shown[i + 1].algorithm, shown[i + 1].test_env):
                lines.append("")
    for note in report.all_notes():
        lines += [note, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_dict(report: Report, groups: list[HparamsGroup]) -> dict:
    """The JSON document: per selection method, every group with its ranked runs."""
    return {
        "version": 1,
        "kind": "top_hparams",
        "sweep_dir": str(report.sweep.root),
        "total_records": len(report.sweep.records),
        "flags": [f.to_dict() for f in report.flags],
        "notes": report.all_notes(),
        "selections": [
            {
                "selection": s.method.key,
                "name": s.method.name,
                "groups": [
                    {
                        "dataset": g.dataset,
                        "algorithm": g.algorithm,
                        "test_env": g.test_env,
                        "test_env_name": g.test_env_name,
                        "trial_seed": g.trial_seed,
                        "runs": [vars(r).copy() for r in g.runs],
                    }
                    for g in groups
                    if g.selection == s.method.key
                ],
            }
            for s in report.sections
        ],
    }


#: columns of the CSV output (one row per ranked run)
CSV_FIELDS = [
    "selection",
    "dataset",
    "algorithm",
    "test_env",
    "trial_seed",
    "rank",
    "hparams_seed",
    "step",
    "val_acc",
    "test_acc",
    "hparams",
    "jobs",
    "note",
]


def to_csv(report: Report, groups: list[HparamsGroup]) -> str:
    """One row per ranked run (``hparams`` and ``jobs`` as JSON), then one per flag and note
    (``selection`` = ``notes``, the text in ``note``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        for r in g.runs:
            writer.writerow(
                {
                    "selection": g.selection,
                    "dataset": g.dataset,
                    "algorithm": g.algorithm,
                    "test_env": g.test_env,
                    "trial_seed": g.trial_seed,
                    "rank": r.rank,
                    "hparams_seed": r.hparams_seed,
                    "step": r.step,
                    "val_acc": repr(r.val_acc),
                    "test_acc": repr(r.test_acc),
                    "hparams": json.dumps(r.hparams, sort_keys=True),
                    "jobs": json.dumps(r.jobs),
                    "note": "",
                }
            )
    for note in report.all_notes():
        writer.writerow({**{k: "" for k in CSV_FIELDS}, "selection": "notes", "note": note})
    return buffer.getvalue()


#: the formats ``--top-hparams`` writes
FORMATS = ("markdown", "csv", "json")


def render_top_hparams(report: Report, fmt: str, all_runs: bool = False) -> str:
    """The listing of :func:`top_hparams` as ``markdown`` (text), ``csv`` or ``json``.

    Raises:
        DomainGradError: for another format (LaTeX has no listing).
    """
    if fmt not in FORMATS:
        raise DomainGradError(f"--top-hparams writes {', '.join(FORMATS)}; got --format {fmt}")
    groups = top_hparams(report, all_runs)
    if fmt == "json":
        return json.dumps(to_dict(report, groups), indent=2) + "\n"
    return to_csv(report, groups) if fmt == "csv" else to_text(report, groups)
