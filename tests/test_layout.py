"""The package's import graph: no cycles anywhere, and the KV core imports nothing from the groups above it.

Walks every module's imports with ``ast`` (imports under ``if TYPE_CHECKING:`` do not run and are skipped;
imports inside functions do run and count), so a cycle that Python happens to survive today still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "asrkf_edge"
PKG = "asrkf_edge"
CORE = {"llama", "cells", "blob", "kvcopy", "gather", "pages", "store", "session", "capture", "importance", "recall"}
NATIVE = f"{PKG}._native"
CORE_MAY_USE = CORE | {"errors", "native", "version"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of this package that ``name`` imports when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith(PKG))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if not target.startswith(PKG):
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    if sub == NATIVE:
                        continue  # compiled (setup.py's optional extension): imports nothing of ours
                    found.add(sub if sub in modules else target)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_the_package() -> None:
    g = _graph()
    assert {f"{PKG}.session", f"{PKG}.policies.asrkf", f"{PKG}.cli.run", f"{PKG}.bench.suites"} <= set(g)
    assert f"{PKG}.session" in g[f"{PKG}.runner"] and f"{PKG}.policies" in g[f"{PKG}.runner"]


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(CORE))
def test_kv_core_imports_only_the_core(module: str) -> None:
    name = f"{PKG}.{module}"
    allowed = {f"{PKG}.{m}" for m in CORE_MAY_USE}
    assert _graph()[name] <= allowed, f"{name} imports {sorted(_graph()[name] - allowed)}"
