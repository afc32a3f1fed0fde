"""Every docstring example in prunet runs, and prints what it says it prints.

One test per module, found by walking the package. Each runs in a fresh,
empty current folder, so examples that write files write there. An example
that cannot run in a test (it needs a finished run folder, real data, a GPU or
minutes of training) is marked ``# doctest: +SKIP`` in the docstring itself,
where a reader sees why.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import prunet


# prunet.__main__ runs the CLI when imported, and has no docstring examples.
MODULES = ["prunet"] + sorted(
    info.name for info in pkgutil.walk_packages(prunet.__path__, prefix="prunet.") if info.name != "prunet.__main__"
)

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    with torch.random.fork_rng(devices=[]):  # examples that seed torch leave the other tests' RNG alone
        for test in doctest.DocTestFinder().find(module, name):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see captured stdout)"
