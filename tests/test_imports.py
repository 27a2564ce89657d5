"""Imports run one way: `stylegan` imports neither `anodata` nor `anomaly`, `anodata` does not
import `anomaly`, the rooms of `anomaly` import each other in one order, and the modules of each
package import each other without a cycle.

Every import statement counts, also one inside a function: it runs the other module all the
same, only later. The graph is read from the source with `ast` (nothing is imported); a package's
`__init__.py` is the node named after the package. Imports by a string (`importlib`) are not
seen.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stylegan", "anodata", "anomaly")


def module_name(path: Path) -> str:
    """anomaly/app/model.py -> 'anomaly.app.model'; anomaly/app/__init__.py -> 'anomaly.app'."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of `path` names: 'a.b' for `import a.b` and
    `from a import b` (b may be a module), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (itself left out)."""
    paths = {module_name(p): p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}
    return {name: {n for n in imported_names(path) if n in paths and n != name}
            for name, path in paths.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the first module of `component` back to itself, inside it."""
    start = min(component)
    paths = {nxt: [start, nxt] for nxt in sorted(graph[start]) if nxt in component}
    queue = list(paths)
    while start not in paths:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt in component and nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return paths[start]


# The packages each package may import: anomaly builds on anodata and stylegan, anodata on
# stylegan, and stylegan stands alone.
ALLOWED = {"stylegan": {"stylegan"}, "anodata": {"anodata", "stylegan"}}


@pytest.mark.parametrize("package", ALLOWED)
def test_imports_run_one_way(package):
    wrong = sorted(f"{module} imports {other}" for module, others in import_graph().items()
                   if module.split(".")[0] == package for other in others
                   if other.split(".")[0] not in ALLOWED[package])
    assert not wrong, f"{package} must not import these: " + "; ".join(wrong)


# The rooms of anomaly/ (its subpackages) and the rooms each may import besides itself: evaluation
# stands alone, methods build on evaluation, the model on methods, scoring on the model; the app
# serves from the model, methods and evaluation. The top (cli.py, adapt.py) may import any room.
ROOM_IMPORTS = {"evaluation": set(), "methods": {"evaluation"},
                "model": {"methods", "evaluation"}, "scoring": {"model", "methods", "evaluation"},
                "app": {"model", "methods", "evaluation"}}


def anomaly_room(module: str) -> str | None:
    """'anomaly.model.fit' and 'anomaly.model' -> 'model'; None on top ('anomaly', 'anomaly.cli')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (REPO / "anomaly" / parts[1]).is_dir() else None


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for each import from a room of anomaly/ into a room (or the top) it may not
    import."""
    wrong = []
    for module, others in sorted(graph.items()):
        room = anomaly_room(module)
        if room is None:
            continue
        wrong += [f"{module} imports {other}" for other in sorted(others)
                  if anomaly_room(other) != room and anomaly_room(other) not in ROOM_IMPORTS[room]]
    return wrong


def test_every_room_of_anomaly_has_its_imports_written():
    rooms = {anomaly_room(module) for module in import_graph(("anomaly",))} - {None}
    assert rooms == set(ROOM_IMPORTS)


def test_the_rooms_of_anomaly_import_one_way():
    wrong = room_violations(import_graph(("anomaly",)))
    assert not wrong, "imports against the rooms' order: " + "; ".join(wrong)


def test_room_violations_on_a_known_graph():
    graph = {"anomaly.model.x": {"anomaly.scoring.y", "anomaly.methods.z", "anomaly.model"},
             "anomaly.methods.z": {"anomaly.cli", "anomaly.evaluation"},
             "anomaly.cli": {"anomaly.model.x"}, "anomaly.scoring.y": {"anomaly.model.x"}}
    assert room_violations(graph) == ["anomaly.methods.z imports anomaly.cli",
                                      "anomaly.model.x imports anomaly.scoring.y"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycles = find_cycles(import_graph((package,)))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from . import leaf\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text(
        "def f():\n    from ..top import g\n    import pkg.sub\n")
    (tmp_path / "pkg" / "top.py").write_text("from pkg.sub.leaf import f\n")
    graph = import_graph(("pkg",))
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.leaf"}, "pkg.top": {"pkg.sub.leaf"},
                     "pkg.sub.leaf": {"pkg.top", "pkg.sub"}}
    # one strongly connected component (pkg.sub, its leaf, pkg.top): one cycle named
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.sub"]]
