"""The spank_plugin modules import each other one way only (no cycle, static and lazy imports alike)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spank_plugin"


def _imports(path: Path) -> set[str]:
    """Every spank_plugin module that ``path`` imports, at any depth (the hooks import lazily)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name.split(".")[1] for name in names
                     if name.startswith("spank_plugin.") and (PACKAGE / f"{name.split('.')[1]}.py").exists())
    return found - {path.stem}


def test_spank_plugin_has_no_import_cycle() -> None:
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py")}
    assert graph["stephooks"] and "hooks" not in graph["stephooks"]
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, "import cycle: " + " -> ".join(trail + (module,))
        if module in done:
            return
        for target in graph[module]:
            visit(target, trail + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
