"""Render a :class:`.summary.Report` as Markdown, LaTeX (DomainBed's ``--latex`` document), CSV or JSON.

Cell text is DomainBed's ``format_mean`` ("m.m +/- e.e", LaTeX "m.m $\\pm$ e.e", "X" when
missing); an asterisk follows a cell whose paired Wilcoxon test against the baseline
gives p < 0.05 (the convention of Table 1 of Mansilla, Echeveste, Milone, Ferrante, "Domain
Generalization via Gradient Surgery", ICCV 2021). Every format carries the report's flags
and notes (:meth:`.summary.Report.all_notes`): paragraphs after the tables (Markdown,
LaTeX), rows with ``table`` = ``notes`` (CSV), the ``flags`` and ``notes`` fields (JSON).
"""

from __future__ import annotations

import csv
import io
import json

from ..layout import SPLIT_70_10_20, JobState
from .stats import ALPHA
from .summary import Report, Section
from .tables import Cell, Table

FORMATS = ("markdown", "latex", "csv", "json")


def render(report: Report, fmt: str) -> str:
    """The report as text in ``fmt`` (one of :data:`FORMATS`)."""
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv, "json": to_json}[fmt](report)


def cell_text(cell: Cell, latex: bool = False) -> str:
    """DomainBed's cell text, with an asterisk when p < 0.05 against the baseline."""
    text = cell.latex if latex else cell.text
    if cell.p_value is not None and cell.p_value < ALPHA:
        return text + ("$^*$" if latex else "*")
    return text


def _tables_in_order(section: Section) -> list[tuple[Table, str]]:
    """Out-of-domain dataset tables, each followed by its in-domain twin, then the averages."""
    out = []
    for i, table in enumerate(section.tables):
        out.append((table, "out"))
        if section.in_domain_tables:
            out.append((section.in_domain_tables[i], "in"))
    return out


def _significance_line(report: Report) -> str | None:
    if report.baseline is None:
        return None
    return (
        f"* p < {ALPHA}: paired two-sided Wilcoxon signed-rank test against {report.baseline} "
        "over trial seeds, per test environment (as Mansilla et al., ICCV 2021)."
    )


def _protocol_line(report: Report) -> str:
    if report.protocol == SPLIT_70_10_20:
        return (
            "Protocol: 70/10/20 train/validation/test split per domain (Mansilla et al., ICCV 2021); "
            "reported = test part of the held-out domain."
        )
    return "Protocol: DomainBed in/out split; reported = in split of the test environment."


def to_markdown(report: Report) -> str:
    lines = [
        f"# Results: {report.sweep.root}",
        "",
        f"Total records: {len(report.sweep.records)}",
        "",
        _protocol_line(report),
        "",
    ]
    status = report.sweep.status_lines()
    if len(status) > 1 or report.sweep.problems:
        lines += ["```", *status, "```", ""]
    for section in report.sections:
        lines += [f"## Model selection: {section.method.name}", ""]
        for table, kind in _tables_in_order(section):
            name = table.dataset or "Averages"
            lines += [f"### {name}" + (", in-domain (source held-out split)" if kind == "in" else ""), ""]
            lines += _markdown_table(table) + [""]
    for line in [_significance_line(report), *report.all_notes()]:
        if line:
            lines += [line, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _markdown_table(table: Table) -> list[str]:
    def row(items: list[str]) -> str:
        return "| " + " | ".join(items) + " |"

    lines = [row(["Algorithm", *table.columns]), row(["---"] * (len(table.columns) + 1))]
    for algorithm, cells, (_, avg) in zip(table.rows, table.cells, table.avg):
        lines.append(row([algorithm, *(cell_text(c) for c in cells), avg]))
    return lines


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def to_latex(report: Report) -> str:
    """DomainBed's ``collect_results.py --latex`` document (booktabs + adjustbox)."""
    lines = [
        "\\documentclass{article}",
        "\\usepackage{booktabs}",
        "\\usepackage{adjustbox}",
        "\\begin{document}",
        "\\section{Full DomainBed results}",
        f"% Total records: {len(report.sweep.records)}",
        f"% {_protocol_line(report)}",
    ]
    lines += [f"% {line}" for line in report.sweep.status_lines()]
    for section in report.sections:
        lines += ["", f"\\subsection{{Model selection: {section.method.name}}}"]
        for table, kind in _tables_in_order(section):
            title = _latex_escape(table.dataset) if table.dataset else "Averages"
            lines += ["", f"\\subsubsection{{{title}" + (", in-domain" if kind == "in" else "") + "}", ""]
            lines += _latex_table(table, colwidth=20 if table.dataset else 25)
    for line in [_significance_line(report), *report.all_notes()]:
        if line:
            lines += ["", _latex_escape(line).replace("\\* p", "$^*$ p")]
    lines.append("\\end{document}")
    return "\n".join(lines) + "\n"


def _latex_table(table: Table, colwidth: int) -> list[str]:
    def row(items: list[str]) -> str:  # DomainBed's misc.print_row with latex=True (without truncation)
        return " & ".join(str(x).ljust(colwidth) for x in items) + " \\\\"

    header = ["\\textbf{" + _latex_escape(c) + "}" for c in ["Algorithm", *table.columns]]
    lines = [
        "\\begin{center}",
        "\\adjustbox{max width=\\textwidth}{%",
        "\\begin{tabular}{l" + "c" * len(table.columns) + "}",
        "\\toprule",
        row(header),
        "\\midrule",
    ]
    for algorithm, cells, (_, avg) in zip(table.rows, table.cells, table.avg):
        lines.append(row([_latex_escape(algorithm), *(cell_text(c, latex=True) for c in cells), avg]))
    return lines + ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]


#: columns of the CSV output (one row per table cell, long format)
CSV_FIELDS = [
    "selection",
    "metric",
    "table",
    "algorithm",
    "column",
    "test_env",
    "mean",
    "err",
    "n",
    "text",
    "p_value",
    "trial_seeds",
    "values",
]


def note_rows(report: Report) -> list[dict]:
    """The CSV rows of the report's flags and notes: ``table`` = ``notes``, ``column`` = the
    flag's kind (``note`` for other notes), ``text`` = the message; other fields empty."""
    kinds = [f.kind for f in report.flags] + ["note"] * len(report.notes)
    return [
        {**{name: "" for name in CSV_FIELDS}, "table": "notes", "column": kind, "text": text}
        for kind, text in zip(kinds, report.all_notes())
    ]


def csv_rows(report: Report) -> list[dict]:
    """One dict per table cell (and per Avg cell), then one per flag and note
    (:func:`note_rows`): the CSV's rows before writing."""
    rows = []
    for section in report.sections:
        for table, _ in _tables_in_order(section):
            for algorithm, cells, (avg_value, avg_text) in zip(table.rows, table.cells, table.avg):
                for j, cell in enumerate(cells):
                    rows.append(
                        {
                            "selection": section.method.key,
                            "metric": table.metric,
                            "table": table.dataset or "Averages",
                            "algorithm": algorithm,
                            "column": table.columns[j],
                            "test_env": j if table.dataset else "",
                            "mean": _num(cell.mean),
                            "err": _num(cell.err),
                            "n": len(cell.values),
                            "text": cell_text(cell),
                            "p_value": _num(cell.p_value),
                            "trial_seeds": json.dumps(cell.trial_seeds),
                            "values": json.dumps(cell.values),
                        }
                    )
                rows.append(
                    {
                        "selection": section.method.key,
                        "metric": table.metric,
                        "table": table.dataset or "Averages",
                        "algorithm": algorithm,
                        "column": "Avg",
                        "test_env": "",
                        "mean": _num(avg_value),
                        "err": "",
                        "n": "",
                        "text": avg_text,
                        "p_value": "",
                        "trial_seeds": "",
                        "values": "",
                    }
                )
    return rows + note_rows(report)


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buffer.getvalue()


def report_dict(report: Report) -> dict:
    """The JSON document: sweep status, every table with per-trial values, selections, tests;
    ``flags`` lists the report's flags (kind, level, message, jobs) and ``notes`` the text of
    every flag and note."""
    sweep = report.sweep
    return {
        "version": 1,
        "sweep_dir": str(sweep.root),
        "protocol": report.protocol,
        "total_records": len(sweep.records),
        "jobs": {state.value: [j.id for j in sweep.jobs_in_state(state)] for state in JobState},
        "incomplete_included": sweep.include_incomplete,
        "problems": [{"path": str(p.path), "line": p.line, "message": p.message} for p in sweep.problems],
        "baseline": report.baseline,
        "alpha": ALPHA,
        "flags": [f.to_dict() for f in report.flags],
        "notes": report.all_notes(),
        "selections": [_section_dict(s) for s in report.sections],
    }


def _section_dict(section: Section) -> dict:
    return {
        "selection": section.method.key,
        "name": section.method.name,
        "tables": [_table_dict(t) for t in section.tables + section.in_domain_tables],
        "selected": [vars(s).copy() for s in section.selected],
        "tests": [t.to_dict() for t in section.tests + section.in_domain_tests],
    }


def _table_dict(table: Table) -> dict:
    rows = []
    for algorithm, cells, (avg_value, avg_text) in zip(table.rows, table.cells, table.avg):
        rows.append(
            {
                "algorithm": algorithm,
                "avg": avg_value,
                "avg_text": avg_text,
                "cells": [
                    {
                        "column": col,
                        "mean": c.mean,
                        "err": c.err,
                        "text": cell_text(c),
                        "p_value": c.p_value,
                        "trial_seeds": c.trial_seeds,
                        "values": c.values,
                    }
                    for col, c in zip(table.columns, cells)
                ],
            }
        )
    return {
        "title": table.title,
        "dataset": table.dataset,
        "metric": table.metric,
        "columns": table.columns,
        "rows": rows,
    }


def to_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2) + "\n"
