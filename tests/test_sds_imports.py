"""No module of ``meshblock.sds`` imports another in a circle (docs/design.md, "The
SDS's engine"): the state, the request handler, the copy jobs and the metrics each
depend on what is below them only.

The imports are read from the source with :mod:`ast`, not by importing: an import
under ``if TYPE_CHECKING:`` or inside a function counts like any other, since a
circle through annotations is a circle in the design all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meshblock.sds

pytestmark = pytest.mark.unit

PACKAGE = "meshblock.sds"


def _modules() -> dict[str, Path]:
    root = Path(meshblock.sds.__file__).parent
    return {f"{PACKAGE}.{p.stem}": p for p in sorted(root.glob("*.py")) if p.stem != "__init__"}


def _imported(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module ``name`` imports, wherever it does."""
    out: set[str] = set()
    package = name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            if base in known:
                out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ``meshblock.sds`` it imports."""
    modules = _modules()
    known = set(modules)
    return {
        name: _imported(name, ast.parse(path.read_text(), str(path)), known)
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as the list of its modules (first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                found = visit(nxt)
                if found is not None:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found is not None:
                return found
    return None


def test_find_cycle_finds_a_circle_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": set(), "b": {"b"}}) == ["b", "b"]


def test_type_checking_and_relative_imports_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import maps\n"
        "if TYPE_CHECKING:\n"
        "    from meshblock.sds.store import ChunkStore\n"
        "def f() -> None:\n"
        "    import meshblock.sds.resync\n"
    )
    known = {f"{PACKAGE}.{m}" for m in ("maps", "store", "resync", "state")}
    got = _imported(f"{PACKAGE}.state", ast.parse(source), known)
    assert got == {f"{PACKAGE}.maps", f"{PACKAGE}.store", f"{PACKAGE}.resync"}


def test_no_module_of_the_sds_imports_another_in_a_circle() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.io_path" in graph and f"{PACKAGE}.store" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in meshblock.sds: " + " -> ".join(cycle or [])
