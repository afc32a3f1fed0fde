"""The README's Python example runs as printed: every public name it uses works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunet
from prunet.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_a_python_example():
    assert len(python_blocks()) >= 1


def test_readme_python_examples_run(tmp_path, monkeypatch, mnist_batch):
    # The blocks run in order in one namespace, as a reader would type them.
    first, *rest = python_blocks()
    monkeypatch.chdir(tmp_path)  # the first saves pruned.safetensors
    namespace = {"loader": [mnist_batch(8, seed=i) for i in range(3)]}  # "your loop" needs batches
    exec(compile(first, str(README), "exec"), namespace)
    pruner, model = namespace["pruner"], namespace["model"]
    # What the example promises: masks in the saved file, pruned weights zero, same outputs after bake,
    # and the file is one the command line reads (prunet export).
    saved = load_file(tmp_path / "pruned.safetensors")
    pruned = ~saved["fc1.weight_prunet_mask"]
    assert pruned.any() and (saved["fc1.weight"][pruned] == 0).all()
    assert namespace["plain"] is model and pruner.targets == []
    assert main(["export", str(tmp_path / "pruned.safetensors"), "-o", str(tmp_path / "pruned.prunet")]) == 0
    x = mnist_batch(4)[0]
    with torch.no_grad():
        assert torch.allclose(prunet.load(tmp_path / "pruned.prunet")(x), model(x), atol=1e-6)

    monkeypatch.chdir(README.parent)  # the others name files of the repository
    for code in rest:
        exec(compile(code, str(README), "exec"), namespace)
    # The schedule block: the recipe's gradual phase reached its target in the loop.
    schedule, pruner = namespace["schedule"], namespace["pruner"]
    assert schedule.steps == schedule.total_steps
    assert pruner.compression() == pytest.approx(25, rel=0.01)
