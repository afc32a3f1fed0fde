"""The README's Python example runs as printed: every public name it uses works."""

from __future__ import annotations

import json
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


def own_model_blocks() -> list[str]:
    """The Python blocks of the section "Your own model: three routes"."""
    section = README.read_text().split("## Your own model: three routes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


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
        if code in own_model_blocks():
            break  # test_readme_own_model_routes runs those
        exec(compile(code, str(README), "exec"), namespace)
    # The schedule block: the recipe's gradual phase reached its target in the loop.
    schedule, pruner = namespace["schedule"], namespace["pruner"]
    assert schedule.steps == schedule.total_steps
    assert pruner.compression() == pytest.approx(25, rel=0.01)


@pytest.mark.slow
def test_readme_own_model_routes(tmp_path, monkeypatch):
    """'Your own model': the own-loop example reaches its target and exports; the Trainer example prunes GPT-2."""
    own_loop, trainer = own_model_blocks()
    monkeypatch.chdir(tmp_path)  # the examples write their files where they run
    namespace: dict = {}
    exec(compile(own_loop, str(README), "exec"), namespace)
    pruner, back = namespace["pruner"], namespace["back"]
    assert pruner.compression() == pytest.approx(10, rel=0.01)
    assert namespace["scheduler"].get_last_lr()[0] < 1e-3 / 2  # the learning rate stayed the user's cosine
    for name, mask in pruner.masks.items():  # the loaded compact file: same survivors
        assert torch.equal(back.get_parameter(name).detach() != 0, mask.bool()), name
    pytest.importorskip("transformers")
    exec(compile(trainer, str(README), "exec"), namespace)
    callback, gpt, gpt_back = namespace["callback"], namespace["gpt"], namespace["gpt_back"]
    assert callback.pruner.compression() == pytest.approx(4, rel=0.01)
    assert "transformer.h.0.attn.c_attn.weight" in callback.pruner.masks
    ids = torch.randint(0, 64, (2, 8))
    gpt.eval()
    with torch.no_grad():
        assert torch.equal(gpt_back(input_ids=ids).logits, gpt(input_ids=ids).logits)


def test_the_readme_recipe_route_is_the_shipped_example_recipe():
    """The README's recipe is examples/char_lm.yaml, field for field (a slow test runs that recipe)."""
    yaml = pytest.importorskip("yaml")
    section = README.read_text().split("## Your own model: three routes", 1)[1].split("\n## ", 1)[0]
    shown = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, re.S)[0])
    assert shown == yaml.safe_load((README.parent / "examples" / "char_lm.yaml").read_text())


@pytest.mark.slow
def test_the_readme_recipe_route_runs_at_a_small_size(tmp_path, monkeypatch, capsys):
    """examples/char_lm.yaml through prunet run, shrunk: a language model judged in bits/char, reported."""
    monkeypatch.chdir(README.parent)  # its factory paths are relative to the repository
    small = ["data.kwargs.max_chars=12000", "model.kwargs.d_model=32", "model.kwargs.heads=2", "train.epochs=1",
             "train.warmup_steps=3", "prune.gradual.epochs=2", "prune.gradual.prune_epochs=1",
             "prune.gradual.every_steps=2", "data.eval_batch_size=64", "threads=1"]
    args = ["run", "examples/char_lm.yaml", "--run-dir", str(tmp_path / "lm")]
    assert main(args + [a for s in small for a in ("--set", s)]) == 0
    summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
    key = summary["metric"]["key"]
    assert summary["metric"]["name"] == "bits/char" and summary["final"][f"test_{key}"] > 0
    assert "bits/char" in (tmp_path / "lm" / "report.md").read_text()
    assert "pruner: prunes " in capsys.readouterr().out
