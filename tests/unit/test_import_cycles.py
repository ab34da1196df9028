"""No import cycles inside ``lmcache_core`` at module level, ``TYPE_CHECKING`` blocks included.

A cycle makes the import order matter (the module imported second sees a half-built first one)
and is a sign that two modules are one concern split in the wrong place. Imports inside functions
are allowed: they run after every module has loaded. The graph is read from the source with
``ast``, so nothing is imported and an optional dependency cannot hide an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmcache_core

PACKAGE = "lmcache_core"
ROOT = Path(lmcache_core.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports at module level, looking into ``if``/``try``/``with`` blocks (``if TYPE_CHECKING:``
    among them) but not into functions or classes' methods."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.ClassDef):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The modules of ``lmcache_core`` that ``node`` imports (``from a import b`` may name a module b)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join([*base, node.module] if node.module else base)
        else:
            origin = node.module or ""
        # ``from package import module`` needs the module; ``from module import name`` the module
        names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
    targets = set()
    for name in names:
        while name and name not in modules:  # ``import a.b.c`` of a non-module attribute: its module
            name = name.rpartition(".")[0]
        if name and name != module:
            targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in ROOT.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set()
        for node in _module_level_imports(tree):
            graph[module] |= _targets(module, path.name == "__init__.py", node, modules)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a readable path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_through(sorted(group), graph) for group in groups]


def _path_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle starting at the group's first module, e.g. [a, b, a]."""
    start = group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & set(group)):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    return group


def test_the_checker_finds_a_cycle_and_names_it() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_reads_the_import_graph() -> None:
    graph = import_graph()
    assert "lmcache_core.errors" in graph["lmcache_core.registry"]  # a plain module-level import
    assert "lmcache_core.hookspecs" in graph["lmcache_core.plugins"]  # ``from lmcache_core import hookspecs``
    assert "lmcache_core" not in graph["lmcache_core.plugins"]  # ... needs the module, not the package
    assert "lmcache_core.registry" in graph["lmcache_core.hookspecs"]  # inside ``if TYPE_CHECKING:``
    assert graph["lmcache_core.errors"] == set()  # errors imports nothing of ours


def test_no_import_cycles_in_lmcache_core() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module level or TYPE_CHECKING):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )
