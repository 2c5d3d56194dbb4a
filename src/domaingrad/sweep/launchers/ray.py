"""``--launcher ray``: each job is a Ray task that runs the job process.

With ``--ray-address`` the sweep connects to a running cluster (``ray start --head
--port 6379`` on one machine, ``ray start --address HEAD_IP:6379`` on the others); the
sweep directory and the data directory must then be on a file system every node sees,
under the same path, and domaingrad installed on every node. The connection is bounded:
the host name is looked up and the port tried with a TCP connection first, then
``ray.init`` gets ``LaunchOptions.ray_timeout`` seconds; an address that does not answer
is a :class:`~domaingrad.errors.DomainGradError` naming it, never a hang. Without an
address a local Ray instance is started with ``workers x threads_per_job`` CPUs and
stopped at the end. Each task asks for ``threads_per_job`` CPUs, so Ray runs as many
jobs at once as CPUs allow.

Each attempt writes the Ray node that ran it (node id, its IP, the host and the task's
process id) as the first line of that attempt in the job's ``out.txt``
(:func:`~domaingrad.sweep.launchers.base.note_attempt`).

Ray retries a task whose worker process or node died (its default ``max_retries``); the
job then resumes from its last checkpoint, on whichever node Ray picks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ...errors import DomainGradError
from ..execute import JobOutcome, run_job
from ..jobs import Job
from ..progress import SweepProgress
from .base import LaunchOptions, count_running, lost_outcome, note_attempt

WAIT_SECONDS = 0.5
#: seconds for each of the name lookup and the TCP connection (at most ``ray_timeout``)
PROBE_SECONDS = 10.0
HOW_TO_START = (
    "Start a cluster with `ray start --head --port 6379` on the head node (and "
    "`ray start --address HEAD_IP:6379` on every other node), then pass --ray-address HEAD_IP:6379; "
    "`ray status` on the head node shows a running cluster's address"
)

TOKEN_HINT = (
    'A cluster with token authentication (`ray start` says "Token authentication is enabled") needs '
    "RAY_AUTH_MODE=token and the cluster's token (in ~/.ray/auth_token, the file named by RAY_AUTH_TOKEN_PATH, "
    "or RAY_AUTH_TOKEN) in the shell that runs the sweep"
)


def ray_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) that ``address`` names: ``HOST:PORT``, ``[IPv6]:PORT`` or
    ``ray://HOST:PORT`` (Ray Client); None for ``auto`` (Ray looks the cluster up).

    Raises:
        DomainGradError: for anything else (no port, a port that is not a number in 1..65535).
    """
    if address in ("auto", ""):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DomainGradError(
            f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379, the head node's address), "
            f"ray://HOST:PORT (Ray Client) or auto. {HOW_TO_START}."
        )
    return host, int(port)


def _bounded(call, seconds: float, name: str):
    """``call()`` in a daemon thread; (True, its result) or (False, None) after ``seconds``.

    An exception of ``call`` is re-raised here. A call still running after ``seconds`` is
    abandoned (a blocking name lookup or connection attempt cannot be cancelled).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box.get("result")


def probe_address(address: str, host: str, port: int, timeout: float) -> None:
    """Look ``host`` up and open a TCP connection to ``port``, each within ``timeout`` s.

    Raises:
        DomainGradError: the name does not resolve or the port does not accept a
            connection, naming ``address`` and how to start a cluster.
    """

    def fail(reason: str) -> DomainGradError:
        return DomainGradError(f"cannot connect to the Ray cluster at {address}: {reason}. {HOW_TO_START}.")

    try:
        finished, infos = _bounded(
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout, "domaingrad-ray-lookup"
        )
    except socket.gaierror as exc:
        raise fail(f"the host name {host!r} does not resolve ({exc.strerror or exc})") from exc
    if not finished:
        raise fail(f"looking the host name {host!r} up took more than {timeout:g} s")
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            return
        except TimeoutError:
            errors.append(f"{sockaddr[0]}: no answer within {timeout:g} s")
        except OSError as exc:
            errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
    raise fail(f"nothing accepts connections on port {port} ({'; '.join(dict.fromkeys(errors))})")


def _quiet_thread_warning(record: logging.LogRecord) -> bool:
    # ray.init from a helper thread leaves the SIGTERM handler alone (the sweep's own
    # handler stops the jobs cleanly) and says so; that is intended here
    return "SIGTERM handler is not set" not in record.getMessage()


def _auto_address(ray, address: str) -> tuple[str, int] | None:
    """The (host, port) Ray itself would pick for ``auto`` (``RAY_ADDRESS``, else the cluster
    last started on this machine), or None when this Ray version does not tell.

    Raises:
        DomainGradError: Ray finds no running cluster on this machine.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:
        return None
    try:
        found = canonicalize_bootstrap_address_or_die(address)
    except ConnectionError as exc:
        raise DomainGradError(f"--ray-address {address}: {exc} {HOW_TO_START}.") from exc
    except Exception:  # noqa: BLE001 - Ray's private lookup changed: let ray.init look it up
        return None
    try:
        return ray_host_port(found)
    except DomainGradError:
        return None


def _connect(options: LaunchOptions):
    """(the ray module, whether this call connected or started Ray and must shut it down)."""
    try:
        import ray
    except ImportError as exc:
        raise DomainGradError("--launcher ray needs Ray: pip install 'domaingrad[ray]' (or pip install ray)") from exc
    if ray.is_initialized():
        return ray, False
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if not options.ray_address:
        ray.init(num_cpus=options.workers * options.threads_per_job, **common)
        return ray, True
    address, timeout = options.ray_address, options.ray_timeout
    if not timeout > 0:
        raise DomainGradError(f"the Ray connection timeout must be a positive number of seconds, got {timeout}")
    print(f"connecting to the Ray cluster at {address} (giving up after {timeout:g} s)", flush=True)
    target = ray_host_port(address)
    if target is None:
        target = _auto_address(ray, address)
    if target is not None:
        probe_address(address, *target, min(PROBE_SECONDS, timeout))
    worker_logger = logging.getLogger("ray._private.worker")
    worker_logger.addFilter(_quiet_thread_warning)
    try:
        finished, _ = _bounded(lambda: ray.init(address=address, **common), timeout, "domaingrad-ray-connect")
    except (ConnectionError, RuntimeError) as exc:
        raise DomainGradError(
            f"cannot connect to the Ray cluster at {address} ({exc})"
            + (", although its port accepts connections. " if target is not None else ". ")
            + f"{TOKEN_HINT}; otherwise check the address with `ray status` on the head node. {HOW_TO_START}."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - Ray's AuthenticationError, a missing ray[client], ...
        hint = TOKEN_HINT if type(exc).__name__ == "AuthenticationError" else HOW_TO_START
        raise DomainGradError(
            f"cannot connect to the Ray cluster at {address} ({type(exc).__name__}: {exc}). {hint}."
        ) from exc
    finally:
        worker_logger.removeFilter(_quiet_thread_warning)
    if not finished:
        raise DomainGradError(
            f"cannot connect to the Ray cluster at {address}: the port accepts connections but no Ray cluster "
            f"answered within {timeout:g} s (is it the GCS port of the head node, the --port of `ray start "
            f"--head`?). {HOW_TO_START}."
        )
    return ray, True


def run_ray_task(job: Job, threads: int) -> JobOutcome:
    """The Ray task of one job: note the node in ``out.txt``, then run the job process."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    note_attempt(job, f"Ray node {node_id} (IP {ray.util.get_node_ip_address()})")
    return run_job(job, threads)


def launch_ray(jobs: Sequence[Job], options: LaunchOptions, progress: SweepProgress) -> list[JobOutcome]:
    """Run every job as a Ray task of ``threads_per_job`` CPUs; returns their outcomes.

    Raises:
        DomainGradError: Ray missing, or the cluster at ``options.ray_address`` does not
            answer within ``options.ray_timeout`` seconds.
    """
    ray, started_here = _connect(options)
    try:
        task = ray.remote(num_cpus=options.threads_per_job)(run_ray_task)
        by_ref = {task.remote(job, options.threads_per_job): job for job in jobs}
        pending = list(by_ref)
        outcomes = []
        last_count = 0.0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SECONDS)
                for ref in ready:
                    job = by_ref[ref]
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - Ray lost the task: report it, go on
                        outcome = lost_outcome(job, f"Ray task failed: {exc}")
                    outcomes.append(outcome)
                    progress.finished(job, outcome)
                if time.monotonic() - last_count > 1.0:
                    progress.set_running(count_running([by_ref[r] for r in pending]))
                    last_count = time.monotonic()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return outcomes
    finally:
        if started_here:
            ray.shutdown()
