"""The package's shape: imports point down only, and the light modules stay light.

A cycle, or an import that runs back up (the report importing the pipeline, a
criterion importing training), makes every later feature harder to place; an
import hidden inside a function to dodge one is the same cycle, unseen. These
tests read the import statements of every module and check what importing the
light modules really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import prunet

PACKAGE = Path(prunet.__file__).parent
# Loaded by any training, data, checkpoint or recipe code: none of them belongs under the light modules.
HEAVY = ("prunet.train", "prunet.checkpoint", "prunet.data", "prunet.config", "prunet.pipeline",
         "prunet.runfolder", "prunet.regularize", "prunet.analysis.report", "prunet.analysis.sensitivity",
         "prunet.analysis.tradeoff")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    """The prunet modules an import statement loads (``from prunet import masks`` loads ``prunet.masks``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "prunet"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "prunet":
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return subs or [node.module]
    return []


def imports_of(name: str) -> tuple[set[str], list[str]]:
    """(every prunet module ``name`` imports, the ones imported inside a function or class)."""
    tree = ast.parse(MODULES[name].read_text())
    everything, nested = set(), []
    for node in ast.walk(tree):
        everything.update(m for m in imported(node) if m != name)
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested += [f"{name}: {m}" for node in ast.walk(scope) for m in imported(node)]
    return everything, nested


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_was_read():
    assert len(GRAPH) > 20
    assert "prunet.layers" in GRAPH["prunet.pruner"] and "prunet.masks" in GRAPH["prunet.layers"]


def test_imports_have_no_cycle():
    assert find_cycle(GRAPH) is None


def test_no_import_hides_inside_a_function():
    assert [n for name in MODULES for n in imports_of(name)[1]] == []


LIGHT = ["prunet.analysis.tables", "prunet.criteria", "prunet.layers", "prunet.analysis.energy"]


@pytest.mark.parametrize("name", LIGHT)
def test_light_modules_load_no_training_data_checkpoint_or_recipe_code(name):
    code = f"import sys, {name}; print(' '.join(m for m in sys.modules if m.startswith('prunet')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert name in loaded
    assert [m for m in loaded if m.startswith(HEAVY)] == []
