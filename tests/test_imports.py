"""Imports flow one way (docs/design.md): no cycle among vsa's packages, nor among its modules.

Every import statement of every module counts, function-local and `TYPE_CHECKING` ones included
(a deferred import hides a cycle from Python, not from a reader). Read with `ast`, nothing is
imported, so the test takes well under a second.

    python tests/test_imports.py     # prints the package graph and any cycle
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vsa"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module of `known` that `name` (a module, or a name inside one) belongs to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def module_imports(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the vsa modules it imports anywhere in its file (`from p import m` with m a
    submodule counts as importing p.m)."""
    known = known or modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else base)
        owners = {_owner(t, known) for t in targets if t.split(".")[0] == PACKAGE}
        graph[name] = {o for o in owners if o is not None and o != name}
    return graph


def unit(module: str) -> str:
    """The package-level unit of a module: vsa.training.run -> vsa.training, vsa.layout -> itself."""
    return ".".join(module.split(".")[:2])


def package_imports(graph: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """The module graph collapsed onto vsa's subpackages and top-level modules."""
    graph = graph if graph is not None else module_imports()
    collapsed: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges = collapsed.setdefault(unit(source), set())
        edges.update(unit(t) for t in targets if unit(t) != unit(source))
    return collapsed


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _explain(cycle: list[str], graph: dict[str, set[str]]) -> str:
    """The module imports behind each edge of a package cycle."""
    lines = []
    for a, b in zip(cycle, cycle[1:]):
        why = sorted(f"{m} -> {t}" for m, ts in graph.items() if unit(m) == a for t in ts if unit(t) == b)
        lines.append(f"  {a} -> {b}: {', '.join(why)}")
    return "\n".join(lines)


def test_packages_import_one_way():
    graph = module_imports()
    cycle = find_cycle(package_imports(graph))
    assert cycle is None, (f"import cycle between packages: {' -> '.join(cycle)}\n{_explain(cycle, graph)}\n"
                           "move what both sides need into the lower one (docs/design.md)")


def test_modules_import_one_way():
    cycle = find_cycle(module_imports())
    assert cycle is None, f"import cycle between modules: {' -> '.join(cycle)}"


def test_the_walk_sees_function_local_and_relative_imports(tmp_path):
    (tmp_path / PACKAGE / "a").mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "a" / "__init__.py").write_text("from .b import f\n")
    (tmp_path / PACKAGE / "a" / "b.py").write_text("def f():\n    from vsa.c import g\n")
    (tmp_path / PACKAGE / "c.py").write_text("def g():\n    import vsa.a\n")
    graph = module_imports(modules(tmp_path))
    assert graph["vsa.a"] == {"vsa.a.b"} and graph["vsa.a.b"] == {"vsa.c"} and graph["vsa.c"] == {"vsa.a"}
    assert find_cycle(package_imports(graph)) == ["vsa.a", "vsa.c", "vsa.a"]
    assert find_cycle(graph) == ["vsa.a", "vsa.a.b", "vsa.c", "vsa.a"]


if __name__ == "__main__":
    graph = module_imports()
    packages = package_imports(graph)
    for name in sorted(packages):
        print(f"{name} -> {', '.join(sorted(packages[name])) or '-'}")
    for label, g in (("packages", packages), ("modules", graph)):
        cycle = find_cycle(g)
        print(f"{label}: " + ("no cycle" if cycle is None else "cycle " + " -> ".join(cycle)))
        if cycle and label == "packages":
            print(_explain(cycle, graph))
