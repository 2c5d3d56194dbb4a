"""Tables as DomainBed's collect_results builds them, and their Markdown/LaTeX/CSV/JSON forms."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from domaingrad.report.records import load_sweep
from domaingrad.report.render import render, to_latex, to_markdown
from domaingrad.report.summary import build_report
from domaingrad.report.tables import format_mean
from tests.report.conftest import cmnist_trials, write_job


def _sem_percent(values):
    """Population std / sqrt(n), in percent, written out."""
    m = sum(values) / len(values)
    return 100 * math.sqrt(sum((v - m) ** 2 for v in values) / len(values)) / math.sqrt(len(values))


def test_format_mean_is_domainbeds():
    data = [0.5, 0.6, 0.7]  # mean 60.0; population std .0816 / sqrt 3 = 4.71%
    mean, err, text = format_mean(data, latex=False)
    assert mean == pytest.approx(60.0) and err == pytest.approx(_sem_percent(data))
    assert text == "60.0 +/- 4.7"
    assert format_mean(data, latex=True)[2] == "60.0 $\\pm$ 4.7"
    assert format_mean([0.25], latex=False)[2] == "25.0 +/- 0.0"
    assert format_mean([], latex=False) == (None, None, "X")


# ERM: env0 trials .70/.80, env1 .50/.60, env2 trial 0 only .10 ; IRM: env0 and env1 only
ACCS = {
    ("ERM", 0, 0): 0.70,
    ("ERM", 0, 1): 0.80,
    ("ERM", 1, 0): 0.50,
    ("ERM", 1, 1): 0.60,
    ("ERM", 2, 0): 0.10,
    ("IRM", 0, 0): 0.65,
    ("IRM", 0, 1): 0.75,
    ("IRM", 1, 0): 0.55,
    ("IRM", 1, 1): 0.45,
}


@pytest.fixture
def report(sweep_dir):
    write_job(sweep_dir, "job", cmnist_trials(ACCS))
    return build_report(load_sweep(sweep_dir), selection="iid")


def test_dataset_and_averages_tables(report):
    dataset_table, averages = report.sections[0].tables
    assert dataset_table.columns == ["+90%", "+80%", "-90%", "Avg"] and dataset_table.rows == ["ERM", "IRM"]
    erm, irm = dataset_table.cells
    assert [c.text for c in erm] == [
        f"75.0 +/- {_sem_percent([0.7, 0.8]):.1f}",
        f"55.0 +/- {_sem_percent([0.5, 0.6]):.1f}",
        "10.0 +/- 0.0",
    ]
    assert dataset_table.avg[0] == (pytest.approx((75 + 55 + 10) / 3), f"{(75 + 55 + 10) / 3:.1f}")
    assert irm[2].text == "X" and dataset_table.avg[1] == (None, "X")  # a missing env makes Avg X
    # averages: per trial the mean over its envs (trial 0: (.7+.5+.1)/3, trial 1: (.8+.6)/2), then mean +- SE
    trial_means = [(0.7 + 0.5 + 0.1) / 3, (0.8 + 0.6) / 2]
    cell = averages.cells[0][0]
    assert cell.mean == pytest.approx(100 * sum(trial_means) / 2)
    assert cell.err == pytest.approx(_sem_percent(trial_means))
    assert averages.avg[0][1] == f"{100 * sum(trial_means) / 2:.1f}"


def test_markdown_structure_and_numbers(report):
    text = to_markdown(report)
    lines = text.splitlines()
    assert "## Model selection: training-domain validation set" in lines
    start = lines.index("### ColoredMNIST") + 2
    assert lines[start] == "| Algorithm | +90% | +80% | -90% | Avg |"
    assert lines[start + 1] == "| --- | --- | --- | --- | --- |"
    assert lines[start + 2] == f"| ERM | 75.0 +/- 3.5 | 55.0 +/- 3.5 | 10.0 +/- 0.0 | {140 / 3:.1f} |"
    assert lines[start + 3] == "| IRM | 70.0 +/- 3.5 | 50.0 +/- 3.5 | X | X |"
    assert "### Averages" in lines


def test_latex_is_domainbeds_document(report):
    text = to_latex(report)
    assert text.startswith("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{adjustbox}\n")
    assert "\\subsection{Model selection: training-domain validation set}" in text
    assert "\\subsubsection{ColoredMNIST}" in text and "\\subsubsection{Averages}" in text
    assert "\\begin{tabular}{lcccc}" in text and text.rstrip().endswith("\\end{document}")
    rows = [line for line in text.splitlines() if line.startswith("ERM ")]
    cells = [c.strip() for c in rows[0].removesuffix("\\\\").split("&")]
    assert cells == ["ERM", "75.0 $\\pm$ 3.5", "55.0 $\\pm$ 3.5", "10.0 $\\pm$ 0.0", f"{140 / 3:.1f}"]
    header = [line for line in text.splitlines() if line.startswith("\\textbf{Algorithm}")][0]
    assert "\\textbf{+90\\%}" in header and header.count("&") == 4
    assert text.count("\\toprule") == text.count("\\midrule") == text.count("\\bottomrule") == 2


def test_csv_and_json_round_trip(report):
    document = json.loads(render(report, "json"))
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    (section,) = document["selections"]
    from_json = {}
    for table in section["tables"]:
        for row in table["rows"]:
            for cell in row["cells"]:
                from_json[(table["dataset"] or "Averages", row["algorithm"], cell["column"])] = cell
            from_json[(table["dataset"] or "Averages", row["algorithm"], "Avg")] = {
                "mean": row["avg"],
                "text": row["avg_text"],
                "values": None,
            }
    assert len(rows) == len(from_json) == 2 * 4 + 2 * 2
    for row in rows:
        cell = from_json[(row["table"], row["algorithm"], row["column"])]
        assert row["text"] == cell["text"]
        assert (float(row["mean"]) if row["mean"] else None) == cell["mean"]
        if cell["values"] is not None:
            assert json.loads(row["values"]) == cell["values"]
    assert from_json[("ColoredMNIST", "ERM", "+90%")]["values"] == [0.7, 0.8]
    assert from_json[("ColoredMNIST", "ERM", "+90%")]["trial_seeds"] == [0, 1]
    assert document["total_records"] == 2 * len(ACCS)


def test_in_domain_tables_beside_out_of_domain(sweep_dir):
    write_job(sweep_dir, "job", cmnist_trials(ACCS))
    report = build_report(load_sweep(sweep_dir), selection="iid", in_domain=True)
    text = to_markdown(report)
    assert text.index("### ColoredMNIST\n") < text.index("### ColoredMNIST, in-domain (source held-out split)")
    # cmnist_trials: the selected (last) checkpoint has out-acc .6 on every source env
    in_table = report.sections[0].in_domain_tables[0]
    assert in_table.cells[0][0].text == "60.0 +/- 0.0" and in_table.metric.startswith("in-domain")
