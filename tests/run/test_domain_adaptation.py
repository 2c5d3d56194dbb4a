"""DomainBed's ``--task domain_adaptation`` with ``--uda-holdout-fraction``: the uda split
of each test environment (carved out of its in split), the unlabelled batches handed
to ``update``, the ``env{k}_uda_acc`` records, and the refusal of algorithms that would
ignore the unlabelled data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domaingrad.algorithms import ALGORITHMS, CORAL, ERM, MMD, algorithm_class
from domaingrad.algorithms.alignment import coral_distance, mmd_distance
from domaingrad.data.base import Split, TensorEnvironment, split_environment, split_uda
from domaingrad.errors import DomainGradError
from domaingrad.layout import SPLIT_70_10_20
from domaingrad.rng import seed_hash
from domaingrad.run.args import TrainArgs, check_args
from domaingrad.run.output import read_records
from domaingrad.run.train import TrainingRun, run_training
from domaingrad.sweep.jobs import SweepSpec, check_spec

PROBE = "tests.run.test_domain_adaptation:UnlabeledProbe"


class UnlabeledProbe(ERM):
    """ERM that keeps every ``unlabeled`` argument it is given (a copy per step)."""

    uses_unlabeled = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[list[torch.Tensor] | None] = []

    def update(self, minibatches, unlabeled=None):
        self.seen.append(None if unlabeled is None else [x.clone() for x in unlabeled])
        return super().update(minibatches)


def _env(n: int, name: str = "e") -> TensorEnvironment:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 28, 28).contiguous()
    return TensorEnvironment(name, x, torch.arange(n) % 2)


# -- the split -----------------------------------------------------------------------------
@pytest.mark.parametrize("n, fraction, trial_seed, env_index", [(50, 0.3, 0, 2), (37, 0.5, 4, 0), (10, 0.05, 1, 1)])
def test_uda_split_is_domainbeds_second_split_of_the_in_split(n, fraction, trial_seed, env_index):
    env = _env(n)
    out, in_ = split_environment(env, 0.2, trial_seed, env_index)
    uda, rest = split_uda(in_, fraction, trial_seed, env_index)
    assert len(uda) == int(len(in_) * fraction) and len(rest) == len(in_) - len(uda)
    assert set(uda.indices.tolist()).isdisjoint(rest.indices.tolist())
    assert sorted(uda.indices.tolist() + rest.indices.tolist()) == sorted(in_.indices.tolist())
    assert set(uda.indices.tolist()).isdisjoint(out.indices.tolist())
    # DomainBed's misc.split_dataset(in_, int(len(in_) * f), seed_hash(trial_seed, env_i)):
    # a Python list of the in split's positions shuffled by RandomState(seed)
    keys = list(range(len(in_)))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_uda = int(len(in_) * fraction)
    assert uda.indices.tolist() == [int(in_.indices[k]) for k in keys[:n_uda]]
    assert rest.indices.tolist() == [int(in_.indices[k]) for k in keys[n_uda:]]


def test_uda_split_of_zero_is_empty_and_bad_fractions_are_refused():
    in_ = Split(_env(9), torch.arange(9))
    uda, rest = split_uda(in_, 0.0, 0, 0)
    assert len(uda) == 0 and sorted(rest.indices.tolist()) == list(range(9))
    for bad in (-0.1, 1.0):
        with pytest.raises(DomainGradError, match="uda_holdout_fraction must be in"):
            split_uda(in_, bad, 0, 0)


# -- the run -------------------------------------------------------------------------------
def _args(tmp_path, **kw) -> TrainArgs:
    values = dict(
        dataset="Debug28",
        algorithm=PROBE,
        test_envs=[2],
        steps=3,
        checkpoint_freq=2,
        hparams={"batch_size": 4},
        output_dir=str(tmp_path / "run"),
        uda_holdout_fraction=0.5,
        task="domain_adaptation",
        skip_model_save=True,
    )
    values.update(kw)
    return TrainArgs(**values)


def test_prepare_carves_the_uda_split_out_of_each_test_environments_in_split(tmp_path):
    run = TrainingRun.prepare(_args(tmp_path, test_envs=[0, 2], task="domain_generalization"))
    env = run.dataset[0]
    # Debug28: 16 samples per environment; out int(16 * 0.2) = 3, in 13, uda int(13 * 0.5) = 6
    assert [len(s) for s in run.uda_splits] == [6, 6]
    assert [s.env for s in run.uda_splits] == [run.dataset[0], run.dataset[2]]
    assert [len(s) for s in run.in_splits] == [7, 13, 7] and [len(s) for s in run.out_splits] == [3, 3, 3]
    out, in_ = split_environment(env, 0.2, 0, 0)
    uda, rest = split_uda(in_, 0.5, 0, 0)
    assert run.uda_splits[0].indices.tolist() == uda.indices.tolist()
    assert run.in_splits[0].indices.tolist() == rest.indices.tolist()
    # domain generalization: the uda splits exist (DomainBed's same splits) but nothing is drawn
    assert run.uda_minibatches is None


def test_unlabeled_batches_reach_update_and_come_from_the_uda_splits(tmp_path):
    run = TrainingRun.prepare(_args(tmp_path, test_envs=[0, 2]))
    for _ in range(3):
        run.train_step()
    seen = run.algorithm.seen
    assert len(seen) == 3
    for step in seen:
        assert step is not None and len(step) == 2  # one batch per test environment
        for k, x in enumerate(step):
            split = run.uda_splits[k]
            assert x.shape == (4, 3, 28, 28)  # batch_size unlabelled inputs
            pool = split.env.x[split.indices]
            # every row is one of the uda split's inputs, none from its in or out split
            assert all(bool((pool == row).all(dim=(1, 2, 3)).any()) for row in x)
            others = torch.cat(
                [split.env.x[run.in_splits[[0, 2][k]].indices], split.env.x[run.out_splits[[0, 2][k]].indices]]
            )
            assert not any(bool((others == row).all(dim=(1, 2, 3)).any()) for row in x)


def test_domain_generalization_passes_no_unlabeled_data(tmp_path):
    run = TrainingRun.prepare(_args(tmp_path, task="domain_generalization"))
    run.train_step()
    assert run.algorithm.seen == [None]


def test_records_carry_env_k_uda_acc_keyed_as_domainbed(tmp_path):
    outcome = run_training(_args(tmp_path))
    records, bad = read_records(tmp_path / "run" / "results.jsonl")
    assert bad == [] and [r["step"] for r in records] == [0, 2]
    for r in records:
        # DomainBed numbers the uda splits among themselves: test env 2 gives env0_uda_acc
        assert sorted(k for k in r if "_uda_" in k) == ["env0_uda_acc"]
        assert 0.0 <= r["env0_uda_acc"] <= 1.0
        assert r["args"]["task"] == "domain_adaptation" and r["args"]["uda_holdout_fraction"] == 0.5
    run = outcome.run
    assert len(run.uda_splits) == 1 and len(run.uda_splits[0]) == 6 and len(run.in_splits[2]) == 7


def test_the_unlabeled_stream_resumes_exactly(tmp_path):
    first = TrainingRun.prepare(_args(tmp_path))
    first.train_step()
    state = first.resume_state(first.make_record(0))
    for _ in range(2):
        first.train_step()
    second = TrainingRun.prepare(_args(tmp_path))
    second.load_resume_state(state)
    for _ in range(2):
        second.train_step()
    for a, b in zip(first.algorithm.seen[1:], second.algorithm.seen, strict=True):
        assert torch.equal(a[0], b[0])


# -- refusals ------------------------------------------------------------------------------
def test_algorithms_that_ignore_unlabeled_data_are_refused_before_training(tmp_path):
    with pytest.raises(DomainGradError, match="ERM does not use unlabelled data.*CORAL.*MMD"):
        check_args(_args(tmp_path, algorithm="ERM"))
    users = {name for name in ALGORITHMS if getattr(algorithm_class(name), "uses_unlabeled", False)}
    assert {"CORAL", "MMD"} <= users
    for name in sorted(set(ALGORITHMS) - users):
        with pytest.raises(DomainGradError, match=f"{name} does not use unlabelled data"):
            check_args(_args(tmp_path, algorithm=name))
    # the same algorithm under domain generalization with a uda split is fine (DomainBed)
    assert check_args(_args(tmp_path, algorithm="ERM", task="domain_generalization")).args.algorithm == "ERM"
    assert not (tmp_path / "run").exists()


def test_bad_task_arguments_are_refused(tmp_path):
    with pytest.raises(DomainGradError, match="--task domain_adaptation needs unlabelled.*--uda-holdout-fraction"):
        check_args(_args(tmp_path, uda_holdout_fraction=0.0))
    with pytest.raises(DomainGradError, match="--task adaptation is not a task; expected one of"):
        check_args(_args(tmp_path, task="adaptation"))
    for bad in (1.0, -0.2):
        with pytest.raises(DomainGradError, match=r"--uda-holdout-fraction must be in \[0, 1\)"):
            check_args(_args(tmp_path, uda_holdout_fraction=bad))
    with pytest.raises(DomainGradError, match="applies to DomainBed's in/out split only"):
        check_args(_args(tmp_path, split_protocol=SPLIT_70_10_20))


def test_a_uda_split_that_rounds_to_nothing_is_refused(tmp_path):
    # 13 in samples * 0.05 rounds down to 0: DomainBed's "Not enough unlabeled samples"
    with pytest.raises(DomainGradError, match="leaves no unlabelled sample in test environment"):
        TrainingRun.prepare(_args(tmp_path, uda_holdout_fraction=0.05))


def test_a_domain_adaptation_sweep_is_refused_with_what_to_run_instead():
    spec = SweepSpec(datasets=["ColoredMNIST"], algorithms=["CORAL"], task="domain_adaptation")
    with pytest.raises(DomainGradError, match="sweep's task must be domain_generalization.*domaingrad train --task"):
        check_spec(spec)
    with pytest.raises(DomainGradError, match="is not a task"):
        check_spec(SweepSpec(datasets=["ColoredMNIST"], algorithms=["ERM"], task="nonsense"))


# -- CORAL and MMD with unlabelled data ------------------------------------------------------
@pytest.mark.parametrize("cls, distance", [(CORAL, coral_distance), (MMD, mmd_distance)])
def test_coral_and_mmd_align_the_unlabelled_test_batches_too(cls, distance):
    torch.manual_seed(0)
    hparams = {**check_args(TrainArgs(dataset="Debug28", algorithm=cls.__name__)).hparams, "mmd_gamma": 0.5}
    algorithm = cls((3, 28, 28), 2, 2, hparams)
    labelled = [(torch.randn(5, 3, 28, 28), torch.randint(0, 2, (5,))) for _ in range(2)]
    unlabeled = [torch.randn(6, 3, 28, 28) + 1.0]
    with torch.no_grad():
        f = [algorithm.featurizer(x) for x, _ in labelled] + [algorithm.featurizer(unlabeled[0])]
        pairs = [distance(f[0], f[1]), distance(f[0], f[2]), distance(f[1], f[2])]
        expected = float(sum(pairs) / 3)
        without = float(pairs[0])
    assert abs(expected - without) > 1e-3  # the target batch changes the penalty
    logged = algorithm.update(labelled, unlabeled)
    assert logged["penalty"] == pytest.approx(expected, rel=1e-5)
    # without unlabelled data it is DomainBed's penalty; the class loss never sees them
    torch.manual_seed(0)
    same_init = cls((3, 28, 28), 2, 2, hparams)
    plain = same_init.update(labelled)
    assert plain["penalty"] == pytest.approx(without, rel=1e-5)
    assert logged["loss"] == pytest.approx(plain["loss"], rel=1e-6)


@pytest.mark.slow
def test_domain_adaptation_runs_end_to_end_on_colored_mnist_through_the_cli(tmp_path, run_cli, tiny_mnist_dir):
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        *("--dataset", "ColoredMNIST", "--algorithm", "CORAL", "--test-envs", "2"),
        *("--task", "domain_adaptation", "--uda-holdout-fraction", "0.3"),
        *("--steps", "3", "--checkpoint-freq", "10", "--hparams", '{"batch_size": 8}'),
        *("--data-dir", tiny_mnist_dir, "--output-dir", out),
    )
    assert code == 0, err
    records, _ = read_records(out / "results.jsonl")
    record = records[-1]
    assert record["step"] == 2 and (out / "done").exists()
    assert record["args"]["task"] == "domain_adaptation" and record["args"]["uda_holdout_fraction"] == 0.3
    assert 0.0 <= record["env0_uda_acc"] <= 1.0 and "env1_uda_acc" not in record
    assert math.isfinite(record["penalty"]) and record["penalty"] > 0
    # ERM is refused on the same command line, before any file is written
    code, _, err = run_cli(
        "train",
        *("--dataset", "ColoredMNIST", "--algorithm", "ERM", "--test-envs", "2"),
        *("--task", "domain_adaptation", "--uda-holdout-fraction", "0.3", "--steps", "3"),
        *("--data-dir", tiny_mnist_dir, "--output-dir", tmp_path / "erm"),
    )
    assert code != 0 and "ERM does not use unlabelled data" in err and not (tmp_path / "erm").exists()
