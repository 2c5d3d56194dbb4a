"""Modification ratio and frequency of surgery runs in ten groups of steps (CorGrad Figs. 6-7)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from domaingrad.analysis import modification as M
from domaingrad.cli import main
from domaingrad.errors import DomainGradError
from domaingrad.run.output import read_records
from tests.analysis.plots import check_png


def test_group_means_weigh_each_record_by_its_steps_in_the_group():
    # a record at step s holds the mean over the steps after the previous record up to s
    records = [{"step": s, "x": v} for s, v in ((0, 1.0), (5, 2.0), (10, 3.0), (15, 4.0), (19, 5.0))]
    means = M.group_means(records[::-1], "x", total_steps=20, groups=4)  # any order
    # group 0 = steps 0..4: step 0 from the first record, 1..4 from the second; and so on
    assert means.tolist() == pytest.approx([9 / 5, 14 / 5, 19 / 5, 24 / 5], rel=1e-12)
    # a record without the key (or NaN) leaves its steps out; an uncovered group is NaN
    holes = [{"step": 0, "x": 1.0}, {"step": 9, "x": 3.0}, {"step": 14}, {"step": 19, "x": float("nan")}]
    means = M.group_means(holes, "x", total_steps=20, groups=4)
    assert means[:2].tolist() == pytest.approx([(1 + 3 * 4) / 5, 3.0]) and np.isnan(means[2:]).all()
    assert M.group_means([{"step": 0, "x": 2.0}], "x", total_steps=1, groups=10)[0] == 2.0
    with pytest.raises(ValueError, match=">= 1"):
        M.group_means(records, "x", total_steps=0)


def fake_run(dataset, method, values, steps=20):
    values = {k: [float(v)] * 4 if not isinstance(v, list) else v for k, v in values.items()}
    return M.RunStats("p", dataset, method, [0], steps, 5, values)


def test_curves_average_runs_and_compare_corgrad_with_every_other_rule():
    runs = [
        fake_run("A", "CorGrad", {"mod_freq": 0.4, "coarse_mod_freq": 0.2, "fine_mod_freq": 0.6, "mod_ratio": 0.3}),
        fake_run("A", "CorGrad", {"mod_freq": 0.7, "coarse_mod_freq": 0.2, "fine_mod_freq": [0.6, 0.6, math.nan, 0.6]}),
        fake_run("A", "PCGrad", {"mod_freq": [0.1, 0.6, 0.1, 0.1], "mod_ratio": 0.1}),
        fake_run("B", "PCGrad", {"mod_freq": 0.9}),
    ]
    curves = {(c.dataset, c.method, c.key): c for c in M.modification_curves(runs)}
    assert curves[("A", "CorGrad", "mod_freq")].values == pytest.approx([0.55] * 4)
    assert curves[("A", "CorGrad", "mod_freq")].runs == 2
    assert curves[("A", "CorGrad", "fine_mod_freq")].values == pytest.approx([0.6] * 4)  # NaN-aware
    assert curves[("A", "CorGrad", "mod_ratio")].runs == 1
    found = {(c["against"], c["statistic"]): c for c in M.corgrad_comparisons(list(curves.values()))}
    assert found[("PCGrad: mod_freq", "frequency")]["groups_above"] == 3
    assert found[("CorGrad: coarse_mod_freq", "frequency")]["mean_difference"] == pytest.approx(0.35)
    assert found[("CorGrad: fine_mod_freq", "frequency")]["groups_above"] == 0
    assert found[("PCGrad: mod_ratio", "ratio")]["groups_above"] == 4
    assert all(c["dataset"] == "A" for c in found.values())  # B has no CorGrad run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A CorGrad and a PCGrad run (with their surgery statistics) nested like a sweep
    (Debug28, 6 steps, a record every 2 steps), and the records of a run without any."""
    import torch

    root = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on a shared machine; results do not depend on it
    try:
        for algorithm in ("CorGrad", "PCGrad"):
            args = ["train", "--dataset", "Debug28", "--algorithm", algorithm, "--test-envs", "0", "--steps", "6"]
            args += ["--checkpoint-freq", "2", "--hparams", '{"batch_size": 4}', "--skip-model-save", "--no-progress"]
            assert main([*args, "--output-dir", str(root / "jobs" / algorithm)]) == 0
    finally:
        torch.set_num_threads(threads)
    (root / "jobs" / "ERM").mkdir()
    erm = [{"step": s, "loss": 1.0, "args": {"algorithm": "ERM", "dataset": "Debug28", "steps": 6}} for s in (0, 5)]
    (root / "jobs" / "ERM" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in erm))
    return root


def test_surgery_runs_record_what_the_figures_need(sweep):
    records = read_records(sweep / "jobs" / "CorGrad" / "results.jsonl")[0]
    for key in M.STATISTICS:
        assert all(key in r for r in records), key
    stats = M.run_stats(sweep / "jobs" / "CorGrad", groups=3)
    assert stats is not None and stats.total_steps == 6 and stats.records == 4
    assert set(stats.values) == set(M.STATISTICS) and all(len(v) == 3 for v in stats.values.values())
    assert M.run_stats(sweep / "jobs" / "ERM") is None


def test_find_runs_in_a_sweep_and_refuse_empty_paths(sweep, tmp_path):
    assert [p.name for p in M.find_runs([sweep])] == ["CorGrad", "ERM", "PCGrad"]
    assert len(M.find_runs([sweep / "jobs" / "PCGrad", sweep])) == 3  # no duplicates
    with pytest.raises(DomainGradError, match="does not exist"):
        M.find_runs([tmp_path / "nope"])
    with pytest.raises(DomainGradError, match="no results.jsonl"):
        M.find_runs([tmp_path])


def test_cli_end_to_end(sweep, tmp_path, capsys):

    out = tmp_path / "mod"
    assert main(["analyze", "modification", str(sweep), "--groups", "3", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "ERM" in printed and "CorGrad: mod_freq above PCGrad: mod_freq" in printed
    summary = json.loads((out / "modification.json").read_text())
    assert {r["method"] for r in summary["runs"]} == {"CorGrad", "PCGrad"}
    assert any(c["against"] == "PCGrad: mod_freq" for c in summary["comparisons"])
    rows = (out / "modification.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,method,key,row,granularity,runs,group,value")
    assert len(rows) == 1 + 3 * (5 + 5)  # 3 groups x (5 statistics of each surgery run)
    check_png(out / "modification.png", wider_than=300, taller_than=400)
    assert main(["analyze", "modification", str(sweep / "jobs" / "ERM"), "--output-dir", str(tmp_path / "e")]) != 0
    assert "none of the runs has surgery statistics" in capsys.readouterr().err
