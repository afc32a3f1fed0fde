"""The README's Python example runs as printed: every public name it uses works."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_a_python_example():
    assert len(python_blocks()) >= 1


def test_readme_python_example_runs(tmp_path, monkeypatch, mnist_batch):
    monkeypatch.chdir(tmp_path)  # it saves pruned.pt
    for code in python_blocks():
        namespace = {"loader": [mnist_batch(8, seed=i) for i in range(3)]}  # "your loop" needs batches
        exec(compile(code, str(README), "exec"), namespace)
        pruner, model = namespace["pruner"], namespace["model"]
        # What the example promises: masks in the saved state, pruned weights zero, same outputs after bake.
        saved = torch.load(tmp_path / "pruned.pt")
        pruned = saved["fc1.weight_mask"] == 0
        assert pruned.any() and (saved["fc1.weight"][pruned] == 0).all()
        assert namespace["plain"] is model and pruner.targets == []
