"""Evaluation of image datasets on augmented images (DomainBed's rule) and --clean-eval."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from domaingrad.errors import DomainGradError
from domaingrad.rng import seed_hash
from domaingrad.run import TrainArgs, train
from domaingrad.run.output import read_records
from domaingrad.run.train import TrainingRun
from tests.conftest import make_image_folder, train_until_interrupted

pytestmark = pytest.mark.usefixtures("single_thread")
train_module = importlib.import_module("domaingrad.run.train")  # the package exports a function of that name


def _args(tmp_path, out: str = "run", hparams: dict | None = None, **kw) -> TrainArgs:
    if not (tmp_path / "mine").exists():
        make_image_folder(tmp_path / "mine", {d: {"a": 4, "b": 4} for d in ("d1", "d2", "d3")}, size=(20, 20))
    hparams = {"backbone": "mnist_cnn", "batch_size": 3, **(hparams or {})}
    return TrainArgs(
        dataset="folder:mine",
        data_dir=str(tmp_path),
        algorithm="ERM",
        test_envs=[2],
        steps=3,
        checkpoint_freq=2,
        hparams=json.dumps(hparams),
        image_size=16,
        num_workers=0,
        weights="none",
        output_dir=str(tmp_path / out),
        progress=False,
        **kw,
    )


def _evaluated_seeds(run: TrainingRun, step: int, monkeypatch) -> dict[str, int | None]:
    """The augmentation seed of every split ``run.evaluate(step)`` scores, by record key."""
    seen = {}

    def fake_accuracy(algorithm, split, batch_size, device, domain=None):
        seen[len(seen)] = split.augment_seed
        return 0.5

    monkeypatch.setattr(train_module, "accuracy", fake_accuracy)
    keys = list(run.evaluate(step))
    return dict(zip(keys, seen.values()))


def test_training_environments_are_evaluated_on_augmented_images_by_default(tmp_path, monkeypatch):
    run = TrainingRun.prepare(_args(tmp_path))
    assert run.augment_eval
    seeds = _evaluated_seeds(run, 4, monkeypatch)
    for i in (0, 1):  # training environments: DomainBed's augment_transform, fresh per checkpoint
        for prefix in ("in", "out"):
            assert seeds[f"env{i}_{prefix}_acc"] == seed_hash(0, "evaluation", 4, prefix, i)
    assert seeds["env2_in_acc"] is None and seeds["env2_out_acc"] is None  # the test environment: never
    assert _evaluated_seeds(run, 6, monkeypatch)["env0_in_acc"] != seeds["env0_in_acc"]
    split = run.in_splits[0]
    ((clean, _),) = list(split.batches(64))
    ((augmented, _),) = list(run.evaluation_split(split, "in", 0, 4).batches(64))
    assert not torch.equal(augmented, clean)
    assert run.evaluation_split(run.in_splits[2], "in", 2, 4) is run.in_splits[2]


@pytest.mark.parametrize("options", [{"clean_eval": True}, {"hparams": {"data_augmentation": False}}])
def test_clean_eval_and_no_augmentation_evaluate_clean_images(tmp_path, monkeypatch, options):
    run = TrainingRun.prepare(_args(tmp_path, **options))
    assert not run.augment_eval
    assert set(_evaluated_seeds(run, 4, monkeypatch).values()) == {None}


def test_in_memory_datasets_are_never_augmented(monkeypatch, tmp_path):
    run = TrainingRun.prepare(TrainArgs(dataset="Debug28", test_envs=[0], output_dir=str(tmp_path / "d")))
    assert run.hparams["data_augmentation"] and not run.augment_eval
    assert set(_evaluated_seeds(run, 4, monkeypatch).values()) == {None}


def test_clean_eval_is_a_cli_flag_recorded_in_the_args_and_checked_on_resume(tmp_path, run_cli, monkeypatch):
    args = _args(tmp_path)
    base = [
        "train",
        "--dataset",
        "folder:mine",
        "--data-dir",
        tmp_path,
        "--test-envs",
        "2",
        "--steps",
        "1",
        "--image-size",
        "16",
        "--num-workers",
        "0",
        "--weights",
        "none",
        "--hparams",
        args.hparams,
        "--no-progress",
    ]
    code, _, err = run_cli(*base, "--clean-eval", "--output-dir", tmp_path / "clean")
    assert code == 0, err
    record = read_records(tmp_path / "clean" / "results.jsonl")[0][-1]
    assert record["args"]["clean_eval"] is True
    assert "evaluation: every split on clean images" in (tmp_path / "clean" / "out.txt").read_text()
    code, _, err = run_cli(*base, "--output-dir", tmp_path / "default")
    assert code == 0, err
    assert read_records(tmp_path / "default" / "results.jsonl")[0][-1]["args"]["clean_eval"] is False
    assert "training environments on augmented images" in (tmp_path / "default" / "out.txt").read_text()

    train_until_interrupted(monkeypatch, _args(tmp_path, "cut"), at_call=2)  # after step 0's checkpoint
    with pytest.raises(DomainGradError, match="clean_eval: saved False, now True"):
        train(_args(tmp_path, "cut", clean_eval=True), stream=open("/dev/null", "w"))


def test_a_run_checkpointed_before_clean_eval_existed_resumes_only_with_clean_evaluation(tmp_path, monkeypatch):
    # such a run evaluated clean images: resuming it must not switch to augmented
    # evaluation half-way; the message names the flag, and --clean-eval resumes it
    train_until_interrupted(monkeypatch, _args(tmp_path, "old"), at_call=2)
    checkpoint = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    del state["args"]["clean_eval"]  # as written by a version without the field
    torch.save(state, checkpoint)
    with pytest.raises(DomainGradError, match="clean_eval: saved True, now False"):
        train(_args(tmp_path, "old"), stream=open("/dev/null", "w"))
    train(_args(tmp_path, "old", clean_eval=True), stream=open("/dev/null", "w"))
    assert (tmp_path / "old" / "done").exists()
