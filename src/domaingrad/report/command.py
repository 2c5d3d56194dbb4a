"""``domaingrad report`` (placeholder until the report module lands)."""
from __future__ import annotations

import argparse

from ..errors import DomainGradError


def add_parser(subparsers) -> None:
    subparsers.add_parser("report", help="(not yet available)")


def run(ns: argparse.Namespace) -> int:
    raise DomainGradError("`domaingrad report` is not available yet")
