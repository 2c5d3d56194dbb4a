"""Nothing lost, nothing run twice, no traceback: kills at exact points of a checkpoint, two
processes on one directory, a kill after ``done``, and output directories that cannot be
written."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from domaingrad.layout import acquire_lock, lock_holder, release_lock
from domaingrad.run import TrainArgs, run_training
from domaingrad.run.output import RunDirectory, read_records
from domaingrad.sweep.jobs import lock_is_held

REPO = Path(__file__).resolve().parents[2]
DEBUG = ["train", "--dataset", "Debug28", "--test-envs", "0", "--hparams", '{"batch_size": 6}', "--no-progress"]
TIMING_KEYS = {"step_time", "wall_time", "mem_gb", "provenance"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the run catches it, nothing runs after it."""


def debug_args(out: Path, **changes) -> TrainArgs:
    values = dict(
        dataset="Debug28",
        test_envs=[0],
        steps=7,
        checkpoint_freq=2,  # checkpoints at steps 0, 2, 4, 6
        hparams={"batch_size": 6},
        save_model_every_checkpoint=True,
        output_dir=str(out),
        progress=False,
    )
    return TrainArgs(**{**values, **changes})


def train_quietly(args: TrainArgs):
    return run_training(args, stream=io.StringIO())


def comparable(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in dict(r, args={**r["args"], "output_dir": None}).items() if k not in TIMING_KEYS}
        for r in records
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model_dict"]


def assert_same_run(ref: Path, out: Path) -> None:
    """The run in ``out`` holds the reference's records, model and every model_step file."""
    assert comparable(read_records(out / "results.jsonl")[0]) == comparable(read_records(ref / "results.jsonl")[0])
    names = sorted(p.name for p in ref.glob("model*.pkl"))
    assert names == ["model.pkl", "model_step0.pkl", "model_step2.pkl", "model_step4.pkl", "model_step6.pkl"]
    assert sorted(p.name for p in out.glob("model*.pkl")) == names
    for name in names:
        a, b = weights(ref / name), weights(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "done").exists() and not (out / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of :func:`debug_args`."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_quietly(debug_args(out))
    return out


# -- item 1: --save-model-every-checkpoint and a kill at the checkpoint ---------------------


@pytest.mark.parametrize("killed_call", [1, 2, 4])
def test_a_kill_right_after_the_checkpoint_rename_loses_no_model_step_file(
    reference, tmp_path, monkeypatch, killed_call
):
    """Killed right after checkpoint.pt of step 0, 2 or 6 was renamed into place: the resumed
    run still ends with every model_step file, identical to the uninterrupted run's."""
    out = tmp_path / "run"
    real, calls = RunDirectory.save_checkpoint, {"n": 0}

    def save_then_die(self, state):
        real(self, state)
        calls["n"] += 1
        if calls["n"] == killed_call:
            raise Killed

    monkeypatch.setattr(RunDirectory, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_quietly(debug_args(out))
    monkeypatch.undo()
    assert (out / "checkpoint.pt").exists() and not (out / "done").exists()
    train_quietly(debug_args(out))
    assert_same_run(reference, out)
    assert list(out.glob("*.tmp")) == []


def test_a_kill_mid_write_of_a_model_step_file_leaves_no_temporary(reference, tmp_path, monkeypatch):
    """Killed while model_step4.pkl.tmp is half written; stray temporaries of the run's
    files (of earlier kills) are removed at the next start, other files are kept."""
    out = tmp_path / "run"
    real_save = torch.save

    def half_written(obj, path, *rest, **options):
        if str(path).endswith("model_step4.pkl.tmp"):
            Path(path).write_bytes(b"half a pickle")
            raise Killed
        return real_save(obj, path, *rest, **options)

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(Killed):
        train_quietly(debug_args(out))
    monkeypatch.undo()
    assert (out / "model_step4.pkl.tmp").exists()
    for name in ("checkpoint.pt.tmp", "results.jsonl.tmp", "model_step99.pkl.tmp", "notes.tmp"):
        (out / name).write_bytes(b"cut by a kill")
    train_quietly(debug_args(out))
    assert_same_run(reference, out)
    assert [p.name for p in out.glob("*.tmp")] == ["notes.tmp"]  # not a file of the run: kept


# -- item 2: one process per run directory ---------------------------------------------------

HOLD_FIRST_STEP = """
import sys, time, pathlib
from domaingrad import cli
from domaingrad.run.train import TrainingRun
release, real = pathlib.Path(sys.argv[1]), TrainingRun.train_step
def held(self):
    while not release.exists():
        time.sleep(0.05)
    return real(self)
TrainingRun.train_step = held
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_process_on_the_same_directory_is_refused(tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    args = [*DEBUG, "--steps", "5", "--checkpoint-freq", "2", "--output-dir", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_FIRST_STEP, str(release), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "out.txt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "out.txt").exists(), "the first process did not start its run"
        second = subprocess.run(
            [sys.executable, "-m", "domaingrad", *args], capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr
        assert f"--output-dir {out} is in use" in second.stderr and f"PID {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        release.write_text("go")
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    records, bad = read_records(out / "results.jsonl")
    assert bad == [] and [r["step"] for r in records] == [0, 2, 4]  # each once


def test_the_lock_is_reentrant_for_the_process_that_holds_it(reference, tmp_path):
    """The sweep worker holds JOB_DIR/lock and runs the training in the same process: the
    run takes the same lock without deadlock or refusal, and leaves the worker's in place."""
    out = tmp_path / "job"
    fd = acquire_lock(out)
    assert fd is not None
    this_process = f"PID {os.getpid()} on {socket.gethostname()}"
    assert lock_holder(out) == this_process  # the lock names its holder
    try:
        train_quietly(debug_args(out))
        assert lock_is_held(out) and lock_holder(out) == this_process  # still the worker's
    finally:
        release_lock(fd)
    assert not lock_is_held(out)
    assert_same_run(reference, out)


# -- item 3: a finished run, and a kill after 'done' ----------------------------------------


def test_rerunning_a_finished_run_reports_it_and_exits_0(tmp_path, run_cli, monkeypatch):
    out = tmp_path / "run"
    command = [*DEBUG, "--steps", "3", "--checkpoint-freq", "2", "--output-dir", out]
    real_unlink = Path.unlink

    def die_before_checkpoint_removal(self, missing_ok=False):
        if self.name == "checkpoint.pt" and (self.parent / "done").exists():
            raise Killed  # a kill after 'done' is written, before the checkpoint goes
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", die_before_checkpoint_removal)
    with pytest.raises(Killed):
        run_cli(*command)
    monkeypatch.undo()
    assert (out / "done").exists() and (out / "checkpoint.pt").exists()
    results = (out / "results.jsonl").read_bytes()

    code, stdout, err = run_cli(*command)  # the identical command: finished, nothing to do
    assert code == 0, err
    assert "already holds this finished run" in stdout and "2 records" in stdout
    assert str(out / "results.jsonl") in stdout and str(out / "model.pkl") in stdout
    assert not (out / "checkpoint.pt").exists()  # the stale resume state is gone
    assert (out / "results.jsonl").read_bytes() == results

    code, _, err = run_cli(*command, "--num-workers", "0")  # an argument that does not change results
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(*command, "--seed", "9")  # other arguments: still refused
    assert code == 2 and "already holds a finished run" in err and "seed: saved 0, now 9" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- items 4 and 5: output directories that cannot hold the run ------------------------------


def test_an_empty_output_dir_is_refused(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*DEBUG, "--steps", "1", "--output-dir", "")
    assert code == 2 and "--output-dir is empty" in err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_an_output_dir_under_a_file_is_refused(tmp_path, run_cli):
    (tmp_path / "notes").write_text("a file")
    code, _, err = run_cli(*DEBUG, "--steps", "1", "--output-dir", tmp_path / "notes" / "run")
    assert code == 2 and f"is under the file {tmp_path / 'notes'}" in err and "Traceback" not in err


def deny_writes(monkeypatch, path: Path) -> None:
    """Make ``path`` unwritable: chmod (the ``restore_modes`` fixture undoes it), or where
    we are root (who writes anyway) make ``os.access`` say so."""
    if os.geteuid() != 0:
        path.chmod(path.stat().st_mode & ~0o222)
        return
    real_access = os.access

    def access(p, mode, *rest, **options):
        if Path(p) == path and mode & os.W_OK:
            return False
        return real_access(p, mode, *rest, **options)

    monkeypatch.setattr(os, "access", access)


@pytest.fixture
def restore_modes(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o700)


def interrupted_run(out: Path, monkeypatch) -> None:
    """An unfinished run in ``out`` (killed after its checkpoint at step 2)."""
    real, calls = RunDirectory.save_checkpoint, {"n": 0}

    def save_then_die(self, state):
        real(self, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(RunDirectory, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            train_quietly(debug_args(out, save_model_every_checkpoint=False))


@pytest.mark.parametrize("case", ["parent", "directory", "unfinished run"])
def test_unwritable_output_dirs_are_refused_before_training(tmp_path, run_cli, monkeypatch, restore_modes, case):
    parent, out = tmp_path / "parent", tmp_path / "parent" / "run"
    parent.mkdir()
    args = [*DEBUG, "--steps", "7", "--checkpoint-freq", "2", "--output-dir", out]
    if case == "parent":
        deny_writes(monkeypatch, parent)
        expected = f"--output-dir {out} cannot be created: {parent} is not writable"
    elif case == "directory":
        out.mkdir()
        deny_writes(monkeypatch, out)
        expected = f"--output-dir {out} is not writable"
    else:
        interrupted_run(out, monkeypatch)
        deny_writes(monkeypatch, out / "results.jsonl")
        expected = "holds an unfinished run whose results.jsonl is not writable"
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    code, _, err = run_cli(*args)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == before


@pytest.mark.parametrize("failing", ["lock file", "results rewrite"])
def test_a_refused_write_is_a_clear_error(tmp_path, run_cli, monkeypatch, failing):
    """Where ``os.access`` says yes but the write is refused (root on a read-only mount,
    an ACL): the first writes turn the PermissionError into a clear error."""
    out = tmp_path / "run"
    if failing == "lock file":
        real_open = os.open

        def refuse(path, *rest, **options):
            if Path(path).name == "lock":
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *rest, **options)

        monkeypatch.setattr(os, "open", refuse)
    else:
        interrupted_run(out, monkeypatch)
        from domaingrad.run import output

        def refuse(path, data):
            raise PermissionError(13, "Permission denied", str(path) + ".tmp")

        monkeypatch.setattr(output, "atomic_write_bytes", refuse)
    code, _, err = run_cli(*DEBUG, "--steps", "7", "--checkpoint-freq", "2", "--output-dir", out)
    assert code == 2 and f"cannot write the run's files in --output-dir {out}: Permission denied" in err, err
    assert not (out / "done").exists()


@pytest.mark.parametrize("failing", ["checkpoint", "record"])
def test_a_full_disk_is_a_clear_error_and_the_rerun_resumes(reference, tmp_path, run_cli, monkeypatch, failing):
    """The disk fills at the checkpoint of step 4: torch reports it as a RuntimeError (as
    it did on a full CI machine), an append as OSError(ENOSPC). Either way the command
    exits 2 with a message, leaves no temporary, and the same command resumes to the
    uninterrupted run's records and models once there is space."""
    from domaingrad.run import output

    out = tmp_path / "run"
    monkeypatch.setattr(output, "_free_bytes", lambda path: 10 * 2**20)
    if failing == "checkpoint":
        real_save = torch.save

        def disk_full(obj, path, *rest, **options):
            if str(path).endswith("checkpoint.pt.tmp") and obj["record"]["step"] == 4:
                Path(path).write_bytes(b"the first bytes of a checkpoint")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26752 vs 26640")
            return real_save(obj, path, *rest, **options)

        monkeypatch.setattr(torch, "save", disk_full)
    else:  # the third append (step 4) to results.jsonl is refused by the file system
        appends = {"n": 0}

        def disk_full(path, mode="r", *rest, **options):
            if Path(path).name == "results.jsonl" and mode == "a":
                appends["n"] += 1
                if appends["n"] == 3:
                    raise OSError(28, "No space left on device", str(path))
            return open(path, mode, *rest, **options)

        monkeypatch.setattr(output, "open", disk_full, raising=False)  # shadows the builtin there
    code, _, err = run_cli(*debug_cli_args(out))
    written = "checkpoint.pt" if failing == "checkpoint" else "results.jsonl"
    assert code == 2 and "Traceback" not in err, err
    assert f"no space left on the device to write {out / written} (10 MiB free)" in err, err
    assert "rerun the same command: it resumes from the last checkpoint" in err
    assert list(out.glob("*.tmp")) == [] and not (out / "done").exists()
    monkeypatch.undo()
    assert run_cli(*debug_cli_args(out))[0] == 0
    assert_same_run(reference, out)


def debug_cli_args(out: Path) -> list:
    """:func:`debug_args` as a command line."""
    return [*DEBUG, "--steps", "7", "--checkpoint-freq", "2", "--save-model-every-checkpoint", "--output-dir", out]


# -- item 6: the kill campaign -----------------------------------------------------------------


@pytest.mark.slow
def test_the_kill_campaign_loses_nothing(tmp_path):
    """Two SIGKILLs at seeded random moments of one small run (about 20 s on an idle machine)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "kill_campaign.py"),
            "--quick",
            "--kills",
            "2",
            "--kills-per-run",
            "2",
            "--seed",
            "0",
            "--keep",
            str(tmp_path / "campaign"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kills made: 2 " in result.stdout
    assert "records lost: 0, files lost: 0, stray files: 0" in result.stdout
    assert "mismatches: 0 " in result.stdout


def test_a_run_started_with_an_explicit_eval_batch_size_resumes_under_auto(tmp_path, monkeypatch):
    """A run checkpointed with --eval-batch-size 512 (the default before ``auto``) resumes
    when the command no longer gives it, and keeps evaluating in batches of 512."""
    from domaingrad.run import TrainArgs
    from domaingrad.run.output import read_records
    from domaingrad.run.train import TrainingRun, run_training

    common = dict(dataset="Debug28", test_envs=[0], steps=5, checkpoint_freq=2, hparams={"batch_size": 8})
    reference = run_training(TrainArgs(eval_batch_size=512, output_dir=str(tmp_path / "ref"), **common))
    out = tmp_path / "run"
    real_step = TrainingRun.train_step
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(TrainingRun, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(TrainArgs(eval_batch_size=512, output_dir=str(out), **common))
    monkeypatch.setattr(TrainingRun, "train_step", real_step)
    resumed = run_training(TrainArgs(output_dir=str(out), **common))  # eval_batch_size auto
    assert resumed.run.eval_batch_size == 512
    records = read_records(out / "results.jsonl")[0]
    assert [r["args"]["eval_batch_size"] for r in records] == [512, 512, 512]
    expected = read_records(tmp_path / "ref" / "results.jsonl")[0]
    keys = [k for k in expected[0] if k.endswith("_acc") or k == "loss"]
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in expected]
    assert reference.run.eval_batch_size == 512
