"""The package's shape, read from its own imports (ast): no import circle between modules, no package importing
one above it on a row's path, no module over 400 lines. Lazy imports inside functions count: a lazy import
that breaks a circle is a circle still."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "runner"

# Each top-level part of runner, from the bottom up: a module may import its own part and any part below it.
LAYERS = [
    {"errors", "hardware"},
    {"storage"},
    {"spec"},
    {"engines"},  # an engine knows the spec's sampling and nothing of files or units
    {"inputs"},
    {"output"},
    {"schedule"},
    {"worker"},
    {"cluster"},
    {"estimate"},
    {"job", "tinymodel"},
    {"api"},
    {"cli", "__init__"},
]
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The runner modules that `name` imports anywhere in its body (module, function or TYPE_CHECKING level)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part(module) in parts)


def circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_package_is_read_whole():
    assert len(GRAPH) > 40 and "runner.spec.job" in GRAPH and "runner.inputs.units" in GRAPH["runner.inputs.plan"]


def test_every_part_has_a_layer():
    assert sorted({part(m) for m in GRAPH} - set().union(*LAYERS)) == []


def test_no_import_circles():
    assert circles() == []


def test_no_part_imports_one_above_it():
    upward = [f"{m} -> {d}" for m in sorted(GRAPH) for d in sorted(GRAPH[m]) if layer(d) > layer(m)]
    assert upward == []


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_is_over_the_limit(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_the_checks_can_fail(monkeypatch):
    """A circle and an upward import planted in the graph are found."""
    monkeypatch.setitem(GRAPH, "runner.spec.job", GRAPH["runner.spec.job"] | {"runner.job"})
    monkeypatch.setitem(GRAPH, "runner.job", GRAPH["runner.job"] | {"runner.spec.job"})
    assert any({"runner.job", "runner.spec.job"} <= set(c) for c in circles())
    assert layer("runner.job") > layer("runner.spec.job")
