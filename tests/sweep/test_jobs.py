"""Job listing and hashing against DomainBed's ``scripts/sweep.py``."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import replace

import pytest

from domaingrad.errors import DomainGradError
from domaingrad.registry import resolve_hparams
from domaingrad.rng import seed_hash
from domaingrad.sweep.jobs import SweepSpec, env_sets_to_test, make_jobs


# --- DomainBed's code (scripts/sweep.py, MIT licence), kept as written, as the reference ---
def all_test_env_combinations(n):
    assert n >= 3
    for i in range(n):
        yield [i]
        for j in range(i + 1, n):
            yield [i, j]


def make_args_list(
    n_trials,
    dataset_names,
    algorithms,
    n_hparams_from,
    n_hparams,
    steps,
    data_dir,
    task,
    holdout_fraction,
    single_test_envs,
    hparams,
    num_environments,
):
    args_list = []
    for trial_seed in range(n_trials):
        for dataset in dataset_names:
            for algorithm in algorithms:
                if single_test_envs:
                    all_test_envs = [[i] for i in range(num_environments(dataset))]
                else:
                    all_test_envs = all_test_env_combinations(num_environments(dataset))
                for test_envs in all_test_envs:
                    for hparams_seed in range(n_hparams_from, n_hparams):
                        train_args = {}
                        train_args["dataset"] = dataset
                        train_args["algorithm"] = algorithm
                        train_args["test_envs"] = test_envs
                        train_args["holdout_fraction"] = holdout_fraction
                        train_args["hparams_seed"] = hparams_seed
                        train_args["data_dir"] = data_dir
                        train_args["task"] = task
                        train_args["trial_seed"] = trial_seed
                        train_args["seed"] = seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)
                        if steps is not None:
                            train_args["steps"] = steps
                        if hparams is not None:
                            train_args["hparams"] = hparams
                        args_list.append(train_args)
    return args_list


def domainbed_dir_name(train_args):
    args_str = json.dumps(copy.deepcopy(train_args), sort_keys=True)
    return hashlib.md5(args_str.encode("utf-8")).hexdigest()


# --- end of DomainBed's code ---


N_ENVS = {"ColoredMNIST": 3, "RotatedMNIST": 6}
SPEC = SweepSpec(
    datasets=("ColoredMNIST", "RotatedMNIST"),
    algorithms=("ERM", "Fishr"),
    n_hparams_from=1,
    n_hparams=3,
    n_trials=2,
    steps=11,
    hparams='{"lr": 0.01}',
    data_dir="/data/dg",
)


@pytest.mark.parametrize("single", [False, True])
def test_jobs_are_domainbeds_in_order_with_its_directory_names(tmp_path, single):
    spec = replace(SPEC, single_test_envs=single)
    jobs = make_jobs(spec, tmp_path)
    reference = make_args_list(
        2,
        spec.datasets,
        spec.algorithms,
        1,
        3,
        11,
        "/data/dg",
        "domain_generalization",
        0.2,
        single,
        '{"lr": 0.01}',
        N_ENVS.__getitem__,
    )
    combos = (3 + 6) if single else (3 + 3) + (6 + 15)  # n singles + n(n-1)/2 pairs per dataset
    assert len(jobs) == len(reference) == 2 * 2 * combos * 2
    assert [j.id for j in jobs] == [domainbed_dir_name(a) for a in reference]
    for job, ref in zip(jobs, reference):
        assert {k: job.args[k] for k in ref} == ref
        assert job.args["output_dir"] == str(tmp_path.absolute() / job.id)
        assert job.args["progress"] is False
    assert len({j.id for j in jobs}) == len(jobs)


def test_pairs_of_test_envs_cover_leave_one_domain_out():
    assert env_sets_to_test(3, single=False) == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
    assert env_sets_to_test(3, single=True) == [[0], [1], [2]]
    # only env 2 tested: its single job and every pair holding it (the validation domains of LODO)
    assert env_sets_to_test(3, single=False, only=[2]) == [[0, 2], [1, 2], [2]]
    assert env_sets_to_test(6, single=True, only=[4, 1]) == [[1], [4]]
    with pytest.raises(DomainGradError, match="out of range"):
        env_sets_to_test(3, single=True, only=[3])
    with pytest.raises(DomainGradError, match="single-test-envs"):
        env_sets_to_test(2, single=False)


def test_hparam_and_trial_subsets_are_the_same_jobs_as_in_the_full_sweep(tmp_path):
    full = {j.id: j for j in make_jobs(replace(SPEC, n_hparams_from=0, n_hparams=10, n_trials=5), tmp_path)}
    subset = make_jobs(replace(SPEC, hparams_seeds=(3, 7), trial_seeds=(4,)), tmp_path)
    assert len(subset) == 1 * 2 * (6 + 21) * 2
    assert all(full[j.id].args == j.args for j in subset)
    assert {j.args["hparams_seed"] for j in subset} == {3, 7}
    assert {j.args["trial_seed"] for j in subset} == {4}


def test_checkpoint_freq_joins_the_hash_only_when_given(tmp_path):
    base = replace(SPEC, single_test_envs=True)
    plain = make_jobs(base, tmp_path)
    freq = make_jobs(replace(base, checkpoint_freq=5), tmp_path)
    assert {j.args["checkpoint_freq"] for j in freq} == {5}
    assert {j.args["checkpoint_freq"] for j in plain} == {None}
    assert not {j.id for j in plain} & {j.id for j in freq}


def test_relative_data_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = make_jobs(replace(SPEC, data_dir="data"), "sweep")
    assert {j.args["data_dir"] for j in jobs} == {os.path.join(str(tmp_path), "data")}
    assert jobs[0].args["output_dir"] == os.path.join(str(tmp_path), "sweep", jobs[0].id)


def test_fixed_hparams_from_a_run_rerun_on_more_trials(tmp_path, run_cli):
    run = tmp_path / "best"
    run.mkdir()
    drawn = resolve_hparams("ERM", "ColoredMNIST", 5, 0)
    (run / "results.jsonl").write_text(json.dumps({"step": 10, "hparams": drawn}) + "\n")
    (run / "done").write_text("done")
    code, out, err = run_cli(
        "sweep",
        "status",
        "--output-dir",
        tmp_path / "s",
        "--datasets",
        "ColoredMNIST",
        "--algorithms",
        "ERM",
        "--single-test-envs",
        "--test-envs",
        "2",
        "--hparams-from",
        run,
        "--n-trials",
        "4",
        "--list",
    )
    assert code == 0, err
    assert "4 jobs: 4 not launched" in out
    jobs = make_jobs(
        SweepSpec(
            ("ColoredMNIST",),
            ("ERM",),
            (2,),
            True,
            hparams_seeds=(0,),
            n_trials=4,
            hparams=json.dumps(drawn, sort_keys=True),
        ),
        tmp_path / "s",
    )
    assert all(j.id in out for j in jobs)
    for job in jobs:  # every trial runs exactly the drawn set, although trial seeds differ
        overrides = json.loads(job.args["hparams"])
        assert (
            resolve_hparams("ERM", "ColoredMNIST", job.args["hparams_seed"], job.args["trial_seed"], overrides) == drawn
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n-hparams-from", "3", "--n-hparams", "3"], "gives no draw"),
        (["--hparams-seeds", "1", "--n-hparams", "3"], "either --hparams-seeds"),
        (["--trial-seeds", "1", "--n-trials", "3"], "either --trial-seeds"),
        (["--hparams", '{"nope": 1}'], "unknown hyperparameter 'nope'"),
        (["--hparams", '{"lr": "x"}'], "must be of type float"),
        (["--test-envs", "5"], "out of range"),
        (["--algorithms", "NoSuchAlgorithm"], "unknown algorithm"),
        (["--datasets", "NoSuchData"], "unknown dataset"),
        (["--steps", "0"], "positive integer"),
        (["--hparams-from", "/no/such/run"], "expected a finished run"),
    ],
)
def test_bad_sweep_flags_are_refused_with_advice(tmp_path, run_cli, flags, message):
    base = {"--datasets": "ColoredMNIST", "--algorithms": "ERM"}
    for flag, value in base.items():
        if flag not in flags:
            flags = flags + [flag, value]
    code, out, err = run_cli("sweep", "launch", "--output-dir", tmp_path / "s", "-y", *flags)
    assert code == 2
    assert message in err
    assert not (tmp_path / "s").exists()


def test_train_options_reach_every_job_and_its_hash(tmp_path):
    from domaingrad.sweep.jobs import SweepSpec, make_jobs

    base = dict(datasets=("ColoredMNIST",), algorithms=("ERM",), single_test_envs=True, hparams_seeds=(0,), n_trials=1)
    plain = make_jobs(SweepSpec(**base), tmp_path)
    split = make_jobs(SweepSpec(**base, train_options={"split_protocol": "70/10/20"}), tmp_path)
    assert len(plain) == len(split) == 3
    assert all(j.args["split_protocol"] == "domainbed" for j in plain)
    assert all(j.args["split_protocol"] == "70/10/20" for j in split)
    assert not {j.id for j in plain} & {j.id for j in split}


def test_clean_eval_is_a_sweep_option_reaching_every_job(tmp_path, run_cli, capsys):
    from domaingrad.sweep.jobs import SweepSpec, make_jobs

    base = dict(datasets=("ColoredMNIST",), algorithms=("ERM",), single_test_envs=True, hparams_seeds=(0,), n_trials=1)
    clean = make_jobs(SweepSpec(**base, train_options={"clean_eval": True}), tmp_path)
    plain = make_jobs(SweepSpec(**base), tmp_path)
    assert all(j.args["clean_eval"] is True for j in clean)
    assert all(j.args["clean_eval"] is False for j in plain)
    assert not {j.id for j in plain} & {j.id for j in clean}
    for action in ("launch", "status", "delete-incomplete"):  # a job flag: every subcommand takes it
        with pytest.raises(SystemExit):
            run_cli("sweep", action, "--help")
        assert "--clean-eval" in capsys.readouterr().out


def test_a_domain_adaptation_sweep_is_refused_before_any_job_exists():
    from domaingrad.sweep.jobs import check_spec

    spec = SweepSpec(datasets=["ColoredMNIST"], algorithms=["ERM"], task="domain_adaptation")
    with pytest.raises(DomainGradError, match="sweep's task must be domain_generalization"):
        check_spec(spec)
    check_spec(replace(spec, task="domain_generalization"))
