"""The project's import graph: no cycles, and every arrow in the direction docs/internals.md states.

Built from the source (``ast``), not by importing: every ``import`` and ``from ... import``
counts, at module level or inside a function (a lazy import still runs, and a cycle through it
only waits for the right call order to break).  Imports under ``if TYPE_CHECKING:`` never run,
so they are left out of the cycle check; they must still point the right way.

The direction (docs/internals.md, "Import direction"):
  shifter's base (errors, record, cmdline, buildinfo) imports nothing of the subpackages;
  formats <- runtime <- launch; client and packing use formats only (launch may use client);
  gateway, setuproot, unsetuproot and spank_plugin use shifter, never the reverse; the node's
  side runs one way too (spank_plugin -> unsetuproot -> setuproot); none of them uses the
  cluster and benchmark tooling (localcluster, bench), which use everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shifter", "gateway", "spank_plugin", "setuproot", "unsetuproot", "localcluster", "bench")

# shifter's layers: which other layers each may import (its own always)
SHIFTER_BASE = {"shifter", "shifter.errors", "shifter.record", "shifter.cmdline", "shifter.buildinfo"}
ALLOWED = {
    "base": set(),
    "formats": {"base"},
    "runtime": {"base", "formats"},
    "client": {"base", "formats"},
    "packing": {"base", "formats"},
    "launch": {"base", "formats", "runtime", "client"},
}
# the project's packages outside shifter: which other packages each may import
PACKAGE_ALLOWED = {
    "gateway": {"shifter"},
    "setuproot": {"shifter"},
    "unsetuproot": {"shifter", "setuproot"},  # the same argument rules
    "spank_plugin": {"shifter", "setuproot", "unsetuproot"},  # node job ids, the step sshd
    "localcluster": {"shifter", "gateway", "spank_plugin", "setuproot", "unsetuproot"},
    "bench": {"shifter", "gateway", "spank_plugin", "setuproot", "unsetuproot", "localcluster"},
}


def module_files() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for inner in node.body:
                found.update(id(n) for n in ast.walk(inner))
    return found


def _targets(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The project modules one import statement loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:  # from package import module
            found.add(f"{base}.{alias.name}")
        elif base in modules:  # from module import name
            found.add(base)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges that run, type-only edges): module -> the project modules it imports."""
    modules = module_files()
    runs: dict[str, set[str]] = {name: set() for name in modules}
    typing_only: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        guarded = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(name, path, node, modules) - {name}
                (typing_only if id(node) in guarded else runs)[name].update(targets)
    return runs, typing_only


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path, first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (the graph is deep enough for recursion)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                return paths[node] + [start]
            if child not in paths:
                paths[child] = paths[node] + [child]
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def layer(module: str) -> str:
    """``shifter.formats.meta`` -> formats; shifter's base modules -> base; other packages by name."""
    parts = module.split(".")
    if parts[0] != "shifter":
        return parts[0]
    if module in SHIFTER_BASE:
        return "base"
    if module == "shifter.packtool":  # the ``python -m shifter.packtool`` command line, kept at its old path
        return "packing"
    return parts[1]


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the stated direction, as ``a -> b (why)``."""
    problems = []
    for module, targets in sorted(graph.items()):
        source = layer(module)
        for target in sorted(targets):
            dest = layer(target)
            if source == dest:
                continue
            if module.startswith("shifter") and target.startswith("shifter"):
                if dest not in ALLOWED[source]:
                    problems.append(f"{module} -> {target} (shifter.{source} may use only "
                                    f"{', '.join(sorted(ALLOWED[source])) or 'nothing else'})")
            elif module.startswith("shifter"):
                problems.append(f"{module} -> {target} ({dest} uses shifter, never the reverse)")
            elif target.split(".")[0] not in PACKAGE_ALLOWED[module.split(".")[0]]:
                problems.append(f"{module} -> {target} ({module.split('.')[0]} may use only "
                                f"{', '.join(sorted(PACKAGE_ALLOWED[module.split('.')[0]]))})")
    return problems


def test_every_module_parses_and_the_graph_is_not_empty():
    runs, _ = import_graph()
    assert len(runs) > 100, sorted(runs)  # the walk found the packages
    assert "shifter.formats.config" in runs["shifter.launch.launcher"]


def test_no_import_cycle():
    runs, _ = import_graph()
    cycles = find_cycles(runs)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


def test_every_import_points_the_stated_way():
    runs, typing_only = import_graph()
    both = {name: runs[name] | typing_only[name] for name in runs}
    problems = wrong_way(both)
    assert not problems, "imports against the direction of docs/internals.md:\n" + "\n".join(
        "  " + problem for problem in problems)


def test_the_checks_can_fail():
    """The cycle finder and the direction rule catch what they are for (on a made-up graph)."""
    graph = {"shifter.formats.a": {"shifter.runtime.b"}, "shifter.runtime.b": {"shifter.launch.c"},
             "shifter.launch.c": {"shifter.formats.a"}, "gateway.x": {"gateway.y"}, "gateway.y": set()}
    assert find_cycles(graph) == [["shifter.formats.a", "shifter.runtime.b", "shifter.launch.c",
                                   "shifter.formats.a"]]
    assert wrong_way(graph) == [
        "shifter.formats.a -> shifter.runtime.b (shifter.formats may use only base)",
        "shifter.runtime.b -> shifter.launch.c (shifter.runtime may use only base, formats)",
    ]
    assert wrong_way({"shifter.errors": {"gateway.x"}, "gateway.x": {"localcluster.y"}}) == [
        "gateway.x -> localcluster.y (gateway may use only shifter)",
        "shifter.errors -> gateway.x (gateway uses shifter, never the reverse)",
    ]
