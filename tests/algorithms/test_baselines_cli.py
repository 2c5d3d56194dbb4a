"""Fishr and the DomainBed baselines train on Colored MNIST through the CLI (built from
1,200 real digits given as a --data-dir, so that evaluation is quick)."""

from __future__ import annotations

import math

import pytest

from domaingrad.run.output import read_records

BASELINES = ["Fishr", "IRM", "VREx", "CORAL", "MMD", "DANN", "GroupDRO", "Mixup", "MLDG", "Fish", "SD"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_trains_on_colored_mnist_through_the_cli(tmp_path, run_cli, small_mnist_dir, name):
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--dataset",
        "ColoredMNIST",
        "--algorithm",
        name,
        "--test-envs",
        "2",
        "--steps",
        "3",
        "--checkpoint-freq",
        "10",
        "--hparams",
        '{"batch_size": 8}',
        "--data-dir",
        small_mnist_dir,
        "--output-dir",
        out,
    )
    assert code == 0, err
    first, record = read_records(out / "results.jsonl")[0]
    assert (first["step"], record["step"]) == (0, 2)
    assert record["args"]["algorithm"] == name and (out / "done").exists()
    logged = [k for k in record if k.endswith("loss") and isinstance(record[k], float)]
    assert logged and all(math.isfinite(record[k]) for k in logged)
