"""What is needed to repeat a run: package versions, git revision, threads, device, host.

:func:`run_provenance` never fails: anything it cannot find is None.
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..version import __version__

GIT_TIMEOUT_SECONDS = 5.0


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(source: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@functools.cache
def git_revision(source: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit hash, has uncommitted changes) of the git checkout holding ``source``.

    ``source`` defaults to the directory of the ``domaingrad`` package. (None, None) when
    it is not a file tracked in a git checkout (e.g. an installed copy that happens to
    live inside some repository), when git is missing, or on any git error.
    """
    source = source or Path(__file__).resolve().parent.parent
    if _git(source, "ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    revision = _git(source, "rev-parse", "HEAD")
    if revision is None:
        return None, None
    status = _git(source, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return revision, None if status is None else bool(status)


def run_provenance(device: torch.device | str) -> dict[str, Any]:
    """The provenance of a run on ``device`` in this process (issue 6, item 6).

    Returns:
        ``{"versions": {"domaingrad", "torch", "torchvision", "numpy", "python"},
        "git_revision": commit hash or None, "git_dirty": bool or None (uncommitted
        changes in the package's source tree), "torch_threads": intra-op threads,
        "torch_interop_threads": inter-op threads, "device": e.g. "cpu" or "cuda:0",
        "device_name": the CUDA device name or None, "hostname", "platform"}``.
    """
    device = torch.device(device)
    revision, dirty = git_revision()
    device_name = None
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            device_name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError):
            device_name = None
    return {
        "versions": {
            "domaingrad": __version__,
            "torch": torch.__version__,
            "torchvision": _package_version("torchvision"),
            "numpy": _package_version("numpy"),
            "python": platform.python_version(),
        },
        "git_revision": revision,
        "git_dirty": dirty,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": device_name,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
