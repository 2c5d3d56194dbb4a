"""Finding a user's algorithm or dataset: ``module:attribute`` specs and entry points.

An algorithm or dataset that lives outside domaingrad is named in one of three ways:

- registered in this process with ``@register_algorithm("Name")`` /
  ``@register_dataset("Name")`` (the module must have been imported);
- a *spec* ``package.module:Attribute`` (``--algorithm my_package.my_module:MyAlg``):
  the module is imported (it must be importable: installed, or its folder on
  ``PYTHONPATH``) and the attribute is the class. The spec travels as the name, in the
  run's arguments, its records and a sweep's job arguments, so every process that reads
  it (sweep workers included) imports the same class;
- an entry point of an installed distribution, in the group ``domaingrad.algorithms``
  or ``domaingrad.datasets`` (``pyproject.toml``:
  ``[project.entry-points."domaingrad.algorithms"] MyAlg = "my_package.my_module:MyAlg"``).

This module knows nothing of algorithms or datasets: the registries
(:mod:`domaingrad.algorithms`, :mod:`domaingrad.data`) check what it loads.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from .errors import DomainGradError

#: entry-point groups
ALGORITHM_GROUP = "domaingrad.algorithms"
DATASET_GROUP = "domaingrad.datasets"

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_spec(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:Attribute`` (a dotted module path, a
    colon and a dotted attribute path)."""
    return ":" in name and _SPEC.match(name) is not None


def load_spec(spec: str, option: str) -> Any:
    """The object a ``module:attribute`` spec names, importing the module.

    Args:
        spec: e.g. ``"my_package.my_module:MyAlg"``.
        option: the command-line option the spec came from, for the messages
            (e.g. ``"--algorithm"``).

    Raises:
        DomainGradError: a malformed spec, a module that cannot be found or fails to
            import, or a missing attribute; each says what was expected.
    """
    if not is_spec(spec):
        raise DomainGradError(
            f"{option} {spec!r} is not of the form package.module:Attribute (e.g. my_package.my_module:MyAlg)"
        )
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if (
            exc.name is not None
            and module_name.startswith(exc.name)
            and module_name[len(exc.name) : len(exc.name) + 1] in ("", ".")
        ):
            raise DomainGradError(
                f"{option} {spec}: no module named {exc.name!r}. The module must be importable here (and in "
                f"sweep workers): install its package, or add the folder holding it to PYTHONPATH "
                f"(e.g. PYTHONPATH=/path/to/folder domaingrad ...)"
            ) from exc
        raise DomainGradError(f"{option} {spec}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any error inside the user's module is reported as such
        raise DomainGradError(f"{option} {spec}: importing {module_name} failed ({type(exc).__name__}: {exc})") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise DomainGradError(
                f"{option} {spec}: module {module_name} has no attribute {attribute!r}; "
                f"it defines: {', '.join(public) or 'nothing public'}"
            )
        target = getattr(target, part)
    return target


def entry_point_names(group: str) -> list[str]:
    """The names of the installed entry points of ``group``, sorted (nothing is imported)."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})


def load_entry_point(group: str, name: str, option: str) -> Any | None:
    """The object of the installed entry point ``name`` of ``group``, or None when no
    distribution declares one.

    Raises:
        DomainGradError: the entry point exists but fails to load.
    """
    for ep in metadata.entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in is the user's to fix
                raise DomainGradError(
                    f"{option} {name}: the entry point {ep.value!r} (group {group}) failed "
                    f"to load ({type(exc).__name__}: {exc})"
                ) from exc
    return None


def check_new_name(name: str, builtin: frozenset[str], kind: str) -> None:
    """Refuse a registry name that is empty, holds a colon (the mark of a spec) or is one
    of domaingrad's own ``builtin`` names; ``kind`` is ``"algorithm"`` or ``"dataset"``.

    Raises:
        ValueError: naming the rule broken (a programming error of the registering code).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(
            f"a {kind} name is a non-empty string without ':' (which marks package.module:Class specs), got {name!r}"
        )
    if name in builtin:
        raise ValueError(f"{name!r} is one of domaingrad's own {kind}s; register yours under another name")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean X?"`` for an unknown ``name``: the names of ``known`` equal to it
    up to case when there are several (an ambiguous spelling), else the closest one,
    compared case-insensitively (:func:`difflib.get_close_matches`, cutoff 0.6);
    ``""`` when none is close.

    Example:

    >>> did_you_mean("Fisher", ["ERM", "Fish", "Fishr"])
    '; did you mean Fishr?'
    """
    names = list(dict.fromkeys(known))
    close = [n for n in names if n.lower() == name.lower()]
    if len(close) < 2:
        by_lower: dict[str, str] = {}
        for candidate in names:
            by_lower.setdefault(candidate.lower(), candidate)
        close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=1)]
    if not close:
        return ""
    return "; did you mean " + (close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]) + "?"


def canonical_name(name: str, known: Iterable[str]) -> str | None:
    """The spelling in ``known`` of ``name``: ``name`` itself when listed, else the one
    name equal to it up to case (``"erm"`` -> ``"ERM"``); None when no name, or two names
    differing only by case, match.

    Example:

    >>> canonical_name("debug28", ["ColoredMNIST", "Debug28"])
    'Debug28'
    >>> canonical_name("Fisher", ["Fish", "Fishr"]) is None
    True
    """
    names = list(known)
    if name in names:
        return name
    matches = {n for n in names if n.lower() == name.lower()}
    return matches.pop() if len(matches) == 1 else None


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring on one line ("" without one)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def spec_of(obj: Any) -> str:
    """The ``module:qualname`` spec that names a class or function ``obj``.

    Raises:
        TypeError: ``obj`` has no importable name (e.g. defined inside a function).
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise TypeError(f"{obj!r} has no importable name (module:qualname); define it at module level")
    return f"{module}:{qualname}"
