"""Real clusters on this machine for the cluster tests: a two-node Ray cluster (``ray start
--head`` plus a second ``ray start --address=...`` with its own temp dir and resources) and
the single-node Slurm cluster of ``scripts/start_slurm.sh``.

Processes are found and stopped by the id of what these helpers started (the cluster's own
temp dir in their command line, and their children), never by name: other Ray instances on
the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_SLURM = REPO / "scripts" / "start_slurm.sh"
#: the custom resource that marks the worker node
WORKER_RESOURCE = "domaingrad_test_worker"
ATTEMPT_LINE = re.compile(r"^domaingrad sweep: attempt on (?P<where>.*?), host ", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line contains ``text``, and of all their descendants."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    tree, todo, result = _children(), list(found), set()
    while todo:
        pid = todo.pop()
        if pid not in result and pid != os.getpid():
            result.add(pid)
            todo.extend(tree.get(pid, []))
    return sorted(result)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, each process in ``pids``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class RayCluster:
    """A running two-node Ray cluster started by :func:`start_ray_cluster`.

    Attributes:
        root: temp dir holding the auth token and each node's Ray temp dir (``head``, ``worker``).
        address: the head's GCS address ``IP:PORT``, for ``--ray-address``.
        env: the environment every Ray process of the cluster (and a driver) needs.
        node_ids: ``{"head": ..., "worker": ...}``, Ray's node ids.
    """

    root: Path
    address: str
    env: dict[str, str]
    node_ids: dict[str, str] = field(default_factory=dict)

    def node_dir(self, which: str) -> Path:
        return self.root / which

    def raylet_pids(self, which: str) -> list[int]:
        """The raylet process of node ``which`` (``head`` or ``worker``)."""
        pids = []
        for pid in processes_mentioning(str(self.node_dir(which)) + "/"):
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"/raylet"):
                pids.append(pid)
        return pids

    def stop(self) -> None:
        stop_pids(processes_mentioning(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)


def _ray_start(cluster: RayCluster, which: str, worker_ports: int, *extra: str) -> None:
    """``ray start EXTRA`` for node ``which``, its worker processes on ports from ``worker_ports``."""
    command = [
        ray_executable(),
        "start",
        *extra,
        "--num-cpus",
        "1",
        "--temp-dir",
        str(cluster.node_dir(which)),
        "--disable-usage-stats",
        # ports that default to fixed numbers get free ones: two nodes share this machine
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--min-worker-port",
        str(worker_ports),
        "--max-worker-port",
        str(worker_ports + 199),
    ]
    result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def start_ray_cluster() -> RayCluster:
    """``ray start --head`` (1 CPU) and ``ray start --address=HEAD`` (1 CPU and the custom
    resource :data:`WORKER_RESOURCE`), each with its own temp dir and ports, token
    authentication with a token of their own, and a GCS that declares a node dead about 3 s
    after its raylet stops answering."""
    root = Path(tempfile.mkdtemp(prefix="dgray", dir="/tmp"))  # short: Ray's socket paths must fit
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_health_check_initial_delay_ms="1000",
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    cluster = RayCluster(root, "", env)
    try:
        port, ports = free_port(), 20000 + secrets.randbelow(100) * 400
        head = ("--head", "--port", str(port), "--include-dashboard=false", "--dashboard-port", str(free_port()))
        _ray_start(cluster, "head", ports, *head)
        resources = json.dumps({WORKER_RESOURCE: 1})
        _ray_start(cluster, "worker", ports + 200, "--address", f"127.0.0.1:{port}", "--resources", resources)
        cluster.address = f"127.0.0.1:{port}"
        cluster.node_ids = _node_ids(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_ids(cluster: RayCluster) -> dict[str, str]:
    script = (
        "import json, ray\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False, include_dashboard=False)\n"
        "print(json.dumps([(n['NodeID'], n['Resources']) for n in ray.nodes() if n['Alive']]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=cluster.env, capture_output=True, text=True, timeout=180
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot list the nodes of the Ray cluster:\n{result.stderr[-3000:]}")
    nodes = json.loads(result.stdout.strip().splitlines()[-1])
    ids = {("worker" if WORKER_RESOURCE in resources else "head"): node_id for node_id, resources in nodes}
    if len(nodes) != 2 or len(ids) != 2:
        raise RuntimeError(f"expected a head and a worker node, got {nodes}")
    return ids


def attempts(job_dir: Path) -> list[str]:
    """Where each attempt of a job ran, as its ``out.txt`` says (oldest first)."""
    log = job_dir / "out.txt"
    return [m.group("where") for m in ATTEMPT_LINE.finditer(log.read_text())] if log.exists() else []


def worker_pid(job_dir: Path) -> int | None:
    """The id of the job process (``python -m domaingrad.sweep.worker``) running ``job_dir``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            data = cmdline.read_bytes()
        except OSError:
            continue
        if b"domaingrad.sweep.worker" in data and str(job_dir).encode() in data:
            return int(cmdline.parent.name)
    return None


@dataclass
class SlurmCluster:
    """The single-node Slurm cluster; ``started_here``: this session started it (and stops it)."""

    started_here: bool


def slurm_unavailable_reason() -> str | None:
    """Why there can be no Slurm cluster here, or None."""
    missing = [tool for tool in ("sbatch", "slurmctld", "slurmd", "sacct") if shutil.which(tool) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} not on PATH); install it with "
            "`apt-get install slurm-wlm slurmdbd munge mariadb-server` (as root; .ci/run does) and start it "
            "with `scripts/start_slurm.sh`"
        )
    if _slurm_answers():
        return None
    if os.geteuid() != 0:
        return "Slurm is installed but not running, and starting it needs root: sudo scripts/start_slurm.sh"
    return None


def _slurm_answers() -> bool:
    return subprocess.run([str(START_SLURM), "status"], capture_output=True, timeout=60).returncode == 0


def start_slurm_cluster() -> SlurmCluster:
    """The running cluster, started with ``scripts/start_slurm.sh`` if it is not up.

    Raises:
        RuntimeError: the script failed (its output is in the message).
    """
    if _slurm_answers():
        return SlurmCluster(started_here=False)
    result = subprocess.run([str(START_SLURM)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/start_slurm.sh failed:\n{result.stdout}\n{result.stderr}")
    return SlurmCluster(started_here=True)


def stop_slurm_cluster(cluster: SlurmCluster) -> None:
    if cluster.started_here:
        subprocess.run([str(START_SLURM), "stop"], capture_output=True, timeout=120)
