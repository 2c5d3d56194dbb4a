"""Algorithm and dataset names: matched case-insensitively where that is unambiguous,
stored in their canonical spelling, and unknown names answered with "did you mean"."""

from __future__ import annotations

import json

import pytest

from domaingrad.algorithms import ALGORITHMS, ERM, algorithm_class, register_algorithm, resolve_algorithm_name
from domaingrad.data import Debug28, dataset_class, resolve_dataset_name
from domaingrad.errors import DomainGradError
from domaingrad.plugins import canonical_name, did_you_mean
from domaingrad.run.output import read_records


def test_names_resolve_whatever_their_case_to_the_canonical_spelling():
    assert algorithm_class("erm") is ERM and algorithm_class("eRm") is ERM
    assert dataset_class("debug28") is Debug28 and dataset_class("DEBUG28") is Debug28
    assert resolve_algorithm_name("fishr") == "Fishr" and resolve_algorithm_name("gsnrdropblock") == "GSNRDropBlock"
    assert resolve_dataset_name("coloredmnist") == "ColoredMNIST" and resolve_dataset_name("pacs") == "PACS"
    # specs and user folders are never touched
    assert resolve_algorithm_name("My_Pkg.mod:MyAlg") == "My_Pkg.mod:MyAlg"
    assert resolve_dataset_name("folder:Some/Path") == "folder:Some/Path"


@pytest.mark.parametrize(
    "lookup, name, suggestion",
    [
        (algorithm_class, "Fisher", "did you mean Fishr?"),
        (algorithm_class, "PCgard", "did you mean PCGrad?"),
        (dataset_class, "ColouredMNIST", "did you mean ColoredMNIST?"),
        (dataset_class, "rotated_mnist", "did you mean RotatedMNIST?"),
    ],
)
def test_unknown_names_get_the_closest_name_suggested(lookup, name, suggestion):
    with pytest.raises(DomainGradError) as info:
        lookup(name)
    message = str(info.value)
    assert f"unknown {'algorithm' if lookup is algorithm_class else 'dataset'} {name!r}" in message
    assert message.endswith(suggestion)


def test_names_equal_up_to_case_are_ambiguous_and_both_suggested():
    before = dict(ALGORITHMS)
    try:

        @register_algorithm("MyVariant")
        class MyVariant(ERM):
            pass

        @register_algorithm("MYVARIANT")
        class Shouting(ERM):
            pass

        assert algorithm_class("MyVariant") is MyVariant and algorithm_class("MYVARIANT") is Shouting
        with pytest.raises(DomainGradError, match="did you mean MyVariant or MYVARIANT\\?"):
            algorithm_class("myvariant")
    finally:
        ALGORITHMS.clear()
        ALGORITHMS.update(before)
    assert canonical_name("a", ["A", "a"]) == "a" and canonical_name("b", ["A", "a"]) is None
    assert did_you_mean("zzz", []) == ""
    with pytest.raises(DomainGradError) as info:  # a name far from every known one: no suggestion
        algorithm_class("qqqqqq")
    assert "did you mean" not in str(info.value) and "valid algorithms: ERM" in str(info.value)


def test_train_stores_the_canonical_names_in_its_records(tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--dataset",
        "debug28",
        "--algorithm",
        "erm",
        "--steps",
        "1",
        "--hparams",
        '{"batch_size": 4}',
        "--output-dir",
        out,
        "--skip-model-save",
    )
    assert code == 0, err
    records, bad = read_records(out / "results.jsonl")
    assert bad == [] and records
    assert records[-1]["args"]["dataset"] == "Debug28" and records[-1]["args"]["algorithm"] == "ERM"


def test_train_refuses_an_unknown_name_with_a_suggestion(tmp_path, run_cli):
    code, _, err = run_cli("train", "--algorithm", "Fisher", "--output-dir", tmp_path / "r")
    assert code == 2 and err.strip().endswith("did you mean Fishr?")
    assert not (tmp_path / "r").exists()


SWEEP = ["--single-test-envs", "--test-envs", "0", "--n-hparams", "2", "--n-trials", "1", "--list"]


def test_sweep_names_are_canonical_so_the_jobs_are_the_same(tmp_path, run_cli):
    code, lower, err = run_cli(
        "sweep", "status", "--output-dir", tmp_path, "--datasets", "debug28", "--algorithms", "erm", "fishr", *SWEEP
    )
    assert code == 0, err
    code, canonical, err = run_cli(
        "sweep", "status", "--output-dir", tmp_path, "--datasets", "Debug28", "--algorithms", "ERM", "Fishr", *SWEEP
    )
    assert code == 0, err
    assert lower == canonical and "4 jobs: 4 not launched" in lower
    assert "ERM" in lower and "Fishr" in lower and "erm" not in lower.replace("ERM", "")


def test_sweep_launch_writes_canonical_names_into_the_manifest(tmp_path, run_cli):
    code, _, err = run_cli(
        "sweep",
        "launch",
        "--output-dir",
        tmp_path,
        "--datasets",
        "debug28",
        "--algorithms",
        "erm",
        "--single-test-envs",
        "--test-envs",
        "0",
        "--n-hparams",
        "1",
        "--n-trials",
        "1",
        "--steps",
        "1",
        "--hparams",
        '{"batch_size": 4}',
        "--launcher",
        "sequential",
        "--no-progress",
        "-y",
    )
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "sweep.json").read_text())["jobs"]
    assert entry["args"]["dataset"] == "Debug28" and entry["args"]["algorithm"] == "ERM"


@pytest.mark.parametrize(
    "flag, name, suggestion", [("--algorithms", "Fisher", "Fishr"), ("--datasets", "debug82", "Debug28")]
)
def test_sweep_refuses_unknown_names_with_a_suggestion(tmp_path, run_cli, flag, name, suggestion):
    flags = {"--datasets": "Debug28", "--algorithms": "ERM", flag: name}
    args = [item for pair in flags.items() for item in pair]
    code, _, err = run_cli("sweep", "launch", "--output-dir", tmp_path / "s", *args, "-y")
    assert code == 2 and err.strip().endswith(f"did you mean {suggestion}?")
    assert not (tmp_path / "s").exists()
