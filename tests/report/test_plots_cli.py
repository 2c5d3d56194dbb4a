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
