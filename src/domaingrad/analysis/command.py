"""``domaingrad analyze NAME ...``: run one gradient analysis (see :mod:`domaingrad.analysis`).

The top-level parser only knows the names (cheap); ``domaingrad analyze NAME --help``
imports that analysis's module, which adds its own options with
``add_arguments(parser)`` and runs with ``main(namespace) -> exit code``.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from . import ANALYSES

DESCRIPTION = "Measure the gradient properties the gradient-based DG methods rest on. Analyses:\n\n" + "\n".join(
    f"  {name:<18} {summary}" for name, (_, summary) in ANALYSES.items()
)


def add_parser(subparsers) -> None:
    """Register ``analyze`` on the CLI's subparsers (argparse only)."""
    p = subparsers.add_parser(
        "analyze",
        help="gradient analyses of the papers (similarity, angles, modification, gsnr, ...)",
        description=DESCRIPTION + "\n\n`domaingrad analyze NAME --help` shows the options of one analysis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("analysis", choices=list(ANALYSES), metavar="NAME", help="one of: " + ", ".join(ANALYSES))
    p.add_argument("analysis_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def analysis_parser(name: str) -> tuple[argparse.ArgumentParser, ModuleType]:
    """The parser of ``domaingrad analyze NAME`` and the analysis module."""
    module_name, summary = ANALYSES[name]
    module = importlib.import_module(f"domaingrad.analysis.{module_name}")
    parser = argparse.ArgumentParser(
        prog=f"domaingrad analyze {name}",
        description=summary + ".\n\n" + (module.__doc__ or "").strip().split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def run(ns: argparse.Namespace) -> int:
    parser, module = analysis_parser(ns.analysis)
    sub = parser.parse_args(ns.analysis_args)
    return int(module.main(sub) or 0)
