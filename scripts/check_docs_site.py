"""Check the built documentation site (``make docs`` runs it after ``mkdocs build --strict``).

``mkdocs build --strict`` already fails on broken Markdown links, unknown cross-references
and docstrings that name parameters their signature lacks. This script checks what it does
not see, on the HTML it wrote:

1. every page of the navigation exists;
2. every local link and image of every page (``href``/``src``, including the ones the API
   reference generates) points to an existing file and, with ``#fragment``, to an ``id`` in
   it, so the site works opened from disk (``file://``);
3. no docstring shows a raw reStructuredText role (``:func:`x```, ``:class:`` ...), i.e. the
   site's Griffe extension (``docs/_ext/rst_docstrings.py``) converted them all;
4. the API reference documents every public name of ``domaingrad`` (its ``__all__``) and
   every built-in algorithm (``domaingrad.algorithms.BUILTIN_ALGORITHMS``), and the
   Algorithms page of the user guide names every built-in algorithm; these need domaingrad
   importable (the ``.venv`` of the Makefile), and are skipped with a note otherwise.

Usage: ``python scripts/check_docs_site.py [SITE_DIR]`` (default ``site``). Exit status 0
when every check passes, 1 otherwise (each problem is printed on its own line).
"""

from __future__ import annotations

import re
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: pages the navigation promises (paths relative to the site directory)
PAGES = [
    "index.html",
    "getting-started.html",
    "training.html",
    "sweeps.html",
    "reports.html",
    "algorithms.html",
    "gradients.html",
    "data.html",
    "benchmarks.html",
    "results.html",
    "reference/index.html",
    "reference/domaingrad.html",
    "reference/algorithms.html",
    "reference/gradients.html",
    "reference/data.html",
    "reference/models.html",
    "reference/hparams.html",
    "reference/run.html",
    "reference/sweep.html",
    "reference/report.html",
]

#: a Sphinx role left in the rendered HTML, outside code: ``:func:<code>x</code>`` or ``:func:`x```
RAW_ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|data|attr|exc|obj|const):(?:`|<code)")
#: a code element and its content (where a role is only an example of one)
CODE_ELEMENT = re.compile(r"<code[^>]*>.*?</code>", re.DOTALL)


class _Page(HTMLParser):
    """The ids, local links and visible text of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []
        self.html = ""
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.add(str(values["name"]))
        for key in ("href", "src"):
            if values.get(key) and tag in ("a", "link", "img", "script"):
                self.links.append(str(values[key]))
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.html = path.read_text(encoding="utf-8")
    page.feed(page.html)
    return page


def inventory_names(site: Path) -> set[str]:
    """The object names of the site's ``objects.inv`` (Sphinx inventory version 2)."""
    data = (site / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four header lines, then the zlib stream
        header_end = data.index(b"\n", header_end) + 1
    body = zlib.decompress(data[header_end:]).decode("utf-8")
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


def check_site(site: Path) -> list[str]:
    """Every problem found in the built site ``site``, one line each (empty: all good)."""
    problems = [f"missing page: {page}" for page in PAGES if not (site / page).is_file()]
    site = site.resolve()
    # 404.html is for a web server (its links are absolute, from the server's root)
    pages = {path: _parse(path) for path in sorted(site.rglob("*.html")) if path.name != "404.html"}
    for path, page in pages.items():
        where = path.relative_to(site)
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:", "data:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{where}: link {link!r} points to a missing file")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                target_page = pages.get(target) or _parse(target)
                if fragment not in target_page.ids:
                    problems.append(f"{where}: link {link!r} points to a missing anchor")
        outside_code = CODE_ELEMENT.sub("<code></code>", page.html)
        for match in RAW_ROLE.finditer(outside_code):
            problems.append(
                f"{where}: raw reStructuredText role {match.group(0)!r}: "
                f"...{outside_code[max(0, match.start() - 60) : match.end() + 40]!r}..."
            )
    problems += _check_coverage(site)
    return problems


def _check_coverage(site: Path) -> list[str]:
    try:
        import domaingrad
        from domaingrad.algorithms import BUILTIN_ALGORITHMS
    except ImportError as exc:
        print(f"note: domaingrad is not importable ({exc}); API coverage not checked", file=sys.stderr)
        return []
    names = inventory_names(site)
    problems = [
        f"API reference: domaingrad.{name} (in domaingrad.__all__) is not documented"
        for name in domaingrad.__all__
        if not name.startswith("_") and f"domaingrad.{name}" not in names
    ]
    guide = "".join(_parse(site / "algorithms.html").text) if (site / "algorithms.html").is_file() else ""
    for name in sorted(BUILTIN_ALGORITHMS):
        if f"domaingrad.algorithms.{name}" not in names:
            problems.append(f"API reference: algorithm {name} (domaingrad.algorithms.{name}) is not documented")
        if not re.search(rf"\b{re.escape(name)}\b", guide):
            problems.append(f"algorithms.html: the user guide does not mention algorithm {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    site = Path(args[0] if args else "site")
    if not (site / "index.html").is_file():
        print(f"{site} holds no built site (no index.html); run `mkdocs build --strict` first", file=sys.stderr)
        return 1
    problems = check_site(site)
    for problem in problems:
        print(problem, file=sys.stderr)
    count = sum(1 for path in site.rglob("*.html") if path.name != "404.html")
    print(f"checked {count} pages in {site}: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
