"""The 70/10/20 protocol of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization
via Gradient Surgery", ICCV 2021 (Section 4.1), run provenance and wall time in the
records, and resuming a run checkpointed before newer arguments existed."""

from __future__ import annotations

import pytest
import torch

from domaingrad.data import TensorEnvironment, split_environment, split_environment_70_10_20
from domaingrad.errors import DomainGradError
from domaingrad.run import TrainArgs, train
from domaingrad.run.output import RunDirectory, read_records

DEBUG = ("--dataset", "Debug28", "--steps", "4", "--checkpoint-freq", "2", "--hparams", '{"batch_size": 8}')


def test_70_10_20_split_parts_are_disjoint_and_sized():
    env = TensorEnvironment("e", torch.zeros(101, 1), torch.zeros(101, dtype=torch.long))
    train, val, test = split_environment_70_10_20(env, trial_seed=3, env_index=1)
    assert (len(train), len(val), len(test)) == (101 - 20 - 10, 10, 20)
    together = torch.cat([train.indices, val.indices, test.indices]).sort().values
    assert torch.equal(together, torch.arange(101))
    # the same shuffle as DomainBed's split: its out split of 20% is our test part
    out, _ = split_environment(env, 0.2, 3, 1)
    assert torch.equal(out.indices, test.indices)
    again = split_environment_70_10_20(env, trial_seed=3, env_index=1)
    assert torch.equal(again[1].indices, val.indices)
    other = split_environment_70_10_20(env, trial_seed=4, env_index=1)
    assert not torch.equal(other[2].indices, test.indices)


def test_70_10_20_run_records_test_accuracies(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", *DEBUG, "--split-protocol", "70/10/20", "--output-dir", out)
    assert code == 0, err
    records, bad = read_records(out / "results.jsonl")
    assert bad == [] and [r["step"] for r in records] == [0, 2, 3]
    for r in records:
        assert r["args"]["split_protocol"] == "70/10/20"
        for i in range(3):
            for part in ("in", "out", "test"):
                assert 0.0 <= r[f"env{i}_{part}_acc"] <= 1.0
    assert "test_acc" in stdout.split("per-environment accuracy at the last step:")[1]
    with pytest.raises(DomainGradError, match="70/10/20"):
        train(TrainArgs(dataset="Debug28", split_protocol="60/20/20", output_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_records_carry_provenance_and_wall_time(tmp_path, run_cli):
    out = tmp_path / "run"
    assert run_cli("train", *DEBUG, "--output-dir", out)[0] == 0
    records = read_records(out / "results.jsonl")[0]
    assert "env0_test_acc" not in records[-1]
    prov = records[-1]["provenance"]
    assert prov["versions"]["torch"] == torch.__version__ and prov["device"] == "cpu"
    assert prov["torch_threads"] == torch.get_num_threads()
    times = [r["wall_time"] for r in records]
    assert 0 < times[0] <= times[1] <= times[2]


def test_old_checkpoint_without_new_arguments_still_resumes(tmp_path):
    """A checkpoint written before an argument existed resumes when the argument has its
    default value, and is refused when it has another value."""
    out = RunDirectory(tmp_path / "run")
    out.path.mkdir()
    args = {k: v for k, v in vars(TrainArgs(output_dir=str(out.path))).items()}
    old_args = {k: v for k, v in args.items() if k not in ("split_protocol", "image_size")}
    torch.save({"step": 0, "args": old_args, "record": {}}, out.file("checkpoint.pt"))
    defaults = vars(TrainArgs())
    assert out.check_startable(args, defaults=defaults)["step"] == 0
    changed = dict(args, split_protocol="70/10/20")
    with pytest.raises(Exception, match="split_protocol"):
        out.check_startable(changed, defaults=defaults)
