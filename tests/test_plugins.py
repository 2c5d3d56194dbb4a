"""Plug-ins: the README's algorithm and dataset, defined outside domaingrad, run through
``domaingrad train``, ``domaingrad sweep`` (separate job processes) and ``domaingrad
report``, from Python, and as entry points; bad names get clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import domaingrad as dg
from domaingrad.algorithms import ALGORITHMS, algorithm_class
from domaingrad.data import DATASETS, dataset_class
from domaingrad.errors import DomainGradError
from domaingrad.run.output import read_records

README = Path(__file__).resolve().parents[1] / "README.md"
MODULE = "my_dg_plugins"


def readme_plugin_module() -> str:
    """The Python block of the README's Plug-ins section (the file my_dg_plugins.py)."""
    section = README.read_text().split("## Plug-ins", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder holding the README's my_dg_plugins.py, on sys.path here and on the
    PYTHONPATH of subprocesses; the registrations the import makes are undone after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(readme_plugin_module())
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    before_algorithms, before_datasets = dict(ALGORITHMS), dict(DATASETS)
    yield folder
    sys.modules.pop(MODULE, None)
    ALGORITHMS.clear()
    ALGORITHMS.update(before_algorithms)
    DATASETS.clear()
    DATASETS.update(before_datasets)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``domaingrad ARGS`` as a fresh process (as a user runs it), environment inherited."""
    return subprocess.run(
        [sys.executable, "-m", "domaingrad", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_the_readme_plugin_trains_sweeps_and_reports_outside_the_package(plugin_dir, tmp_path):
    algorithm, dataset = f"{MODULE}:FloodERM", f"{MODULE}:Shifted28"
    run = tmp_path / "flood"
    done = cli(
        "train",
        "--algorithm",
        algorithm,
        "--dataset",
        dataset,
        "--test-envs",
        "2",
        "--steps",
        "2",
        "--output-dir",
        run,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    records, bad = read_records(run / "results.jsonl")
    assert bad == [] and [r["step"] for r in records] == [0, 1]
    assert records[-1]["args"]["algorithm"] == algorithm and records[-1]["hparams"]["flood_level"] == 0.05
    assert "Shifted28: random images (seed 0)" in (run / "out.txt").read_text()

    sweep = tmp_path / "sweep"
    launched = cli(
        "sweep",
        "launch",
        "--algorithms",
        "ERM",
        algorithm,
        "--datasets",
        dataset,
        "--test-envs",
        "2",
        "--single-test-envs",
        "--hparams-seeds",
        "1",
        "--n-trials",
        "1",
        "--steps",
        "2",
        "--output-dir",
        sweep,
        "--launcher",
        "local",
        "--workers",
        "2",
        "--skip-confirmation",
        cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "launch finished: 2 done, 0 failed" in launched.stdout
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert sorted(job["args"]["algorithm"] for job in manifest["jobs"]) == ["ERM", algorithm]
    (flood,) = [job for job in manifest["jobs"] if job["args"]["algorithm"] == algorithm]
    # the job process drew the plug-in's own hyperparameter as the sweep process does
    drawn = read_records(sweep / flood["id"] / "results.jsonl")[0][-1]["hparams"]
    assert drawn == dg.random_hparams(algorithm, dataset, 1, 0) and drawn["flood_level"] != 0.05

    reported = cli("report", sweep, "--selection", "oracle", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    rows = [line for line in reported.stdout.splitlines() if line.startswith("|")]
    assert any(line.split("|")[1].strip() == algorithm for line in rows)
    assert any(line.split("|")[1].strip() == "ERM" for line in rows)


def test_the_readme_plugin_from_python(plugin_dir, tmp_path):
    import my_dg_plugins as plugins

    assert algorithm_class("FloodERM") is plugins.FloodERM and dataset_class("Shifted28") is plugins.Shifted28
    assert "FloodERM" in dg.list_algorithms() and "Shifted28" in dg.list_datasets()
    by_name = dg.train(
        dataset="Shifted28", algorithm="FloodERM", test_envs=[2], hparams={"flood_level": 0.5}, steps=2, verbose=False
    )
    by_class = dg.train(
        dataset=plugins.Shifted28,
        algorithm=plugins.FloodERM,
        test_envs=[2],
        hparams={"flood_level": 0.5},
        steps=2,
        verbose=False,
    )
    assert by_name.final["args"]["algorithm"] == by_class.final["args"]["algorithm"] == "FloodERM"
    assert [r["loss"] for r in by_name.records] == [r["loss"] for r in by_class.records]
    assert isinstance(by_name.algorithm, plugins.FloodERM) and by_name.environments == ["0", "1", "2"]
    assert dg.default_hparams("FloodERM", "Shifted28")["flood_level"] == 0.05
    assert dg.create_algorithm("FloodERM", (1, 28, 28), 2, 2).hparams["lr"] == 1e-3


def test_entry_points_name_installed_plugins(plugin_dir, tmp_path, monkeypatch):
    """A distribution declaring entry points in the groups domaingrad.algorithms and
    domaingrad.datasets (here a .dist-info folder on sys.path, as pip installs it)."""
    info = plugin_dir / "my_dg_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-dg-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[domaingrad.algorithms]\nFlood = {MODULE}:FloodERM\n\n[domaingrad.datasets]\nShifted = {MODULE}:Shifted28\n"
    )
    assert "Flood" in dg.list_algorithms() and "Shifted" in dg.list_datasets()
    assert algorithm_class("Flood").__name__ == "FloodERM" and dataset_class("Shifted").__name__ == "Shifted28"
    listed = cli("list", cwd=tmp_path)
    assert f"Flood                  entry point {MODULE}:FloodERM" in listed.stdout
    run = tmp_path / "ep"
    done = cli(
        "train",
        "--algorithm",
        "Flood",
        "--dataset",
        "Shifted",
        "--test-envs",
        "0",
        "--steps",
        "1",
        "--output-dir",
        run,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert read_records(run / "results.jsonl")[0][-1]["args"]["algorithm"] == "Flood"


@pytest.mark.parametrize(
    "option, name, message",
    [
        ("--algorithm", "no_such_module_xyz:MyAlg", "no module named 'no_such_module_xyz'.*PYTHONPATH"),
        ("--algorithm", f"{MODULE}:Nope", f"module {MODULE} has no attribute 'Nope'; it defines: .*FloodERM"),
        (
            "--algorithm",
            f"{MODULE}:Shifted28",
            "not an algorithm: expected a subclass of domaingrad.algorithms.Algorithm",
        ),
        (
            "--dataset",
            f"{MODULE}:FloodERM",
            "not a dataset: expected a subclass of domaingrad.data.MultipleDomainDataset",
        ),
        (
            "--algorithm",
            "broken_plugin:MyAlg",
            r"importing broken_plugin failed \(RuntimeError: half-written plug-in\)",
        ),
    ],
)
def test_bad_plugin_names_are_explained(plugin_dir, tmp_path, run_cli, option, name, message):
    (plugin_dir / "broken_plugin.py").write_text("raise RuntimeError('half-written plug-in')\n")
    code, _, err = run_cli("train", option, name, "--output-dir", tmp_path / "out")
    assert code == 2 and err.startswith("domaingrad: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    sys.modules.pop("broken_plugin", None)


def test_registration_refuses_what_would_be_ambiguous(plugin_dir):
    with pytest.raises(ValueError, match="'ERM' is one of domaingrad's own algorithms"):
        dg.register_algorithm("ERM")
    with pytest.raises(ValueError, match="without ':'"):
        dg.register_dataset("my:data")
    with pytest.raises(TypeError, match="decorates a subclass of domaingrad.algorithms.Algorithm"):
        dg.register_algorithm("NotAClass")(lambda: None)
    with pytest.raises(TypeError, match="decorates a subclass of domaingrad.data.MultipleDomainDataset"):
        dg.register_dataset("NotAData")(dg.ERM)
    with pytest.raises(DomainGradError, match="unknown algorithm 'NotAClass'"):
        algorithm_class("NotAClass")  # the refused decoration registered nothing

    @dg.register_algorithm("Twice")
    class First(dg.ERM):
        pass

    with pytest.warns(UserWarning, match="'Twice' was registered to"):

        @dg.register_algorithm("Twice")
        class Second(dg.ERM):
            pass

    assert algorithm_class("Twice") is Second
