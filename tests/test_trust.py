"""A file never runs code: a factory that a checkpoint, a compact file, a run folder's recipe or a
resume point names is called only when the user trusts it.

The malicious files here are what anyone can make: a real file of prunet's with its metadata
rewritten to name ``subprocess:run`` and a shell command, its checksum recomputed. Each command
that reads such a file must exit 2 with one line naming ``--trust-factory``, and the command's
marker file must never appear.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prunet
from prunet.checkpoint import load_checkpoint
from prunet.cli import main
from prunet.config import recipe_from_dict
from prunet.factory import UntrustedFactoryError
from prunet.phases import RESUME_FORMAT
from prunet.pipeline import run
from prunet.runfolder import PROGRESS, PROGRESS_FORMAT, Run
from prunet.sparse import compact

from conftest import REAL_FASHION, TINY_RECIPE, use_data_cache

needs_fashion = pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
pytestmark = needs_fashion


def evil(marker: Path) -> dict:
    """Metadata that would run a shell command if its model were built."""
    return {"model": "subprocess:run", "model_kwargs": {"args": f"touch {marker}", "shell": True}}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("prunet: error: ")
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real run folder of a registry model (1000 training images, one round)."""
    recipe = dict(TINY_RECIPE, prune={**TINY_RECIPE["prune"], "rounds": TINY_RECIPE["prune"]["rounds"][:1]})
    run_dir = tmp_path_factory.mktemp("trust") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        use_data_cache(mp)
        run(recipe_from_dict(recipe), run_dir=run_dir, log=lambda _: None)
    return run_dir


def rewrite_checkpoint(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` with its metadata naming the shell command (checkpoints carry no checksum to recompute)."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["prunet"])
    save_file(load_file(str(src)), str(dst), metadata={"prunet": json.dumps({**meta, **evil(marker)})})
    return dst


def rewrite_compact(src: Path, dst: Path, marker: Path) -> Path:
    """``src`` with its header's model naming the shell command, and a checksum that matches again."""
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        header = json.loads(f.metadata()["prunet_compact"])
    header["meta"].update(evil(marker))
    header.pop("checksum")
    header["checksum"] = compact._checksum(tensors, header)
    save_file(tensors, str(dst), metadata={"prunet_compact": json.dumps(header)})
    return dst


@pytest.fixture
def evil_run(tiny_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose checkpoints and config.yaml name the shell command, and the marker it would make."""
    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    for name in ("dense.safetensors", "round1.safetensors", "final.safetensors"):
        rewrite_checkpoint(run_dir / name, run_dir / name, marker)
    rewrite_compact(run_dir / "final.prunet", run_dir / "final.prunet", marker)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"] = {"factory": "subprocess:run", "kwargs": evil(marker)["model_kwargs"]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir, marker


def test_the_rewritten_files_are_valid_apart_from_the_factory(evil_run):
    """The attack is real: checksums match, and trusting the file would run the command."""
    run_dir, marker = evil_run
    compact.read_compact(run_dir / "final.prunet")  # the checksum holds
    with pytest.raises(ValueError, match="CompletedProcess"):  # it ran, then was found not to be a model
        prunet.load(run_dir / "final.prunet", trust_factory=True)
    assert marker.exists()


@pytest.mark.parametrize("command", [
    ["eval", "{run}/final.prunet"],
    ["eval", "{run}/final.prunet", "--sparse"],
    ["eval", "{run}/final.safetensors"],
    ["export", "{run}", "-o", "{tmp}/out.prunet"],
    ["export", "{run}/dense.safetensors", "-o", "{tmp}/out.onnx", "--format", "onnx"],
    ["report", "{run}"],
    ["sensitivity", "{run}/dense.safetensors", "--values", "0,1"],
    ["bits", "{run}", "--values", "2"],
])
def test_a_command_on_a_file_naming_code_runs_nothing(evil_run, tmp_path, capsys, command):
    run_dir, marker = evil_run
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    err = one_line(capsys)
    assert "--trust-factory" in err and "subprocess:run" in err
    assert not marker.exists()
    assert not (tmp_path / "out.prunet").exists() and not (tmp_path / "out.onnx").exists()


def test_a_checkpoint_with_a_trusted_recipe_still_refuses_the_checkpoints_own_factory(evil_run, tmp_path, capsys):
    """--recipe names registry data and model; the checkpoint's own factory is not the recipe's: not trusted."""
    run_dir, marker = evil_run
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "output_dir": str(tmp_path / "runs")}))
    assert main(["sensitivity", str(run_dir / "dense.safetensors"), "--recipe", str(recipe), "--values", "0,1"]) == 2
    assert "--trust-factory" in one_line(capsys)
    assert not marker.exists()


def test_from_a_checkpoint_naming_code_runs_nothing(evil_run, tmp_path, capsys):
    """--from builds the recipe's own model: a checkpoint that names anything else is refused before anything is built."""
    run_dir, marker = evil_run
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(recipe), "--from", str(run_dir / "dense.safetensors")]) == 2
    err = one_line(capsys)
    assert "subprocess:run" in err and "lenet_300_100" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_resume_of_a_run_naming_code_runs_nothing(evil_run, capsys):
    run_dir, marker = evil_run
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    torch.save({"format": PROGRESS_FORMAT, "resume_format": RESUME_FORMAT, "metrics_bytes": 0, "recipe": recipe,
                "world_size": 1}, run_dir / PROGRESS)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = one_line(capsys)
    assert "--trust-factory" in err and "model.factory 'subprocess:run'" in err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing touched


def test_the_python_api_runs_nothing_without_trust(evil_run):
    run_dir, marker = evil_run
    for call in (lambda: prunet.load(run_dir / "final.prunet"),
                 lambda: prunet.load(run_dir / "final.safetensors", sparse=True),
                 lambda: load_checkpoint(run_dir / "final.safetensors"),
                 lambda: load_checkpoint(run_dir / "final.safetensors", trust_factory=["mypkg.nets:resnet"]),
                 lambda: Run(run_dir).recipe,
                 lambda: prunet.export(run_dir, run_dir.parent / "x.prunet")):
        with pytest.raises(UntrustedFactoryError, match="subprocess:run"):
            call()
    assert not marker.exists()


def test_a_file_of_an_unknown_model_loads_into_the_users_own_module_without_trust(tiny_run, evil_run, lenet):
    """``prunet.load(path, model=...)``: the file's factory is never built; the weights and masks go into the module."""
    run_dir, marker = evil_run
    x = torch.randn(4, 1, 28, 28)
    expected = prunet.load(tiny_run / "final.prunet")(x)  # the untouched file, a registry model
    for path in (run_dir / "final.prunet", run_dir / "final.safetensors"):
        model = prunet.load(path, model=lenet(seed=1))
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-6)
        assert 0 < int((model.fc1.weight != 0).sum()) < model.fc1.weight.numel()  # pruned, masks baked in
    assert not marker.exists()


def test_registry_models_need_no_trust(tiny_run, capsys):
    """The run's own files, untouched, load and evaluate with no flag."""
    model = prunet.load(tiny_run / "final.prunet")
    assert isinstance(model, torch.nn.Module)
    assert main(["eval", str(tiny_run / "final.prunet"), "--batch-sizes", "1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
