"""The house rule on imports (DESIGN.md): arrows point down, launch -> trainer -> data_pipeline / models, and no
module reaches itself through a chain of imports (lazy imports inside functions included: a circle hidden in a
function is still a circle). Read from the source with `ast`, nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from conftest import ROOT

PACKAGES = ("launch", "trainer", "data_pipeline", "models")
# (importer, imported) top-level packages that would point up or sideways
FORBIDDEN = {("trainer", "launch"), ("data_pipeline", "trainer"), ("data_pipeline", "launch"),
             ("data_pipeline", "models"), ("models", "trainer"), ("models", "launch"), ("models", "data_pipeline")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """Each of our modules -> our modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    paths = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down():
    graph = import_graph(ROOT)
    up = sorted((a, b) for a, targets in graph.items() for b in targets
                if (a.split(".")[0], b.split(".")[0]) in FORBIDDEN)
    assert not up, f"imports that point up (launch -> trainer -> data_pipeline / models): {up}"


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph(ROOT)) == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The two checks on a made-up tree: a circle hidden in a function and a trainer module that imports launch."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "data_pipeline" / "a.py").write_text("from .b import x\n")
    (tmp_path / "data_pipeline" / "b.py").write_text("def f():\n    from data_pipeline.a import y\n")
    (tmp_path / "trainer" / "t.py").write_text("def g():\n    from launch.app import composed\n")
    (tmp_path / "launch" / "app.py").write_text("")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["data_pipeline.a", "data_pipeline.b"]]
    assert "launch.app" in graph["trainer.t"]
