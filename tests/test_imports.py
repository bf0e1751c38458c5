"""The package's import structure: layers, no upward import, no import cycle.

Every ``import`` in ``ssl_kit`` is read from the source (also the lazy ones inside functions,
which hide cycles from the interpreter but not from a reader). A module may import from its own
layer or a lower one; modules of one layer never import each other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "ssl_kit"

#: Bottom to top. A top-level module or sub-package of ssl_kit sits in exactly one layer.
LAYERS = [
    ["errors"],
    ["checkpoints"],  # the weights layer: format, safe reads, atomic writes, load_encoder
    ["run_dir", "run_lock", "loggers", "data", "masking", "losses", "optim"],
    ["views", "backbones"],
    ["heads"],
    ["methods"],
    ["evaluators", "pictures"],  # pictures: MAE / FCMAE reconstructions rebuild the method
    ["callbacks"],
    # jobs the CLI runs (found by name in ``cli.JOBS``, not imported)
    ["export", "export_folder", "show", "demo"],
    # The entry points. ``bench`` (the bench job and the benchmarks) parses its config with the
    # CLI's own parser class; ``cli`` names it only as a string, so the two form no cycle.
    # ``ssl_kit/__init__`` lazily offers load_encoder.
    ["cli", "bench", "__main__", "__init__"],
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``ssl_kit.methods.mae`` -> ``methods``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, int]]:
    """(imported ssl_kit module, line) for every import in ``module``; ``from pkg import sub``
    counts as importing ``pkg.sub`` when ``sub`` is a module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "ssl_kit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "ssl_kit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return [(m, line) for m, line in found if m != module]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert sorted({unit_of(m) for m in MODULES} - set(LAYER)) == []


def test_no_upward_import():
    upward = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target} ({unit_of(m)} is below {unit_of(target)})"
              for m, edges in GRAPH.items() for target, line in edges
              if LAYER[unit_of(target)] > LAYER[unit_of(m)]]
    assert upward == []


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target, _line in graph.get(node, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for start in graph:
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ re-exports its modules: an edge from one of them back to the
    # package itself is a cycle, like any other.
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize("graph,cycle", [
    ({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)]}, True),
    ({"a": [("b", 1)], "b": [("c", 1)], "c": []}, False),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert (find_cycle(graph) is not None) == cycle
