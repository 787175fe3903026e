"""The code's shape, checked: no import cycle (imports inside functions count), no private name
imported from another module, a short top of `model_backend`. The layer order itself is
import-linter's contract (pyproject.toml, `make lint`).

A cycle held together by an import inside a function still couples both modules both ways, so
they count here; imports under `if TYPE_CHECKING:` do not run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model_backend", "cdikt_qgis")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Import nodes that run (everywhere but under `if TYPE_CHECKING:`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _graph(package: str) -> tuple[dict[str, set[str]], list[str]]:
    """module -> modules of the package it imports; and every private name imported across modules."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module or "") if p)
                targets = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)  # `from pkg import module`
                    else:
                        targets.append(target)
                        if alias.name.startswith("_") and target in modules and target != mod:
                            private.append(f"{mod} imports {target}.{alias.name}")
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_not_even_inside_functions(package: str) -> None:
    graph, _ = _graph(package)
    assert len(graph) > 10  # the parser found the package
    assert _cycles(graph) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_imported_from_another_module(package: str) -> None:
    assert _graph(package)[1] == []


def test_the_top_of_the_engine_shows_the_layers() -> None:
    top = ROOT / "model_backend"
    modules = sorted(p.name for p in top.glob("*.py"))
    packages = sorted(p.name for p in top.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) <= 8, modules
    assert packages == ["bench", "core", "geo", "index", "learn", "locate", "nn"]


def test_the_checker_sees_a_cycle_held_by_a_function_level_import(tmp_path: Path) -> None:
    """The rule above can fail: two modules importing each other, one of them inside a function."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _cycles(graph) == [["a", "b"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
                     "def f():\n    import y\n")
    names = [a.name for node in _runtime_imports(tree) for a in node.names]
    assert sorted(names) == ["TYPE_CHECKING", "y"]
