"""PNG figures and the `domaingrad report` command line."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from tests.report.conftest import cmnist_trials, make_record, write_job

ACCS = {
    (a, e, t): base + 0.01 * t + 0.02 * e
    for a, base in (("ERM", 0.5), ("AgrSum", 0.6))
    for e in range(3)
    for t in range(6)
}


@pytest.fixture
def sweep(sweep_dir):
    write_job(sweep_dir, "job", cmnist_trials(ACCS, steps=3))
    return sweep_dir


def test_plots_are_loadable_pngs(sweep, tmp_path, run_cli):
    plots = tmp_path / "plots"
    code, _, err = run_cli("report", sweep, "--selection", "iid", "--baseline", "ERM", "--plots", plots)
    assert code == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["box_iid_ColoredMNIST.png", "curves_ColoredMNIST.png"]
    for name in names:
        image = matplotlib.image.imread(plots / name)
        assert image.ndim == 3 and image.shape[2] == 4 and image.shape[0] > 100 and image.shape[1] > 300
        assert image[..., :3].std() > 0  # something was drawn
        assert f"wrote {plots / name}" in err
    # a second run does not overwrite the figures without --force
    before = (plots / names[0]).read_bytes()
    code, _, err = run_cli("report", sweep, "--selection", "iid", "--plots", plots)
    assert code == 2 and "already exist" in err and "--force" in err
    assert (plots / names[0]).read_bytes() == before
    code, _, err = run_cli("report", sweep, "--selection", "iid", "--plots", plots, "--force")
    assert code == 0, err


def test_cli_report_to_file_and_refusal_to_overwrite(sweep, tmp_path, run_cli):
    (sweep / "job" / "results.jsonl").open("a").write('{"step": 300, "args": {"datas')  # a cut line
    write_job(sweep, "unfinished", [make_record(0, [0.9] * 3, [0.8] * 3, algorithm="IRM")], done=False)
    out = tmp_path / "report.json"
    code, stdout, err = run_cli(
        "report", sweep, "--format", "json", "--output", out, "--baseline", "ERM", "--in-domain"
    )
    assert code == 0, err
    assert stdout == "" and f"wrote {out}" in err
    assert f"{sweep / 'job' / 'results.jsonl'}:{2 * 3 * 3 * 6 + 1}: truncated last line" in err
    assert "unfinished: incomplete, 1 records up to step 0" in err
    document = json.loads(out.read_text())
    assert [s["selection"] for s in document["selections"]] == ["iid", "loo", "oracle"]
    assert document["jobs"]["incomplete"] == ["unfinished"] and len(document["problems"]) == 1
    iid = document["selections"][0]
    assert [t["metric"] for t in iid["tables"]] == ["out-of-domain"] * 2 + ["in-domain (source held-out)"] * 2
    erm = iid["tables"][0]["rows"][0]
    assert erm["algorithm"] == "ERM" and erm["cells"][0]["values"] == [ACCS[("ERM", 0, t)] for t in range(6)]
    # an existing output file is never overwritten without --force
    code, _, err = run_cli("report", sweep, "--output", out)
    assert code == 2 and "already exist" in err and json.loads(out.read_text()) == document
    code, stdout, err = run_cli("report", sweep, "--output", out, "--force", "--format", "markdown")
    assert code == 0 and out.read_text().startswith("# Results:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing_dir"], "does not exist or is not a directory"),
        (
            ["{sweep}", "--baseline", "EMR"],
            "--baseline 'EMR' has no runs in this sweep; algorithms present: ERM, AgrSum",
        ),
        (["{sweep}", "--selection", "70/10/20"], "--selection 70/10/20 needs runs"),
        (["{sweep}", "--plots", "{sweep}/job/done"], "is a file, expected a directory"),
        (["{sweep}", "--output", "{sweep}/nowhere/r.md"], "does not exist; create it first"),
    ],
)
def test_cli_bad_input(sweep, tmp_path, run_cli, args, message):
    args = [a.format(sweep=sweep) for a in args]
    code, _, err = run_cli("report", *[tmp_path / a if a == "missing_dir" else a for a in args])
    assert code == 2 and message in err


def test_cli_empty_sweep_explains(tmp_path, run_cli):
    write_job(tmp_path / "s", "running", [make_record(0, [0.9] * 3, [0.8] * 3)], done=False)
    code, _, err = run_cli("report", tmp_path / "s")
    assert code == 2 and "no usable results.jsonl record" in err and "--latest" in err
    code, out, err = run_cli("report", tmp_path / "s", "--latest", "--selection", "oracle")
    assert code == 0 and "| ERM | 90.0 +/- 0.0 | X | X | X |" in out


def test_cli_70_10_20_protocol_is_chosen_automatically(tmp_path, run_cli):
    # test env 1; checkpoint 0 has the best source validation (.8, .8) -> env1_test_acc .40 (not env1_in .95);
    # in-domain = the source envs' test parts at that checkpoint: (.7 + .9) / 2 = 80.0
    write_job(
        tmp_path / "s",
        "job",
        [
            make_record(0, [0.9, 0.95, 0.9], [0.8, 0.1, 0.8], test_envs=[1], test_accs=[0.7, 0.40, 0.9]),
            make_record(100, [0.9, 0.95, 0.9], [0.6, 0.1, 0.6], test_envs=[1], test_accs=[0.7, 0.60, 0.9]),
        ],
    )
    code, out, err = run_cli("report", tmp_path / "s", "--in-domain", "--plots", tmp_path / "plots")
    assert code == 0, err
    # the selection's name has slashes; the box plot's file name does not
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "box_70_10_20_ColoredMNIST.png",
        "curves_ColoredMNIST.png",
    ]
    assert (
        "## Model selection: source-domain validation, held-out domain test split (70/10/20, Mansilla et al. 2021)"
    ) in out
    assert "Protocol: 70/10/20" in out and "## Model selection: training-domain" not in out
    assert "| ERM | X | 40.0 +/- 0.0 | X | X |" in out
    in_domain = out[out.index("### ColoredMNIST, in-domain") :]
    assert "| ERM | X | 80.0 +/- 0.0 | X | X |" in in_domain


def test_latex_escapes_names(tmp_path, run_cli):
    write_job(tmp_path / "s", "job", [make_record(0, [0.9] * 3, [0.8] * 3, algorithm="CausIRL_CORAL")])
    code, out, _ = run_cli("report", tmp_path / "s", "--format", "latex", "--selection", "oracle")
    assert code == 0 and "\nCausIRL\\_CORAL " in out and "\\textbf{-90\\%}" in out


def test_cli_accepts_the_old_selection_spelling_seed002(tmp_path, run_cli):
    write_job(
        tmp_path / "s",
        "job",
        [
            make_record(0, [0.9, 0.95, 0.9], [0.8, 0.1, 0.8], test_envs=[1], test_accs=[0.7, 0.40, 0.9]),
            make_record(100, [0.9, 0.95, 0.9], [0.6, 0.1, 0.6], test_envs=[1], test_accs=[0.7, 0.60, 0.9]),
        ],
    )
    code, old, err = run_cli("report", tmp_path / "s", "--selection", "seed002")
    assert code == 0, err
    code, new, err = run_cli("report", tmp_path / "s", "--selection", "70/10/20")
    assert code == 0, err
    assert old == new and "| ERM | X | 40.0 +/- 0.0 | X | X |" in old


def _box(sweep_dir, **kwargs):
    from domaingrad.report.plots import box_figure
    from domaingrad.report.records import load_sweep
    from domaingrad.report.summary import build_report

    report = build_report(load_sweep(sweep_dir), selection="iid", baseline="ERM")
    return box_figure(report, report.sections[0], "ColoredMNIST", **kwargs)


def test_box_plot_has_a_legend_and_n_per_box(sweep):
    figure = _box(sweep)
    legend = figure.axes[0].get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["mean", "median"]
    for ax in figure.axes:  # 2 algorithms x 6 trials in every panel
        assert sorted(t.get_text() for t in ax.texts if t.get_text().startswith("n=")) == ["n=6", "n=6"]


def test_box_plot_shared_y_axis_on_request(sweep, tmp_path, run_cli):
    own, shared = _box(sweep), _box(sweep, sharey=True)
    # the test envs' accuracies are 2 points apart (ACCS), so each panel's own limits differ
    assert len({ax.get_ylim() for ax in own.axes}) == 3
    assert len({ax.get_ylim() for ax in shared.axes}) == 1
    assert all(shared.axes[0].get_shared_y_axes().joined(shared.axes[0], ax) for ax in shared.axes)
    assert not own.axes[0].get_shared_y_axes().joined(own.axes[0], own.axes[1])
    code, _, err = run_cli("report", sweep, "--selection", "iid", "--plots", tmp_path / "p", "--plot-sharey")
    assert code == 0 and f"wrote {tmp_path / 'p' / 'box_iid_ColoredMNIST.png'}" in err
    code, _, err = run_cli("report", sweep, "--plot-sharey")
    assert code == 2 and "--plot-sharey applies to the box plots: add --plots DIR" in err


def test_box_plot_title_promises_asterisks_only_when_reachable(sweep_dir):
    few = {k: v for k, v in ACCS.items() if k[2] < 5}  # 5 trials: p >= 0.0625 whatever the accuracies
    write_job(sweep_dir, "few", cmnist_trials(few, steps=3))
    title = _box(sweep_dir).get_suptitle()
    assert "* p < 0.05" not in title
    assert "paired Wilcoxon vs ERM: 5 paired trial(s) cannot give p < 0.05 (smallest p 0.0625)" in title
    from domaingrad.report.stats import pairs_needed, smallest_p_value

    # the smallest p-value of scipy's two-sided Wilcoxon test with n pairs: 2/2^n (all differences one sign)
    assert [smallest_p_value(n) for n in (3, 5, 6)] == pytest.approx([0.25, 0.0625, 0.03125]) and pairs_needed() == 6


def test_box_plot_title_with_enough_trials(sweep):
    assert _box(sweep).get_suptitle().endswith("; * p < 0.05 vs ERM (paired Wilcoxon)")
