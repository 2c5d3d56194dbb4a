"""Sweep launchers: ``sequential`` and ``local`` (:mod:`.local`), ``ray`` (:mod:`.ray`) and
``slurm`` through submitit (:mod:`.slurm`), all on the shared :mod:`.base`.

Ray and submitit are imported only when their launcher is asked for.
"""

from __future__ import annotations

from .base import Launcher, LaunchOptions, count_running, lost_outcome
from .local import launch_local, launch_sequential, stop_processes

#: the ``--launcher`` names
LAUNCHERS = ("sequential", "local", "ray", "slurm")


def get_launcher(name: str) -> Launcher:
    """The launcher registered as ``name`` (one of :data:`LAUNCHERS`).

    Raises:
        ValueError: for another name (the command line offers only these).
    """
    if name == "ray":
        from .ray import launch_ray

        return launch_ray
    if name == "slurm":
        from .slurm import launch_submitit

        return launch_submitit
    if name == "sequential":
        return launch_sequential
    if name == "local":
        return launch_local
    raise ValueError(f"unknown launcher {name!r}; expected one of {', '.join(LAUNCHERS)}")


__all__ = [
    "LAUNCHERS",
    "LaunchOptions",
    "Launcher",
    "count_running",
    "get_launcher",
    "launch_local",
    "launch_sequential",
    "lost_outcome",
    "stop_processes",
]
