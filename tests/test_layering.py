"""The house rules of src/domaingrad, read from the source with ``ast``: no import circle,
no lower layer importing a higher one, no file over 500 lines, and the on-disk names and
split protocols spelled in one module (domaingrad.layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "domaingrad"
MAX_LINES = 500

#: lowest first; a module belongs to the layer of its longest listed prefix, and may import
#: only modules of its own layer or of lower ones
LAYERS: list[set[str]] = [
    {
        "domaingrad.errors",
        "domaingrad.rng",
        "domaingrad.version",
        "domaingrad.hparams",
        "domaingrad.layout",
        "domaingrad.plugins",
        "domaingrad.precision",
    },
    {"domaingrad.data"},
    {"domaingrad.models"},
    {"domaingrad.gradients"},
    {"domaingrad.algorithms"},
    {"domaingrad.registry"},
    {"domaingrad.run", "domaingrad.reproduce"},
    {"domaingrad.sweep"},
    {"domaingrad.report"},
    {"domaingrad.analysis"},
    {"domaingrad", "domaingrad.training", "domaingrad.cli", "domaingrad.__main__"},
]

#: file names of runs and sweeps, spelled only in domaingrad/layout.py
LAYOUT_LITERALS = (
    "results.jsonl",
    "model.pkl",
    "sweep.json",
    ".sweep.json.lock",
    "checkpoint.pt",
    "out.txt",
    "err.txt",
    "70/10/20",
)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in the file (lazy
    imports too; not those under ``if TYPE_CHECKING:``, which never run), with the
    packages whose ``__init__`` such an import runs (but not the module's own enclosing
    packages)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                targets.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            prefix = ".".join(parts[:i])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer; add it to LAYERS"
    return layer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the checker finds one
    assert cycles(import_graph()) == []


def test_no_lower_layer_imports_a_higher_one():
    assert layer_of("domaingrad.run.train") > layer_of("domaingrad.algorithms.erm") > layer_of("domaingrad.hparams")
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert upward == []


def test_no_source_file_over_500_lines():
    long = {
        str(path.relative_to(SRC)): n
        for path in (SRC / PACKAGE).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize("literal", LAYOUT_LITERALS)
def test_file_names_and_split_protocols_are_spelled_once(literal):
    """The string constant (not prose in docstrings) appears in domaingrad/layout.py only, once."""
    where = []
    for name, path in source_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value == literal:
                where.append(f"{name}:{node.lineno}")
    assert len(where) == 1 and where[0].startswith("domaingrad.layout:"), where
