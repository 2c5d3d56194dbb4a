"""Griffe extension of the documentation site: docstrings written with reST habits, shown as Markdown.

domaingrad's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``), which
mkdocstrings parses, but their running text uses a few reStructuredText habits that
Markdown would show wrongly. Before mkdocstrings renders a docstring this extension
rewrites, outside code spans:

* Sphinx roles (``:func:`pcgrad```, ``:class:`~domaingrad.data.base.Split```) into
  optional cross-references: a link where the target is rendered on the site, plain
  code otherwise (never a warning, so moving a private module does not break the build);
* simple tables (``=====  =====`` borders) into Markdown tables;
* a paragraph ending in ``::`` (a literal block follows) into one ending in ``:``;
* ``<name>`` placeholders into text (Markdown would take them for HTML tags);
* ``*`` and ``**`` between operands (``x**2``, ``a*b``) into literal stars, not emphasis;
* an ``Args:`` entry naming several parameters (``use_m1, use_m2: ...``, the names possibly
  running over several lines) into one entry each;
* doctest lines (``>>> ...`` and their output) outside an ``Examples:`` section, e.g. after
  ``Example (two domains ...):``, into a code block (Markdown would read ``x[0][1]`` in
  them as a link).

It also gives an attribute documented Sphinx's way, by ``#:`` comment lines just above its
assignment (``#: name -> algorithm class``), that comment as its docstring, and resolves a
role target that names no object in scope by a unique suffix match over the package
(``:meth:`Algorithm.hparam_specs``` from a module that does not import ``Algorithm``).

Finally it completes ``__all__`` lists that Griffe cannot evaluate statically:
``__all__ = [..., *ALGORITHMS]`` with ``ALGORITHMS`` a dict (or list or tuple) literal with
string keys exports those keys, so every registered algorithm is documented. A package
without ``__all__`` that imports names from its own private modules (``from ._rules import
pcgrad``) exports those names, as its users see them.

It changes nothing in the source files: it only edits the docstrings Griffe loaded.
Loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from griffe import (
    AliasResolutionError,
    Attribute,
    CyclicAliasError,
    Docstring,
    ExprDict,
    ExprList,
    ExprName,
    ExprTuple,
    Extension,
    GriffeLoader,
    Module,
    NameResolutionError,
    Object,
)

#: ``:role:`target``` or ``:role:`~target``` (Sphinx's Python domain)
ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|data|attr|exc|obj|const|ref):`(~?)([^`<>]+)`")
#: a code span (single or double backticks) or a placeholder left by the role pass
CODE = re.compile(r"(``.+?``|`[^`]+`|\x00\d+\x00)")
#: a simple-table border: two or more runs of ``=`` separated by spaces
BORDER = re.compile(r"^(\s*)(=+)((?: +=+)+)\s*$")
#: a star between two operands: ``x**2``, ``(a)*(b)``
OPERATOR_STAR = re.compile(r"(?<=[\w)\]])(\*{1,2})(?=[\w(\[])")
#: the header of a Google-style parameters section
PARAMS_HEADER = re.compile(
    r"^(\s*)(?:Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|"
    r"Other Parameters):\s*$"
)
#: a parameters entry naming several parameters: ``a, b: text`` or ``a, b (type): text``
SHARED_ENTRY = re.compile(r"^(\s*)(\w+(?:\s*,\s*\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
#: an entry whose parameter names continue on the next line: ``a, b, c,``
NAMES_CONTINUE = re.compile(r"^\s*\w+(?:\s*,\s*\w+)*\s*,\s*$")
#: the last line of such names: ``d, e: text`` or ``e (type): text``
NAMES_END = re.compile(r"^\s*\w+(?:\s*,\s*\w+)*(\s*\([^)]*\))?:(\s|$)")
#: the header of a Google-style examples section (Griffe parses its doctests itself)
EXAMPLES_HEADER = re.compile(r"^(\s*)Examples?:\s*$")
#: attribute set on a converted docstring (converting twice would escape our own HTML)
MARK = "_domaingrad_markdown"
#: ``<placeholder>`` (not an HTML tag we write ourselves)
PLACEHOLDER = re.compile(r"<(?=[A-Za-z_{])")


def _resolve(obj: Object, target: str, paths: Sequence[str]) -> str:
    """The full path a role target names, as Sphinx would look it up from ``obj``; the target
    itself when nothing matches (the cross-reference then renders as plain code)."""
    collection = obj.modules_collection
    candidates: list[str] = []
    module = obj if isinstance(obj, Module) else obj.module
    if target.startswith("."):
        package = module.path if module.is_init_module else module.path.rsplit(".", 1)[0]
        candidates += [package + target, module.path + target]
    else:
        head, _, rest = target.partition(".")
        scope: Object | None = obj
        while scope is not None:
            try:
                resolved = scope.resolve(head)
            except NameResolutionError:
                scope = scope.parent
                continue
            candidates.append(resolved + ("." + rest if rest else ""))
            break
        candidates.append(target)
    for path in candidates:
        if _exists(collection, path):
            return path
    suffix = "." + target.lstrip(".")
    matches = [path for path in paths if path.endswith(suffix)]
    return matches[0] if len(matches) == 1 else target


def _exists(collection: Any, path: str) -> bool:
    """Whether ``path`` names an object Griffe loaded (through aliases it can resolve)."""
    try:
        collection[path]
    except (KeyError, AliasResolutionError, CyclicAliasError):
        return False
    return True


def _roles(obj: Object, text: str, stash: list[str], paths: Sequence[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
        stash.append(
            f'<autoref identifier="{html.escape(_resolve(obj, target, paths))}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )
        return f"\x00{len(stash) - 1}\x00"

    return ROLE.sub(replace, text)


def _prose(line: str) -> str:
    """Escape what Markdown would misread in the text (not code) parts of a line."""
    parts = CODE.split(line)
    for i in range(0, len(parts), 2):
        part = PLACEHOLDER.sub("&lt;", parts[i])
        parts[i] = OPERATOR_STAR.sub(lambda m: "\\*" * len(m.group(1)), part)
    return "".join(parts)


def _table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """A simple table starting with the border at ``lines[start]`` as Markdown rows, and the
    index after its closing border; None when it is not a complete table."""
    border = BORDER.match(lines[start])
    if border is None:
        return None
    indent = len(border.group(1))
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[start])]
    borders = [start]
    i = start + 1
    while i < len(lines) and lines[i].strip() and len(borders) < 3:
        if lines[i].strip() == lines[start].strip():
            borders.append(i)
        i += 1
    if len(borders) != 3:
        return None

    def cells(line: str) -> list[str]:
        out = []
        for j, (a, _) in enumerate(spans):
            b = spans[j + 1][0] if j + 1 < len(spans) else len(line)
            out.append(line[a:b].strip())
        return out

    header = [" ".join(c) for c in zip(*(cells(lines[k]) for k in range(borders[0] + 1, borders[1])))]
    rows: list[list[str]] = []
    for k in range(borders[1] + 1, borders[2]):
        row = cells(lines[k])
        if rows and not row[0]:  # continuation line: first column empty
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], row)]
        else:
            rows.append(row)
    pad = " " * indent
    out = [pad + "| " + " | ".join(header) + " |", pad + "|" + " --- |" * len(header)]
    out += [pad + "| " + " | ".join(r) + " |" for r in rows]
    return ["", *out, ""], borders[2] + 1


def _split_shared_entries(lines: list[str]) -> list[str]:
    """Repeat an ``Args:`` entry that names several parameters once per name (Griffe would
    take ``a, b`` for one unknown parameter)."""
    out: list[str] = []
    i, section_indent = 0, None
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        header = PARAMS_HEADER.match(line)
        if header is not None:
            section_indent = len(header.group(1))
        elif line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        if section_indent is not None and NAMES_CONTINUE.match(line):
            # names running over several lines: join them into the entry's first line
            j = i + 1
            while j < len(lines) and NAMES_CONTINUE.match(lines[j]):
                j += 1
            if j < len(lines) and NAMES_END.match(lines[j]):
                joined = " ".join([line.rstrip()] + [lines[k].strip() for k in range(i + 1, j + 1)])
                lines = lines[:i] + [joined] + lines[j + 1 :]
                line = joined
        entry = SHARED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        block_end = i + 1
        while block_end < len(lines) and (
            not lines[block_end].strip() or len(lines[block_end]) - len(lines[block_end].lstrip()) > indent
        ):
            block_end += 1
        while block_end > i + 1 and not lines[block_end - 1].strip():
            block_end -= 1
        pad, names, kind, text = entry.group(1), entry.group(2), entry.group(3) or "", entry.group(4) or ""
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{pad}{name}{kind}:{text}")
            out += lines[i + 1 : block_end]
        i = block_end
    return out


def convert(obj: Object, text: str, paths: Sequence[str] = ()) -> str:
    """The docstring ``text`` of ``obj`` with its reST habits rewritten as Markdown; ``paths``
    (every object path of the package) serves the suffix match of role targets."""
    stash: list[str] = []
    lines = _split_shared_entries(_roles(obj, text, stash, paths).split("\n"))
    out: list[str] = []
    i, fence, literal_indent = 0, False, None
    examples_indent: int | None = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("```"):
            fence = not fence
        if fence or stripped.startswith("```"):
            out.append(line)
            i += 1
            continue
        if literal_indent is not None:  # inside a literal block after "::"
            if not stripped or indent > literal_indent:
                out.append(line)
                i += 1
                continue
            literal_indent = None
        header = EXAMPLES_HEADER.match(line)
        if header is not None:
            examples_indent = len(header.group(1))
        elif stripped and examples_indent is not None and indent <= examples_indent:
            examples_indent = None
        if examples_indent is None and (stripped == ">>>" or stripped.startswith(">>> ")):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            pad = " " * indent
            out += [pad + "```pycon", *lines[i:j], pad + "```"]
            i = j
            continue
        table = _table(lines, i) if BORDER.match(line) else None
        if table is not None:
            rows, i = table
            out += [_prose(r) for r in rows]
            continue
        if stripped.endswith("::") and not stripped.startswith("::"):
            literal_indent = indent
            line = line[: line.rstrip().rfind("::")] + ":"
        out.append(_prose(line))
        i += 1
    result = "\n".join(out)
    return re.sub(r"\x00(\d+)\x00", lambda m: stash[int(m.group(1))], result)


def _expand_starred_exports(module: Module) -> None:
    """Replace ``*NAME`` in ``module.__all__`` by the string keys (or items) of the literal
    dict (or list, tuple) ``NAME`` is assigned in ``module``; other entries stay as they are."""
    if not module.exports:
        return
    exports: list[Any] = []
    for export in module.exports:
        member = module.members.get(export.name) if isinstance(export, ExprName) else None
        value = member.value if isinstance(member, Attribute) else None
        items = (
            value.keys
            if isinstance(value, ExprDict)
            else value.elements
            if isinstance(value, (ExprList, ExprTuple))
            else None
        )
        names = [
            item[1:-1]
            for item in items or ()
            if isinstance(item, str) and item[:1] in "'\"" and item[-1:] == item[:1] and item[1:-1].isidentifier()
        ]
        if names and len(names) == len(items or ()):
            exports += [name for name in names if name not in exports]
        else:
            exports.append(export)
    module.exports = exports


def _export_private_reexports(module: Module) -> None:
    """Give a package without ``__all__`` the public names it imports from its own private
    modules (``domaingrad/x/__init__.py``: ``from ._impl import f`` exports ``f``)."""
    if module.exports is not None or not module.is_init_module:
        return
    names = []
    for name, member in module.members.items():
        if not member.is_alias or name.startswith("_"):
            continue
        target = member.target_path  # type: ignore[union-attr]
        inside = target[len(module.path) + 1 :].split(".") if target.startswith(module.path + ".") else []
        if any(part.startswith("_") for part in inside[:-1]):
            names.append(name)
    if names:
        module.exports = names


def _comment_docstring(attr: Attribute, loader: GriffeLoader) -> Docstring | None:
    """The ``#:`` comment lines just above ``attr``'s assignment, as a docstring."""
    filepath = attr.filepath
    if attr.lineno is None or not isinstance(filepath, Path) or filepath not in attr.lines_collection:
        return None  # no source lines (a compiled or namespace module)
    lines = attr.lines_collection[filepath]
    comment: list[str] = []
    i = attr.lineno - 2
    while 0 <= i < len(lines) and lines[i].strip().startswith("#:"):
        comment.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    if not comment:
        return None
    return Docstring(
        "\n".join(comment),
        lineno=i + 2,
        endlineno=attr.lineno - 1,
        parent=attr,
        parser=loader.docstring_parser,
        parser_options=loader.docstring_options,
    )


class RstDocstrings(Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: Any) -> None:
        objects: dict[str, Object] = {}
        self._collect(pkg, objects)
        paths = list(objects)
        for obj in objects.values():
            if isinstance(obj, Module):
                _expand_starred_exports(obj)
                _export_private_reexports(obj)
            if obj.docstring is None and isinstance(obj, Attribute):
                obj.docstring = _comment_docstring(obj, loader)
            if obj.docstring is not None and not getattr(obj.docstring, MARK, False):
                obj.docstring.value = convert(obj, obj.docstring.value, paths)
                setattr(obj.docstring, MARK, True)  # converted once, even if a package is seen again

    def _collect(self, obj: Object, objects: dict[str, Object]) -> None:
        if obj.path in objects:
            return
        objects[obj.path] = obj
        for member in obj.members.values():
            if not member.is_alias:
                self._collect(member, objects)  # type: ignore[arg-type]
