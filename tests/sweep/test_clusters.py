"""The Ray and Slurm launchers against addresses that do not answer, against a machine
without Slurm, and (marker ``clusters``, ``make test-clusters``) against real clusters
started here: a two-node Ray cluster and a single-node Slurm cluster.

A job is frozen with SIGSTOP at its first checkpoint record before its node or its Slurm
task is killed, so the kill always lands in the middle of the job.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from domaingrad import cli
from domaingrad.sweep.launchers import LaunchOptions
from domaingrad.sweep.launchers import slurm as slurm_launcher
from domaingrad.sweep.manifest import manifest_jobs

from .cluster_fixtures import (
    RayCluster,
    attempts,
    slurm_unavailable_reason,
    start_ray_cluster,
    start_slurm_cluster,
    stop_slurm_cluster,
    worker_pid,
)
from .conftest import sweep_flags
from .test_launchers import comparable_records

STEPS, CHECKPOINT_FREQ = 21, 10  # records at steps 0, 10, 20
HOW_TO_START = "ray start --head --port 6379"


def flags(data_dir: Path, test_envs: str = "0 1") -> list[str]:
    return sweep_flags(data_dir, STEPS, CHECKPOINT_FREQ, test_envs)


class _Deadline(BaseException):
    """Raised by SIGALRM in a CLI call that ran past its time (no ``except Exception`` stops it)."""


def run_cli_bounded(args: list, timeout: int) -> tuple[int, float]:
    """``domaingrad ARGS`` in this (main) thread, stopped by SIGALRM after ``timeout`` seconds:
    (exit code, seconds); an AssertionError when it ran out of time."""

    def on_alarm(signum, frame):
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    start = time.monotonic()
    try:
        code = cli.main([str(a) for a in args])
    except _Deadline:
        raise AssertionError(f"`domaingrad {' '.join(map(str, args[:2]))}` still ran after {timeout} s") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, time.monotonic() - start


def steps_of(job_dir: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (job_dir / "results.jsonl").read_text().splitlines()]


def wait_until(condition, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- bounded Ray connection (no cluster needed) ------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:1", "notahost:6379"], ids=["nothing-listening", "unknown-host"])
def test_unreachable_ray_address_fails_in_seconds_naming_it(tiny_mnist_dir, tmp_path, capsys, address):
    sweep = tmp_path / "sweep"
    args = ["sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir, "0")]
    code, seconds = run_cli_bounded([*args, "--launcher", "ray", "--ray-address", address], 90)
    out, err = capsys.readouterr()
    assert code == 2 and seconds < 20, (code, seconds, err)
    assert f"connecting to the Ray cluster at {address}" in out
    assert f"cannot connect to the Ray cluster at {address}" in err and HOW_TO_START in err
    assert "Traceback" not in err
    assert not list(sweep.glob("*/out.txt"))  # no job started


def test_malformed_ray_address_is_a_clear_error(tiny_mnist_dir, tmp_path, run_cli):
    code, _, err = run_cli(
        "sweep", "launch", "--output-dir", tmp_path, *flags(tiny_mnist_dir, "0"), "--launcher", "ray",
        "--ray-address", "head-node",
    )  # fmt: skip
    assert code == 2
    assert "--ray-address 'head-node': expected HOST:PORT" in err and HOW_TO_START in err


def test_port_that_is_not_ray_times_out(tmp_path):
    """A port that accepts connections but never answers as Ray: ray.init is abandoned after
    ``ray_timeout`` (in a separate process: the abandoned connection attempt stays behind)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept_until_closed() -> None:
        try:
            accepted.extend(server.accept() for _ in range(64))
        except OSError:  # the test closed the server
            pass

    threading.Thread(target=accept_until_closed, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    script = (
        "import sys\n"
        "from domaingrad.errors import DomainGradError\n"
        "from domaingrad.sweep.launchers import LaunchOptions, get_launcher\n"
        "from domaingrad.sweep.progress import SweepProgress\n"
        "options = LaunchOptions(ray_address=sys.argv[1], ray_timeout=3.0)\n"
        "try:\n"
        "    get_launcher('ray')([], options, SweepProgress(0, bar=False))\n"
        "except DomainGradError as exc:\n"
        "    print('error:', exc)\n"
        "    sys.exit(2)\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, address], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    seconds = time.monotonic() - start
    server.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot connect to the Ray cluster at {address}" in result.stdout
    assert "no Ray cluster answered within 3 s" in result.stdout and HOW_TO_START in result.stdout
    assert seconds < 60


# -- the Slurm launcher never falls back to local processes unasked ---------------------------


def test_slurm_launcher_without_slurm_refuses(tiny_mnist_dir, tmp_path, run_cli, monkeypatch):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch
    sweep = tmp_path / "sweep"
    code, _, err = run_cli(
        "sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir, "0"), "--launcher", "slurm"
    )  # fmt: skip
    assert code == 2
    assert "no Slurm on this machine (sbatch is not on PATH)" in err and "--submitit-cluster local" in err
    assert not list(sweep.glob("*/out.txt")) and not list(sweep.glob("*/done"))  # nothing ran locally


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_without_slurm_on_purpose_says_so(tmp_path, capsys, cluster):
    slurm_launcher.make_executor(LaunchOptions(submitit={"folder": str(tmp_path), "cluster": cluster}))
    err = capsys.readouterr().err
    assert f"warning: --submitit-cluster {cluster}: the jobs run" in err and "not on Slurm" in err


# -- real clusters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_reference(tiny_mnist_dir, tmp_path_factory) -> Path:
    """The two-job sweep run by the local launcher: the records every cluster must reproduce."""
    sweep = tmp_path_factory.mktemp("reference") / "sweep"
    code = cli.main(
        ["sweep", "launch", "--output-dir", str(sweep), *flags(tiny_mnist_dir), "--launcher", "local", "--workers", "2"]
    )
    assert code == 0
    return sweep


def assert_matches_reference(sweep: Path, reference: Path, n_jobs: int) -> None:
    ours, theirs = comparable_records(sweep), comparable_records(reference)
    assert len(ours) == n_jobs and set(ours) <= set(theirs)
    assert ours == {job_id: theirs[job_id] for job_id in ours}
    assert all([record["step"] for record in records] == [0, 10, 20] for records in ours.values())


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = start_ray_cluster()
    yield cluster
    cluster.stop()


def ray_sweep(cluster: RayCluster, sweep: Path, data_dir: Path) -> subprocess.Popen:
    """``domaingrad sweep launch --launcher ray --ray-address HEAD`` as a separate driver process."""
    command = [sys.executable, "-m", "domaingrad", "sweep", "launch", "--output-dir", str(sweep)]
    command += [*flags(data_dir), "--launcher", "ray", "--ray-address", cluster.address]
    return subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.clusters
def test_ray_sweep_across_two_nodes_matches_local(ray_cluster, local_reference, tiny_mnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    process = ray_sweep(ray_cluster, sweep, tiny_mnist_dir)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    assert f"connecting to the Ray cluster at {ray_cluster.address}" in out
    assert "launch finished: 2 done, 0 failed" in out
    assert_matches_reference(sweep, local_reference, 2)
    ran_on = {job.id: attempts(sweep / job.id) for job in manifest_jobs(sweep)}
    assert all(len(where) == 1 for where in ran_on.values()), ran_on
    nodes = {where[0].split()[2] for where in ran_on.values()}  # "Ray node <id> (IP ...)"
    assert nodes == set(ray_cluster.node_ids.values()), (ran_on, ray_cluster.node_ids)


@pytest.mark.clusters
def test_ray_worker_node_killed_mid_sweep_loses_nothing(ray_cluster, local_reference, tiny_mnist_dir, tmp_path):
    """Run last among the Ray tests: the worker node does not come back."""
    sweep = tmp_path / "sweep"
    process = ray_sweep(ray_cluster, sweep, tiny_mnist_dir)
    worker_node = ray_cluster.node_ids["worker"]

    def job_on_worker_node_with_a_record():
        for job_dir in sweep.glob("*/"):
            where = attempts(job_dir)
            if where and worker_node in where[-1] and (job_dir / "results.jsonl").exists():
                return job_dir
        return None

    try:
        job_dir = wait_until(job_on_worker_node_with_a_record, 240, "a job on the worker node to write a record")
        pid = wait_until(lambda: worker_pid(job_dir), 10, "its job process")
        os.kill(pid, signal.SIGSTOP)
        assert not (job_dir / "done").exists(), "the job finished before it could be stopped"
        raylets = ray_cluster.raylet_pids("worker")
        assert len(raylets) == 1
        os.kill(raylets[0], signal.SIGKILL)
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert "launch finished: 2" in out, out[-3000:]  # the launch ends, with every job reported
    relaunch = ray_sweep(ray_cluster, sweep, tiny_mnist_dir)
    again, _ = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, again[-3000:]
    assert (
        "2 jobs: 2 done"
        in subprocess.run(
            [sys.executable, "-m", "domaingrad", "sweep", "status", "--output-dir", str(sweep)],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert_matches_reference(sweep, local_reference, 2)  # nothing lost, nothing twice
    where = attempts(job_dir)
    assert len(where) >= 2 and worker_node in where[0] and ray_cluster.node_ids["head"] in where[-1], where
    assert "resuming from the checkpoint at step" in (job_dir / "out.txt").read_text()


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_slurm_cluster()
    yield cluster
    stop_slurm_cluster(cluster)


@pytest.mark.clusters
def test_slurm_job_array_matches_local(slurm_cluster, local_reference, tiny_mnist_dir, tmp_path, run_cli):
    sweep = tmp_path / "sweep"
    code, out, err = run_cli("sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir), "--launcher", "slurm")
    assert code == 0, out + err
    assert "launch finished: 2 done, 0 failed" in out and "warning" not in err
    assert_matches_reference(sweep, local_reference, 2)
    ran_in = [attempts(sweep / job.id) for job in manifest_jobs(sweep)]
    assert all(len(where) == 1 and where[0].startswith("Slurm job ") for where in ran_in), ran_in
    array_ids = {where[0].split()[2].split("_")[0] for where in ran_in}  # "Slurm job MAIN_INDEX (...)"
    assert len(array_ids) == 1  # one job array
    assert sorted(where[0].split()[2].split("_")[1] for where in ran_in) == ["0", "1"]


@pytest.mark.clusters
def test_slurm_cancelled_tasks_reported_failed_and_relaunch_finishes(
    slurm_cluster, local_reference, tiny_mnist_dir, tmp_path, capsys, monkeypatch
):
    """One array task at a time: the pending task is scancelled as soon as the array is
    submitted, the running one at its first record (frozen there with SIGSTOP)."""
    monkeypatch.setattr(slurm_launcher, "VANISHED_CHECK_SECONDS", 2.0)
    sweep = tmp_path / "sweep"
    args = ["sweep", "launch", "--output-dir", sweep, *flags(tiny_mnist_dir), "--launcher", "slurm"]
    args += ["--slurm-array-parallelism", "1"]

    def running_job_with_a_record():
        for job_dir in sweep.glob("*/"):
            where = attempts(job_dir)
            if where and (job_dir / "results.jsonl").exists() and not (job_dir / "done").exists():
                return job_dir, where[-1].split()[2]
        return None

    cancelled: dict = {}

    def cancel_both_tasks() -> None:  # while the launch runs in the main thread
        try:
            script = wait_until(lambda: next(sweep.glob(".submitit/*_submission.sh"), None), 240, "the array")
            main_id = script.name.split("_")[0]
            subprocess.run(["scancel", f"{main_id}_1"], check=True)
            job_dir, task = wait_until(running_job_with_a_record, 240, "array task 0 to write a record")
            os.kill(wait_until(lambda: worker_pid(job_dir), 10, "its job process"), signal.SIGSTOP)
            subprocess.run(["scancel", task], check=True)
            cancelled.update(job_dir=job_dir, task=task)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            cancelled["error"] = exc

    canceller = threading.Thread(target=cancel_both_tasks, daemon=True)
    canceller.start()
    code, _ = run_cli_bounded(args, 240)  # the launch must not wait for the cancelled tasks forever
    canceller.join(10)
    if "error" in cancelled:
        raise cancelled["error"]
    job_dir = cancelled["job_dir"]
    assert cancelled["task"].endswith("_0")
    out = capsys.readouterr().out
    assert code == 1 and "launch finished: 0 done, 2 failed" in out, out
    (other,) = [job for job in manifest_jobs(sweep) if job.id != job_dir.name]
    assert re.search(rf"FAILED \(exit -?\d+\): {job_dir.name}", out), out  # killed in the middle
    assert f"FAILED (exit None): {other.id}" in out  # never started
    assert not (sweep / other.id).exists()  # still "not launched"
    assert "resuming" not in (job_dir / "out.txt").read_text()

    code, _ = run_cli_bounded(args, 240)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "About to launch 2 jobs" in out and "launch finished: 2 done, 0 failed" in out
    assert_matches_reference(sweep, local_reference, 2)
    assert len(attempts(job_dir)) == 2 and len(attempts(sweep / other.id)) == 1
    assert "resuming from the checkpoint at step" in (job_dir / "out.txt").read_text()


class _Handle:
    """A submitit job handle as :func:`_drop_vanished` sees it."""

    def __init__(self, job_id: str, state: str):
        self.job_id, self.state = job_id, state

    def done(self) -> bool:
        return False


def test_slurm_task_that_slurm_no_longer_lists_is_reported_not_waited_for(tmp_path, monkeypatch):
    """sacct has no record (submitit's state UNKNOWN) and squeue does not list it: lost
    after two looks in a row; a task squeue still lists, or with a known state, is kept."""
    from domaingrad.sweep.jobs import Job
    from domaingrad.sweep.progress import SweepProgress

    args = {"dataset": "ColoredMNIST", "algorithm": "ERM", "test_envs": [0], "hparams_seed": 0, "trial_seed": 0}
    jobs = [Job(f"job{i}", {**args, "output_dir": str(tmp_path / f"job{i}")}) for i in range(3)]
    pending = [(_Handle("5_0", "UNKNOWN"), jobs[0]), (_Handle("5_1", "RUNNING"), jobs[1])]
    pending.append((_Handle("5_2", "UNKNOWN"), jobs[2]))
    monkeypatch.setattr(slurm_launcher, "listed_by_squeue", lambda ids: {"5_1", "5_2"} & set(ids))
    missing: dict[str, int] = {}
    outcomes: list = []
    progress = SweepProgress(3, stream=io.StringIO(), bar=False)
    assert slurm_launcher._drop_vanished(pending, missing, outcomes, progress) == pending  # one look: kept
    still = slurm_launcher._drop_vanished(pending, missing, outcomes, progress)
    assert still == pending[1:]
    (outcome,) = outcomes
    assert outcome.id == "job0" and outcome.failed and outcome.returncode is None
    assert "Slurm no longer lists array task 5_0" in outcome.error
    assert not (tmp_path / "job0").exists()  # it never started: left "not launched"
    monkeypatch.setattr(slurm_launcher, "listed_by_squeue", lambda ids: None)  # squeue cannot tell
    assert slurm_launcher._drop_vanished(still, missing, outcomes, progress) == still
