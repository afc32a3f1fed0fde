"""The command line: help, models, and one-line errors with exit code 2 (never a traceback).

A few tests run ``python -m prunet`` as a user would; the rest call ``main`` in-process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prunet.cli as cli_module
from prunet import Pruner, Sparsity
from prunet.checkpoint import save_checkpoint
from prunet.config import RECOMMENDED
from prunet.cli import main
from prunet.models import create_model, list_models

from conftest import REAL_FASHION, TINY_RECIPE

ROOT = Path(__file__).resolve().parent.parent


def prunet(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRUNET_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "prunet", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("prunet: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


# --- as a user runs it ------------------------------------------------------------------------


def test_help():
    result = prunet("--help")
    assert result.returncode == 0
    for command in ("models", "train", "run"):
        assert command in result.stdout
    assert "Han et al." in result.stdout




def test_bad_recipe_exits_2_with_one_line(tmp_path):
    data = copy.deepcopy(TINY_RECIPE)
    data["train"]["lr"] = -0.1
    result = prunet("run", str(write_recipe(tmp_path, data)), "--run-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train.lr", "out of range")
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_exits_2_with_one_line(tmp_path):
    path = write_recipe(tmp_path, TINY_RECIPE)
    result = prunet("train", str(path), "--set", "data.data_dir=/nonexistent", "--run-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "/nonexistent", "lacks")
    assert not (tmp_path / "out").exists()


# --- in-process -------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("prunet 0.")


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [r.split()[0] for r in rows] == list_models() == ["alexnet", "lenet_300_100", "lenet_5", "vgg16"]


def test_models_count_builds_them(capsys, monkeypatch):
    monkeypatch.setattr(cli_module, "list_models", lambda: ["lenet_5"])  # the big ones take seconds
    assert main(["models", "--count"]) == 0
    out = capsys.readouterr().out
    assert "431,080" in out and "vgg16" not in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: prunet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "{recipe}", "--set", "train.epochs"], ["--set takes FIELD=VALUE"]),
        (["run", "{recipe}", "--set", "train.epochz=2"], ["train.epochz: unknown field"]),
        (["run", "{recipe}", "--set", "model.name=resnet"], ["model.name", "resnet"]),
        (["run", "{recipe}", "--set", "prune.rounds=[]"], ["has no prune.rounds", "prunet train"]),
        (["run", "{recipe}", "--from", "{tmp}/nope.safetensors"], ["--from", "nope.safetensors", "does not exist"]),
        (["train", "{tmp}/missing.yaml"], ["cannot read recipe", "missing.yaml"]),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, words):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    argv = [a.format(recipe=recipe, tmp=tmp_path) for a in args]
    assert main(argv + ["--run-dir", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, *words)
    assert not (tmp_path / "out").exists()


def test_corrupt_from_checkpoint_exits_2(tmp_path, capsys, fast_data):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["run", str(write_recipe(tmp_path, TINY_RECIPE)), "--from", str(bad)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad), "corrupt")


def test_train_then_run_from_its_checkpoint(tmp_path, capsys, fast_data):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    assert main(["train", str(recipe), "--set", "train.epochs=1", "--run-dir", str(dense_dir)]) == 0
    summary = json.loads((dense_dir / "summary.json").read_text())
    assert "rounds" not in summary and summary["parameters"] == 266_610
    assert (dense_dir / "dense.safetensors").is_file()
    assert not list(dense_dir.glob("round*.safetensors")) and not (dense_dir / "final.safetensors").exists()
    # The report of a dense-only run: its dense model, no rounds ("lacks 'final'" before).
    assert main(["report", str(dense_dir)]) == 0
    report = (dense_dir / "report.md").read_text()
    assert "0 of 0 accepted" in report and "1.0× fewer weights" in report and "fc1" in report

    assert main(["run", str(recipe), "--from", str(dense_dir / "dense.safetensors"),
                 "--set", "prune.rounds=[{criterion: sparsity, sparsity: 0.5, epochs: 1}]",
                 "--run-dir", str(pruned_dir)]) == 0
    summary = json.loads((pruned_dir / "summary.json").read_text())
    assert summary["dense"]["test_acc"] == json.loads((dense_dir / "summary.json").read_text())["dense"]["test_acc"]
    assert summary["weights_kept"] == 266_200 // 2
    assert "run folder: " + str(pruned_dir) in capsys.readouterr().out


def test_run_to_a_target_builds_a_ladder_that_lands_on_it(tmp_path, capsys, fast_data):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    assert main(["run", str(recipe), "--target", "12", "--set", "prune.rounds=[{quality: 1.0, epochs: 0}]",
                 "--run-dir", str(tmp_path / "t")]) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert [r["target"] for r in summary["rounds"]][-1] == 12
    for r in summary["rounds"]:
        assert r["compression"] == pytest.approx(r["target"], rel=0.01)
    assert "target 12x: paper, rounds to 1.8612x, 3.4641x, 6.4474x, 12x" in capsys.readouterr().out


def test_run_to_a_target_by_gradual_pruning_lands_on_it_and_method_needs_a_target(tmp_path, capsys, fast_data):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    assert main(["run", str(recipe), "--target", "12", "--method", "gradual", "--set",
                 "prune.rounds=[{quality: 1.0, epochs: 1}]", "--run-dir", str(tmp_path / "g")]) == 0
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["rounds"][0]["criterion"] == "gradual erk" and summary["rounds"][0]["epochs"] == 4
    assert summary["compression"] == pytest.approx(12, rel=0.01)
    method, high = RECOMMENDED[-1]  # no --method at a high target: the recommended method
    assert main(["run", str(recipe), "--target", f"{high:g}", "--set", "prune.rounds=[{quality: 1.0, epochs: 1}]",
                 "--run-dir", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"][0]["criterion"].startswith(method + " ")
    assert summary["compression"] == pytest.approx(high, rel=0.01)
    assert f"target {high:g}x: {method} over" in capsys.readouterr().out
    assert main(["run", str(recipe), "--method", "gradual"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--method goes with --target N (how to prune "
                                                                        "to N times fewer weights)")


def test_export_then_eval_the_compact_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(0.9))
    save_checkpoint(tmp_path / "final.safetensors", model, {"model": "lenet_300_100", "model_kwargs": {}})
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "m.prunet")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm.prunet'} (prunet)" in out and "smaller than the dense float32 tensors" in out
    if not REAL_FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    assert main(["eval", str(tmp_path / "m.prunet"), "--batch-sizes", "1,8", "--sparse"]) == 2  # records no data
    assert "--dataset" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m.prunet"), "--batch-sizes", "1,8", "--sparse", "--dataset", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"test accuracy \d+\.\d\d% on 10,000 fashion-mnist test images", out)
    assert "batch 1 " in out and "batch 8 " in out and re.search(r"layers: fc1 (dense|sparse CSR|sparse native)", out)


@pytest.mark.parametrize("name", ["dense.safetensors", "final.prunet", "summary.json", ".prunet-previous/x.prunet",
                                  "link.prunet"])
def test_export_never_replaces_a_file_of_a_run(tmp_path, capsys, name):
    """A run folder's recorded files (its manifest) and prunet's hidden folders are not export's to write."""
    from prunet.runfolder import RunFolder

    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(0.9))
    folder = RunFolder.create(tmp_path / "run")
    meta = {"model": "lenet_300_100", "model_kwargs": {}}
    for ckpt in ("dense.safetensors", "final.safetensors"):
        folder.save_checkpoint(ckpt, model, meta)
    folder.write_json("summary.json", {"compression": 10})
    folder.write_text("final.prunet", "the run's own compact file")
    folder.commit()
    (tmp_path / "run" / "link.prunet").symlink_to(tmp_path / "run" / "dense.safetensors")
    before = {p: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    out = tmp_path / "run" / name
    for fmt in ("safetensors", "prunet"):
        assert main(["export", str(tmp_path / "run"), "-o", str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "export writes only files of its own" in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert not (tmp_path / "run" / ".prunet-previous").exists()
    # A file of the user's own in the run folder is theirs to name.
    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "run" / "mine.prunet")]) == 0


@pytest.mark.parametrize("args, words", [
    (["eval", "nowhere.prunet"], "does not exist"),
    (["export", "nowhere", "-o", "x.prunet"], "does not exist"),
    (["eval", "m.prunet", "--batch-sizes", "0"], "--batch-sizes takes integers >= 1"),
])  # fmt: skip
def test_export_and_eval_errors_are_one_line(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_sigterm_is_handled_like_ctrl_c(monkeypatch, capsys):
    import signal

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have stopped the command")

    monkeypatch.setattr(cli_module, "cmd_models", terminated)
    assert main(["models"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not cli_module._interrupt  # restored afterwards


def test_a_full_disk_is_one_line(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "runs/tiny/final.safetensors")

    monkeypatch.setattr(cli_module, "run", full)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == "prunet: error: runs/tiny/final.safetensors: No space left on device\n"


def test_sensitivity_of_a_checkpoint_that_does_not_fit_the_data_is_one_line(tmp_path, capsys, fast_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    save_checkpoint(tmp_path / "c.safetensors", create_model("lenet_300_100", num_classes=5),
                    {"model": "lenet_300_100", "model_kwargs": {"num_classes": 5}})
    assert main(["sensitivity", str(tmp_path / "c.safetensors"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.num_classes: the model has 5 outputs, fashion-mnist has 10 classes" in err and err.count("\n") == 1


def test_eval_of_a_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys):
    if not REAL_FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    save_checkpoint(tmp_path / "c.safetensors", create_model("lenet_300_100", num_classes=5),
                    {"model": "lenet_300_100", "model_kwargs": {"num_classes": 5}})
    assert main(["eval", str(tmp_path / "c.safetensors"), "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "has 5 outputs, fashion-mnist has 10 classes" in err and err.count("\n") == 1


def test_eval_measures_on_the_data_the_file_was_trained_on(tmp_path, capsys, fast_data):
    """A model trained on npz data was evaluated on Fashion-MNIST (10.07%, exit 0); eval now reads the file's data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, 28, 28, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :14].mean(dim=(1, 2)) > 0).long()  # 4 learnable classes
    folder = tmp_path / "npz"
    folder.mkdir()
    import numpy as np

    for split, sl in (("train", slice(0, 400)), ("val", slice(400, 500)), ("test", slice(500, 600))):
        np.savez(folder / f"{split}.npz", x=x[sl].numpy(), y=y[sl].numpy())
    recipe = {**TINY_RECIPE, "output_dir": str(tmp_path / "runs"), "model": {"name": "lenet_300_100", "num_classes": 4},
              "data": {"factory": "prunet.data.npz:splits", "kwargs": {"folder": str(folder)}, "batch_size": 50},
              "train": {"epochs": 3, "lr": 0.05}}
    assert main(["run", str(write_recipe(tmp_path, recipe))]) == 0
    final = tmp_path / "runs" / "tiny" / "final.prunet"
    capsys.readouterr()
    assert main(["eval", str(final), "--batch-sizes", "1"]) == 2  # its data is a factory: trust is asked for
    assert "--trust-factory" in capsys.readouterr().err
    assert main(["eval", str(final), "--batch-sizes", "1", "--trust-factory"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert f"test accuracy {summary['final']['test_acc']:.2f}% on 100 " in out  # the run's own test split
    assert main(["eval", str(final), "--batch-sizes", "1", "--dataset", "fashion-mnist"]) == 2  # 4 outputs, 10 classes
    assert "outputs" in capsys.readouterr().err


# --- prunet prune: one-shot pruning, no retraining ------------------------------------------------


def one_shot_checkpoint(path: Path, sparsity: float | None = None) -> Path:
    """A LeNet-300-100 checkpoint recording Fashion-MNIST with a 500-image validation split (pruned if asked)."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    if sparsity is not None:
        Pruner(model).prune(Sparsity(sparsity))
    meta = {"model": "lenet_300_100", "model_kwargs": {},
            "split": {"dataset": "fashion-mnist", "val_size": 500, "split_seed": 0}}
    save_checkpoint(path, model, meta)
    return path


@pytest.mark.parametrize("args, words", [
    (["--target", "0.5"], "--target: a compression >= 1 (weights / kept), got 0.5"),
    (["--target", "nan"], "--target: a compression >= 1"),
    (["--target", "4", "--calibration", "0"], "--calibration: a number of training examples >= 1, got 0"),
    (["--target", "4", "--method", "sgd"], "--method: 'sgd' is not one of magnitude, lamp, obs"),
])  # fmt: skip
def test_prune_argument_errors_are_one_line(tmp_path, capsys, args, words):
    ckpt = one_shot_checkpoint(tmp_path / "dense.safetensors")
    assert main(["prune", str(ckpt), "-o", str(tmp_path / "o.prunet"), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "o.prunet").exists()


def test_prune_of_a_missing_file_or_onto_its_own_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nowhere.safetensors"), "--target", "4", "-o", str(tmp_path / "o.prunet")]) == 2
    err = capsys.readouterr().err
    assert "nowhere.safetensors does not exist" in err and err.count("\n") == 1
    ckpt = one_shot_checkpoint(tmp_path / "dense.safetensors")
    assert main(["prune", str(ckpt), "--target", "4", "-o", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint being pruned" in err and err.count("\n") == 1


def test_prune_as_a_user_runs_it_exits_2_with_one_line(tmp_path):
    result = prunet("prune", str(tmp_path / "x.safetensors"), "--target", "4", "--method", "magic",
                    "-o", str(tmp_path / "o.prunet"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--method: 'magic' is not one of magnitude, lamp, obs")


@pytest.mark.parametrize("method", ["lamp", "obs"])
def test_prune_writes_a_compact_file_at_the_target_and_prints_table_and_accuracies(tmp_path, capsys, fast_data,
                                                                                  method):
    from safetensors.torch import load_file

    from prunet.sparse import load

    ckpt = one_shot_checkpoint(tmp_path / "pruned.safetensors", sparsity=0.5)  # masks the one-shot keeps
    before = {k: v for k, v in load_file(ckpt).items() if k.endswith("_prunet_mask")}
    out = tmp_path / "o.prunet"
    assert main(["prune", str(ckpt), "--target", "4", "--calibration", "64", "--method", method, "-o", str(out),
                 "--data-dir", str(REAL_FASHION)]) == 0
    text = capsys.readouterr().out
    assert f"{method} to 4x, no retraining, calibrated on the first 64 fashion-mnist training examples" in text
    assert re.search(r"Total\s+266,200\s+25\.00%\s+66,550 \(4\.0x\)", text)
    assert re.search(r"before: validation \d+\.\d\d%  test \d+\.\d\d%\nafter: validation", text)
    model = load(out)
    for name, mask in before.items():
        weight = dict(model.named_parameters())[name.replace("_prunet_mask", "")]
        assert torch.all(weight[~mask] == 0)  # pruned before, pruned still
    kept = sum(int((m.weight != 0).sum()) for m in model if isinstance(m, torch.nn.Linear))
    assert kept == 66_550
