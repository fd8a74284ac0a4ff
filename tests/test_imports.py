"""The project's modules import each other without a circle, counting the imports made inside functions too (a
lazy import hides a circle from Python, not from the reader). A circle means two modules that are one concept, or
a lower layer reaching up: services/cli.py <-> loadtest/ was one."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from conftest import REPO

# The packages the project installs, as pyproject.toml names them: one added there is walked here too.
PACKAGES = [name.rstrip("*") for name in
            tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (`from a.b import c` counts a.b, and a.b.c where that is a
    module)."""
    paths = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in imported if m in paths and m != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph[module]):
            if circle := visit(imported, path + [module]):
                return circle
        done.add(module)
        return None

    for module in sorted(graph):
        if circle := visit(module, []):
            return circle
    return None


def test_find_circle_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert {"services.cli", "loadtest.pipeline", "engine.llm_engine", "schemas.messages"} <= set(graph)
    assert "loadtest.pipeline" in graph["services.cli"]                     # lazy imports are counted
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
