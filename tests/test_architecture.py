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


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, its docstring left out (a long Args section is no second concept)."""
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


PAGE = 60  # docs/ARCHITECTURE.md: a function reads on a page


def test_every_function_reads_on_a_page():
    long = [f"{name}:{fn.lineno} {fn.name} ({code_lines(fn)} lines)" for name, path in MODULES.items()
            for fn in ast.walk(ast.parse(path.read_text()))
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(fn) > PAGE]
    assert long == []


def definitions(name: str) -> list[str]:
    """Where the package, its benchmarks and its tests define ``name`` at module level (a function, a class, a value)."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").glob("*.py"),
                 *(PACKAGE.parent / "tests").glob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         if isinstance(t, ast.Name)]
            else:
                names = []
            found += [f"{path.name}:{node.lineno}" for n in names if n == name]
    return found


@pytest.mark.parametrize("name", ["CRITERIA", "set_dotted", "source_checkpoint", "build", "RunState", "fit",
                                  "find_layers", "atomic_path", "check_trusted", "validate_meta"])
def test_one_definition_of_each_concept(name):
    """A concept with two definitions is a bug waiting for them to disagree (STYLE: one vocabulary)."""
    assert len(definitions(name)) == 1, definitions(name)
