"""mkdocs build hook: fills the generated parts of the docs when the site is built, so nothing generated is
committed and nothing can fall behind the code. `<!-- job-yaml-reference -->` becomes the job.yaml key
tables (runner.spec.reference), `<!-- module-map -->` a table per package of each module's docstring."""

from __future__ import annotations

import ast
from pathlib import Path

from runner.spec.reference import reference_markdown

PACKAGE = Path(__file__).resolve().parents[1] / "runner"
# The packages in the order a row passes them (README's sketch); any other package follows by name.
ROW_ORDER = ("spec", "inputs", "schedule", "worker", "engines", "output", "storage", "cluster", "estimate")


def on_page_markdown(markdown: str, page, config, files) -> str:
    for mark, make in (("<!-- job-yaml-reference -->", lambda: reference_markdown(level=3)),
                       ("<!-- module-map -->", module_map)):
        if mark in markdown:
            markdown = markdown.replace(mark, make())
    return markdown


def module_map(root: Path = PACKAGE) -> str:
    """A heading per package of `root` (in ROW_ORDER, then the top-level modules) and a table of its modules,
    each with the first paragraph of its docstring, read from the source without importing it."""
    packages = sorted((p.parent for p in root.glob("*/__init__.py")),
                      key=lambda p: (ROW_ORDER.index(p.name) if p.name in ROW_ORDER else len(ROW_ORDER), p.name))
    out = []
    for package in packages:
        out += [f"### {package.name}/\n", _summary(package / "__init__.py") + "\n",
                _table(sorted(m for m in package.rglob("*.py") if m.name != "__init__.py"), root)]
    out += ["### On top\n", _table(sorted(m for m in root.glob("*.py") if m.name != "__init__.py"), root)]
    return "\n".join(out)


def _table(modules: list[Path], root: Path) -> str:
    rows = [f"| `{m.relative_to(root.parent).as_posix()}` | {_summary(m).replace('|', chr(92) + '|')} |"
            for m in modules]
    return "\n".join(["| module | what it holds |", "| --- | --- |", *rows, ""])


def _summary(module: Path) -> str:
    """The first paragraph of a module's docstring, as one line."""
    doc = ast.get_docstring(ast.parse(module.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())
