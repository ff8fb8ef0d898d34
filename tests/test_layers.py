"""The package's layering (docs/concepts.md#how-the-code-is-layered-for-contributors), checked from the source.

Every module of `rank1tools` is parsed with `ast`, and every import in it counts, top-level or inside a
function (a lazy import still ties two modules together; it only hides a cycle until it bites). The
tests fail on any import cycle, listing all of them, and on any import that crosses a layer the wrong way.
No module is imported, so this is fast and torch-free.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "rank1tools"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/rank1tools (a package is its __init__)."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (before its imported names)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """The rank1tools modules `module` imports anywhere in its body.

    `from X import name` is an edge to X.name when that is a module (a submodule import), else to X.
    Parent packages implied by an import are not edges (their __init__ runs, but it only holds
    re-exports loaded on first use, and counting them would make every package a cycle with its children).
    """
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each with one cycle in it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path start -> ... -> start inside a strongly connected component, for the message."""
    members = set(component)
    start = component[0]
    parents = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
            if target not in parents:
                parents[target] = node
                queue.append(target)
    return component  # unreachable for a real component


def test_every_module_is_parsed():
    """The walk sees the layers it checks (a moved tree would otherwise pass vacuously)."""
    for layer in ("io", "math", "engine", "commands", "cli"):
        assert any(module.startswith(f"{PACKAGE}.{layer}.") for module in MODULES), layer
    assert any(GRAPH[module] for module in MODULES if module.startswith(f"{PACKAGE}.commands."))


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    lines = [f"{' -> '.join(_one_cycle(GRAPH, c))}   (component: {', '.join(c)})" for c in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# Which layers a layer must not import (docs/concepts.md#how-the-code-is-layered-for-contributors). `options` is the
# CLI-side option parsing; the pure value parsers io/ needs live in rank1tools.values.
FORBIDDEN = {
    "io": {"commands", "cli", "engine", "options"},
    "math": {"io", "commands", "cli", "engine", "options"},
    "engine": {"commands", "cli"},
    "commands": {"cli"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _layer(module) == layer
        for target in targets
        if _layer(target) in FORBIDDEN[layer]
    )
    assert not wrong, "\n".join(wrong)


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: a lazy (function-level) edge closing a loop is a cycle, and all are listed."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    tree_module = "rank1tools.io.outputs"
    node = ast.parse("from .output_lock import locked_output").body[0]
    assert _resolve(tree_module, node) == "rank1tools.io.output_lock"


def test_docs_cited_in_the_source_exist():
    """Docstrings cite docs/ pages (docs/PAGE.md#anchor), never an internal spec: every cited page
    and heading exists (test_docs.py's GitHub slugs)."""
    from test_docs import _anchors

    docs = ROOT.parents[1] / "docs"
    broken = []
    for module, path in MODULES.items():
        for page, anchor in re.findall(r"docs/([A-Za-z0-9_/.-]+\.md)(?:#([A-Za-z0-9_-]+))?", path.read_text("utf-8")):
            target = docs / page
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{module}: docs/{page}{'#' + anchor if anchor else ''}")
    assert not broken, "\n".join(broken)
