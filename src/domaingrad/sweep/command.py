"""``domaingrad sweep`` (placeholder until the sweep module lands)."""
from __future__ import annotations

import argparse

from ..errors import DomainGradError


def add_parser(subparsers) -> None:
    subparsers.add_parser("sweep", help="(not yet available)")


def run(ns: argparse.Namespace) -> int:
    raise DomainGradError("`domaingrad sweep` is not available yet")
