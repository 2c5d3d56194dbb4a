"""``domaingrad list``: the registered datasets and algorithms, in brief or in full.

``domaingrad list`` prints one entry per dataset and algorithm: its one-line description
and the first paragraph of its docstring, wrapped, never cut (so every reference stays).
``domaingrad list NAME`` (an algorithm or a dataset, any case) and ``domaingrad list
--verbose`` (all of them) print the whole description and every hyperparameter: its
default, its random-search distribution and its meaning, from the hyperparameter
registry (:mod:`domaingrad.registry`, DomainBed's ``hparams_registry``: Gulrajani and
Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).

The distribution is read from the source of the hyperparameter's draw function (e.g.
``lambda r: float(10 ** r.uniform(-4.5, -2.5))`` is shown as ``10**U(-4.5, -2.5)``);
when that source cannot be read, it is summarised from 200 seeded draws.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from .errors import DomainGradError
from .hparams import HParam

#: the dataset whose hyperparameter values ``domaingrad list ALGORITHM`` shows by default
DEFAULT_LIST_DATASET = "ColoredMNIST"
WIDTH = 100
#: docstring sections for developers, left out of the printed description
_DEV_SECTION = re.compile(r"^(Attributes|Args|Arguments|Returns|Raises|Yields|Examples?)\b[^\n]*:\s*$")
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
#: numpy RandomState methods -> the notation of DomainBed's hparams_registry comments
_RANDOM_NAMES = {"uniform": "U", "choice": "choice", "randint": "randint", "normal": "N"}


def plain_text(doc: str) -> str:
    """A docstring as terminal text: developer sections (Attributes, Args, Raises, ...)
    dropped, Sphinx roles reduced to their target (``:func:`~a.b.f``` -> ``f``) and
    double backquotes removed."""
    kept: list[str] = []
    skipping = False
    for line in inspect.cleandoc(doc).splitlines():
        if _DEV_SECTION.match(line):
            skipping = True
            continue
        if skipping and line.strip() and not line[0].isspace():
            skipping = False
        if not skipping:
            kept.append(line)
    text = "\n".join(kept).strip()
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "")


def _wrap(text: str, indent: str) -> str:
    """Each paragraph of ``text`` wrapped to :data:`WIDTH`; lines that are indented or
    start a list item (tables, bullets) are kept as they are."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if any(line.startswith((" ", "*", "-", "=")) for line in lines):
            out.append("\n".join(indent + line for line in lines))
        else:
            out.append(_fill(" ".join(lines), indent, indent))
    return "\n\n".join(out)


def _fill(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


@lru_cache(maxsize=64)
def _lambdas(path: str) -> list[ast.Lambda]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    return [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]


def _lambda_node(fn: Callable[..., Any]) -> ast.Lambda | None:
    """The ``lambda`` expression that defined ``fn``, from its source file; None when the
    source is unavailable or two lambdas on its line cannot be told apart."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__name__", "") != "<lambda>":
        return None
    try:
        path = inspect.getsourcefile(fn)
        nodes = [n for n in _lambdas(path) if n.lineno == code.co_firstlineno] if path else []
    except (OSError, TypeError, SyntaxError):
        return None
    if len(nodes) > 1 and hasattr(code, "co_positions"):  # Python 3.11+: the body's position
        start = next(((line, col) for line, _, col, _ in code.co_positions() if line and col), None)
        nodes = [
            n
            for n in nodes
            if start is not None
            and (n.body.lineno, n.body.col_offset) <= start <= (n.body.end_lineno, n.body.end_col_offset)
        ]
    return nodes[0] if len(nodes) == 1 else None


class _Notation(ast.NodeTransformer):
    """``r.uniform(a, b)`` -> ``U(a, b)``, closure variables -> their values, and the
    outer ``float(...)``/``bool(...)`` conversions dropped."""

    def __init__(self, arg: str, values: dict[str, Any]):
        self.arg, self.values = arg, values

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == self.arg:
            node.func = ast.Name(_RANDOM_NAMES.get(func.attr, func.attr), ast.Load())
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self.values:
            try:
                return ast.parse(repr(self.values[node.id]), mode="eval").body
            except SyntaxError:
                return node
        return node


def describe_draw(spec: HParam) -> str:
    """The random-search distribution of ``spec`` in DomainBed's notation, e.g.
    ``10**U(-4.5, -2.5)``, ``choice([0.0, 0.1, 0.5])``, or ``fixed`` (the search keeps the
    default); from the draw's source, else summarised from 200 seeded draws."""
    node = _lambda_node(spec.draw)
    if node is not None and node.args.args:
        if isinstance(node.body, ast.Constant):
            return "fixed" if node.body.value == spec.default else f"always {node.body.value!r}"
        code = spec.draw.__code__
        closure = getattr(spec.draw, "__closure__", None) or ()
        values = {}
        for name, cell in zip(code.co_freevars, closure):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, (bool, int, float, str, tuple, list)):
                values[name] = value
        body = _Notation(node.args.args[0].arg, values).visit(ast.parse(ast.unparse(node.body), mode="eval").body)
        while (
            isinstance(body, ast.Call)
            and isinstance(body.func, ast.Name)
            and body.func.id in ("float", "bool")
            and len(body.args) == 1
        ):
            body = body.args[0]
        text = ast.unparse(body).replace(" ** ", "**")
        uses_random = any(isinstance(n, ast.Name) and n.id == node.args.args[0].arg for n in ast.walk(node.body))
        if not uses_random:  # e.g. lambda r: 1 / 3: a constant
            return _sampled(spec, 1)
        return "fixed: " + text if _sampled(spec, 20) == "fixed" else text  # e.g. choice([False, False])
    return _sampled(spec)


def _sampled(spec: HParam, n: int = 200) -> str:
    """The distribution of ``spec`` summarised from ``n`` draws of seeds 0..n-1."""
    import numpy as np

    try:
        draws = [spec.draw(np.random.RandomState(seed)) for seed in range(n)]
    except Exception as exc:  # noqa: BLE001 - a user's draw function: say it failed, list the rest
        return f"a draw that fails ({type(exc).__name__}: {exc})"
    distinct = sorted(set(map(repr, draws)))
    if len(distinct) == 1:
        return "fixed" if draws[0] == spec.default else f"always {distinct[0]}"
    if len(distinct) <= 8:
        return f"one of {', '.join(distinct)} (seen in {n} draws)"
    numbers = [d for d in draws if isinstance(d, (int, float))]
    if len(numbers) == len(draws):
        return f"between {min(numbers):.4g} and {max(numbers):.4g} ({n} draws)"
    return f"{len(distinct)} different values in {n} draws"


def _value(value: Any) -> str:
    """A default as ``--hparams`` JSON writes it (strings in double quotes)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def hparam_lines(specs: list[HParam]) -> list[str]:
    """Per hyperparameter: name, default and distribution on one line; its meaning; its
    choices when it names an option; its allowed range when the registry declares one."""
    lines = []
    for spec in specs:
        lines.append(f"  {spec.name:<24} default {_value(spec.default):<14} search {describe_draw(spec)}")
        if spec.help:
            lines.append(_fill(spec.help, " " * 6, " " * 6))
        if spec.choices is not None:
            lines.append(f"      choices: {', '.join(_value(c) for c in spec.choices)}")
        bounds = getattr(spec, "bounds", None)  # the allowed range, where the registry declares one
        if bounds is not None:
            lines.append(f"      allowed: {bounds}")
    return lines


def algorithm_details(name: str, dataset: str, common: bool = True) -> str:
    """Everything ``domaingrad list ALGORITHM`` prints: the whole description, then every
    hyperparameter on ``dataset`` (its own first, then, with ``common``, those common to
    all algorithms).

    Raises:
        DomainGradError: for an unknown algorithm or dataset.
    """
    from .algorithms import algorithm_class, resolve_algorithm_name
    from .data import dataset_class, resolve_dataset_name
    from .registry import hparam_specs

    name, dataset = resolve_algorithm_name(name), resolve_dataset_name(dataset)
    cls = algorithm_class(name)
    specs = hparam_specs(name, dataset)
    own = {s.name for s in cls.hparam_specs(dataset_class(dataset).SMALL_IMAGES)}
    size = "28x28 datasets" if dataset_class(dataset).SMALL_IMAGES else "image datasets"
    other = "PACS" if dataset_class(dataset).SMALL_IMAGES else DEFAULT_LIST_DATASET
    parts = [
        f"{name} (algorithm, {cls.__module__}.{cls.__qualname__})",
        _wrap(plain_text(cls.__doc__ or "(no description)"), "  "),
        "",
        _fill(
            f"hyperparameters on {dataset} (the values of {size}; --dataset {other} shows those of the others); "
            "set them with --hparams '{\"name\": value}'; 'search' is the random-search draw of --hparams-seed N > 0:",
            "",
            "",
        ),
    ]
    mine = [s for s in specs.values() if s.name in own]
    parts += [f" {name}'s own:", *hparam_lines(mine)] if mine else [f" {name} has none of its own."]
    if common:
        parts += [" common to every algorithm:", *hparam_lines([s for s in specs.values() if s.name not in own])]
    else:
        parts.append(" and those every algorithm has, listed once at the end")
    return "\n".join(parts)


def dataset_details(name: str, common: bool = True) -> str:
    """Everything ``domaingrad list DATASET`` prints: its description, environments,
    default steps and checkpoint frequency, and (with ``common``) the hyperparameters
    every algorithm has on it.

    Raises:
        DomainGradError: for an unknown dataset.
    """
    from .data import DATASETS, dataset_class, resolve_dataset_name
    from .hparams import common_hparams

    name = resolve_dataset_name(name)
    cls = dataset_class(name)
    line = DATASETS[name][1] if name in DATASETS else ""
    doc = plain_text(cls.__doc__ or "")
    parts = [f"{name} (dataset, {cls.__module__}.{cls.__qualname__})"]
    parts += [_wrap(text, "  ") for text in dict.fromkeys([line, doc]) if text]
    environments = list(getattr(cls, "ENVIRONMENTS", []))
    parts += [
        "",
        f"  environments ({len(environments)}, --test-envs indices): "
        + ", ".join(f"{i}={env}" for i, env in enumerate(environments)),
        f"  default --steps {cls.N_STEPS}, --checkpoint-freq {cls.CHECKPOINT_FREQ}; "
        + ("28x28 hyperparameter values" if cls.SMALL_IMAGES else "image-dataset hyperparameter values")
        + ("; training images augmented when data_augmentation is on" if getattr(cls, "AUGMENTS", False) else ""),
    ]
    if common:
        parts += [
            "",
            _fill(
                f"hyperparameters every algorithm has on {name} (an algorithm's own: domaingrad list ALGORITHM):",
                "",
                "",
            ),
            *hparam_lines(common_hparams(cls.SMALL_IMAGES, name)),
        ]
    return "\n".join(parts)


def summary() -> str:
    """The plain ``domaingrad list``: one entry per dataset and algorithm (entry points
    of installed plug-ins included, not imported), each description in full, wrapped."""
    from importlib import metadata

    from .algorithms import ALGORITHMS
    from .data import DATASETS
    from .plugins import ALGORITHM_GROUP, DATASET_GROUP, first_paragraph

    def entry(name: str, text: str) -> str:
        return _fill(f"{name:<22} {plain_text(text)}", "  ", " " * 25)

    def entry_points(group: str, known: dict) -> list[str]:
        found = sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)
        return [entry(ep.name, f"entry point {ep.value} (installed plug-in)") for ep in found if ep.name not in known]

    lines = ["datasets:"]
    lines += [entry(name, text) for name, (_, text) in DATASETS.items()]
    lines += entry_points(DATASET_GROUP, DATASETS)
    lines.append("algorithms:")
    lines += [entry(name, first_paragraph(cls.__doc__)) for name, cls in ALGORITHMS.items()]
    lines += entry_points(ALGORITHM_GROUP, ALGORITHMS)
    lines += [
        _fill(
            "details (the whole description, every hyperparameter with its default, search distribution and "
            "meaning): domaingrad list NAME, or domaingrad list --verbose for all",
            "",
            "  ",
        ),
        "your own: --dataset package.module:Class, --algorithm package.module:Class (see the README, Plug-ins)",
        "deviations from DomainBed (MLDG with two training domains, the model.pkl layout): domaingrad list --help",
    ]
    return "\n".join(lines)


def resolve_list_name(name: str) -> tuple[str, str]:
    """``("algorithm" | "dataset", canonical name)`` for a name given to ``domaingrad list``
    (case-insensitive when unambiguous; ``package.module:Class`` specs are imported).

    Raises:
        DomainGradError: a name that is neither, with the closest names suggested.
    """
    from . import plugins
    from .algorithms import Algorithm, list_algorithms, resolve_algorithm_name
    from .data import USER_FOLDER_PREFIX, MultipleDomainDataset, list_datasets, resolve_dataset_name

    if name.startswith(USER_FOLDER_PREFIX):
        return "dataset", name
    if plugins.is_spec(name):
        obj = plugins.load_spec(name, "domaingrad list")
        if isinstance(obj, type) and issubclass(obj, Algorithm):
            return "algorithm", name
        if isinstance(obj, type) and issubclass(obj, MultipleDomainDataset):
            return "dataset", name
        raise DomainGradError(f"domaingrad list {name}: {obj!r} is neither an algorithm nor a dataset class")
    algorithms, datasets = list_algorithms(), list_datasets()
    if plugins.canonical_name(name, algorithms) is not None:
        return "algorithm", resolve_algorithm_name(name)
    if plugins.canonical_name(name, datasets) is not None:
        return "dataset", resolve_dataset_name(name)
    raise DomainGradError(
        f"unknown algorithm or dataset {name!r}; algorithms: {', '.join(algorithms)}; datasets: "
        f"{', '.join(datasets)}{plugins.did_you_mean(name, algorithms + datasets)}"
    )


def run_list(names: list[str], verbose: bool, dataset: str | None) -> str:
    """The text of ``domaingrad list [NAME ...] [--verbose] [--dataset D]``.

    Raises:
        DomainGradError: an unknown name (with suggestions) or dataset.
    """
    from .algorithms import list_algorithms
    from .data import list_datasets

    if not names and not verbose:
        if dataset is not None:
            raise DomainGradError("--dataset selects the hyperparameter values of domaingrad list NAME or --verbose")
        return summary()
    shown = dataset if dataset is not None else DEFAULT_LIST_DATASET
    if names:
        chosen = [resolve_list_name(n) for n in names]
        blocks = [algorithm_details(n, shown) if kind == "algorithm" else dataset_details(n) for kind, n in chosen]
    else:  # --verbose: everything, the hyperparameters every algorithm has once, at the end
        from .data import dataset_class, resolve_dataset_name
        from .hparams import common_hparams

        blocks = [dataset_details(n, common=False) for n in list_datasets()]
        blocks += [algorithm_details(n, shown, common=False) for n in list_algorithms()]
        shown = resolve_dataset_name(shown)
        blocks.append(
            "\n".join(
                [
                    _fill(f"hyperparameters every algorithm has, on {shown} (--dataset D shows them on D):", "", ""),
                    *hparam_lines(common_hparams(dataset_class(shown).SMALL_IMAGES, shown)),
                ]
            )
        )
    return ("\n\n" + "-" * WIDTH + "\n\n").join(blocks)
