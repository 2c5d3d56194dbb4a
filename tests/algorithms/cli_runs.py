"""The short CLI run the algorithm tests share: a few steps through ``domaingrad train``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from domaingrad.run.output import read_records


def train_by_spec(
    run_cli, data_dir: Path, out: Path, spec: str, hparams: str = '{"batch_size": 8}', steps: int = 3
) -> dict[str, Any]:
    """``steps`` steps of the algorithm ``spec`` (a name or ``package.module:Class``) on
    Colored MNIST (test environment 2) from ``data_dir``, into ``out``; checks the run
    finished with a record at step 0 and at the last step, every logged loss finite, and
    returns the last record."""
    code, _, err = run_cli(
        "train", "--dataset", "ColoredMNIST", "--algorithm", spec, "--test-envs", "2",
        "--steps", str(steps), "--checkpoint-freq", "10", "--hparams", hparams,
        "--data-dir", data_dir, "--output-dir", out,
    )  # fmt: skip
    assert code == 0, err
    first, record = read_records(out / "results.jsonl")[0]
    assert (first["step"], record["step"]) == (0, steps - 1) and (out / "done").exists()
    assert record["args"]["algorithm"] == spec
    logged = [k for k in record if "loss" in k and isinstance(record[k], float)]
    assert logged and all(math.isfinite(record[k]) for k in logged)
    return record
