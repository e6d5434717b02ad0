"""The import graph of src/loopnn: no cycles (imports inside functions count), no private names across modules.

Read from the source with ast, so nothing is imported and a lazy import that only closes a cycle at run time
is caught as well. `from loopnn import x` depends on the submodule loopnn.x when there is one, otherwise on
the package itself; importing a submodule also runs its parent package, which is not counted as an edge.
"""

import ast
from pathlib import Path

import loopnn

SRC = Path(loopnn.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> list[tuple[str, str, int]]:
    """(imported loopnn module, name taken from it or "", line) for every import in the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.append((sub, "", node.lineno))
                elif base in modules:
                    found.append((base, alias.name, node.lineno))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports}, private names imported from another module, as 'where: what')."""
    files = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
    graph, private = {}, []
    for name, path in files.items():
        graph[name] = set()
        for target, taken, line in imports(path, set(files)):
            if target != name:
                graph[name].add(target)
            if taken.startswith("_") and not taken.startswith("__"):
                private.append(f"{path.relative_to(SRC.parent)}:{line}: {target}.{taken}")
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert {"loopnn.train", "loopnn.data", "loopnn.data.sharded", "loopnn.hf.tasks"} <= graph.keys()
    assert "loopnn.data.sharded" in graph["loopnn.cli"]  # imported inside cmd_prepare: lazy imports count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_are_imported_across_modules():
    assert import_graph()[1] == []


def test_the_checks_see_cycles_through_lazy_imports(tmp_path, monkeypatch):
    """The checker itself: a cycle closed only by an import inside a function is found, and so is a private name."""
    pkg = tmp_path / "loopnn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loopnn.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from loopnn import a\n    from loopnn.c import _h\n    return a, _h\n")
    (pkg / "c.py").write_text("def _h():\n    pass\n")
    monkeypatch.setitem(globals(), "SRC", pkg)
    graph, private = import_graph()
    assert find_cycle(graph) == ["loopnn.a", "loopnn.b", "loopnn.a"]
    assert private == ["loopnn/b.py:3: loopnn.c._h"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
