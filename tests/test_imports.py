"""The module graph of app/ and workers/, read from the source with ``ast``.

Every import counts, wherever it is written (module level, inside a function, under
``if TYPE_CHECKING``): an import that only runs later still ties the two modules
together, and a cycle hidden in a function body is a cycle all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Container
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imported_modules(module: str, path: Path, known: Container[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports. ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg``. Parent packages that Python imports
    on the way are not edges: every submodule would otherwise form a cycle with its package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if path.name != "__init__.py":
                    package.pop()
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in out if m in known and m != module}


def graph() -> dict[str, set[str]]:
    """module -> the modules of app/ and workers/ that it imports."""
    files = module_files()
    return {module: imported_modules(module, path, files) for module, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and modules that import themselves
    (Tarjan's algorithm, iterative so deep graphs cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(sorted(component))
    return found


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "app.eval.runner" in edges and "app.scen" in edges
    # The CLI imports its commands' modules inside the command functions.
    assert any(under(m, "app.eval") for m in edges["app.cli"])


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_evaluation_harness():
    found = [c for c in cycles(graph()) if any(under(m, "app.eval") for m in c)]
    assert not found, f"import cycles: {found}"


def test_engine_imports_nothing_else_of_the_project():
    edges = graph()
    bad = {m: sorted(t for t in ts if not under(t, "app.scen"))
           for m, ts in edges.items() if under(m, "app.scen")}
    assert not {m: ts for m, ts in bad.items() if ts}


def test_database_layer_does_not_import_the_engine():
    edges = graph()
    bad = {m: sorted(t for t in ts if under(t, "app.scen")) for m, ts in edges.items() if under(m, "app.db")}
    assert not {m: ts for m, ts in bad.items() if ts}


def test_api_uses_at_most_one_workers_entry_point():
    edges = graph()
    used = {t for m, ts in edges.items() if under(m, "app.api") for t in ts if under(t, "workers")}
    assert len(used) <= 1, f"app/api imports several workers modules: {sorted(used)}"
