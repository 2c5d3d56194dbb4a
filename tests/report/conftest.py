"""Hand-made results.jsonl records and sweep directories (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: DomainBed's args beyond the grouping keys (DomainBed's train.py writes all of these)
DOMAINBED_EXTRA_ARGS = {
    "checkpoint_freq": None,
    "data_dir": "/data",
    "holdout_fraction": 0.2,
    "hparams": None,
    "output_dir": "out",
    "save_model_every_checkpoint": False,
    "seed": 0,
    "skip_model_save": False,
    "steps": None,
    "task": "domain_generalization",
    "uda_holdout_fraction": 0,
}


def make_record(
    step: int,
    in_accs: list[float],
    out_accs: list[float],
    *,
    dataset: str = "ColoredMNIST",
    algorithm: str = "ERM",
    test_envs: list[int] = (0,),
    trial_seed: int = 0,
    hparams_seed: int = 0,
    test_accs: list[float] | None = None,
) -> dict:
    """One DomainBed-style results.jsonl record; ``test_accs`` makes it a 70/10/20 record."""
    record = {
        "step": step,
        "epoch": step / 10,
        "loss": 0.5,
        "mem_gb": 0.0,
        "step_time": 0.01,
        "hparams": {"lr": 1e-3, "batch_size": 64},
        "args": {
            **DOMAINBED_EXTRA_ARGS,
            "dataset": dataset,
            "algorithm": algorithm,
            "test_envs": list(test_envs),
            "trial_seed": trial_seed,
            "hparams_seed": hparams_seed,
        },
    }
    for i, (a, b) in enumerate(zip(in_accs, out_accs)):
        record[f"env{i}_in_acc"], record[f"env{i}_out_acc"] = a, b
    if test_accs is not None:
        record["args"]["split_protocol"] = "70/10/20"
        for i, c in enumerate(test_accs):
            record[f"env{i}_test_acc"] = c
    return record


def write_job(root: Path, job_id: str, records: list[dict], done: bool = True) -> Path:
    """A job directory with results.jsonl (one JSON line per record) and, if ``done``, the marker."""
    path = root / job_id
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (path / "done").write_text("done")
    return path


def cmnist_trials(accs: dict[tuple[str, int, int], float], steps: int = 2) -> list[dict]:
    """One single-test-env ColoredMNIST run per (algorithm, test env, trial seed), hparams_seed 0.

    At every step all out accs are 0.5 except at the last step where they are 0.6, so
    training-domain validation picks the last checkpoint; the test env's in-acc is
    ``accs[...]`` at the last step and 0.0 before.
    """
    records = []
    for (algorithm, env, trial), acc in accs.items():
        for step in range(steps):
            last = step == steps - 1
            in_accs = [0.9, 0.9, 0.9]
            in_accs[env] = acc if last else 0.0
            records.append(
                make_record(
                    step * 100,
                    in_accs,
                    [0.6 if last else 0.5] * 3,
                    algorithm=algorithm,
                    test_envs=[env],
                    trial_seed=trial,
                )
            )
    return records


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    return tmp_path / "sweep"
