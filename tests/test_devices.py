"""Where a run computes: the device in recipes and on the command line, mixed precision, and CUDA where there is one.

The CUDA tests are marked ``cuda`` and skipped on a machine without a GPU; on one with a
GPU they run the same checks there (``pytest -m cuda``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prunet import Pruner, Threshold
from prunet.checkpoint import load_checkpoint
from prunet.cli import main
from prunet.config import ConfigError, TrainConfig, recipe_from_dict
from prunet.devices import DeviceError, resolve_device
from prunet.train import FitOptions, Normalization, fit

from conftest import TINY_RECIPE

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("how", ["recipe", "flag"])
def test_cuda_without_a_gpu_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, tiny_recipe, how):
    if how == "recipe":
        tiny_recipe["device"] = "cuda"
    args = ["run", str(write(tmp_path, tiny_recipe))] + (["--device", "cuda:1"] if how == "flag" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("prunet: error: ") and "device: cuda" in err[0] and "no CUDA GPU" in err[0] and "use cpu or auto" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "tradeoff", "sensitivity", "bits", "eval", "report"])
def test_every_computing_command_takes_device_and_refuses_a_bad_one(tmp_path, capsys, command):
    recipe = write(tmp_path, {**TINY_RECIPE, "output_dir": str(tmp_path / "runs")})
    target = {"train": [str(recipe)], "tradeoff": [str(recipe)], "sensitivity": [str(recipe)],
              "bits": [str(tmp_path)], "eval": [str(tmp_path / "x.prunet")], "report": [str(tmp_path)]}[command]
    assert main([command, *target, "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'tpu' is not one of auto, cpu, cuda, cuda:N, mps" in err, err


def test_device_names_are_checked_when_the_recipe_is_read():
    assert recipe_from_dict({"device": "cuda:3"}).device == "cuda:3"  # a name; the machine is asked at run time
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x"):
        with pytest.raises(ConfigError, match="device: .* is not one of"):
            recipe_from_dict({"device": bad})


def test_auto_is_the_cpu_without_a_gpu_and_cuda_with_one():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not HAS_CUDA:
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda", local_rank=1)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_masks_exact(fashion, lenet, amp):
    model = lenet()
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0))
    before = {k: v.clone() for k, v in pruner.masks.items()}
    cfg = TrainConfig(epochs=1, lr=0.05, amp=amp)
    records = fit(model, fashion.train, fashion.val, cfg, Normalization(fashion.mean, fashion.std), FitOptions(
                  pruner=pruner))
    assert records[0].val_acc > 50.0  # it learns
    for t in pruner.targets:
        assert torch.equal(t.mask, before[t.param])
        assert t.module.weight.dtype == torch.float32
        assert torch.all(t.module.weight[t.mask == 0] == 0)


@pytest.mark.slow
def test_an_fp16_run_resumes_with_its_gradient_scaler(tmp_path, tiny_recipe, fast_data, monkeypatch):
    """The scaler's state is part of the resume point: a stopped fp16 run ends as an unstopped one."""
    import prunet.pipeline as pipeline
    from prunet import runfolder

    tiny_recipe["train"]["amp"] = "fp16"
    recipe = recipe_from_dict(tiny_recipe)
    pipeline.run(recipe, run_dir=tmp_path / "whole", log=lambda s: None)
    real = runfolder.RunFolder.save_progress

    def dies(self, progress):
        real(self, progress)
        if progress.get("fit_phase") == "round1":
            assert progress["fit"]["scaler"]["scale"] > 0
            raise KeyboardInterrupt

    monkeypatch.setattr(runfolder.RunFolder, "save_progress", dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, run_dir=tmp_path / "stopped", log=lambda s: None)
    monkeypatch.setattr(runfolder.RunFolder, "save_progress", real)
    pipeline.resume(tmp_path / "stopped", log=lambda s: None)
    a, _, _ = load_checkpoint(tmp_path / "whole" / "final.safetensors")
    b, _, _ = load_checkpoint(tmp_path / "stopped" / "final.safetensors")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_a_run_on_cuda_writes_checkpoints_that_load_on_the_cpu(tmp_path, capsys, tiny_recipe, fast_data, amp):
    tiny_recipe["device"] = "cuda"
    tiny_recipe["train"]["amp"] = amp
    assert main(["run", str(write(tmp_path, tiny_recipe))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["compression"] > 1.5 and summary["final"]["val_acc"] > 50.0
    model, pruner, _ = load_checkpoint(run_dir / "final.safetensors")  # on the CPU
    assert next(model.parameters()).device.type == "cpu"
    for t in pruner.targets:
        assert torch.all(t.module.weight[t.mask == 0] == 0)
    assert main(["sensitivity", str(run_dir / "dense.safetensors"), "--values", "0,1", "--device", "cuda"]) == 0
    assert main(["report", str(run_dir), "--device", "cuda"]) == 0


@pytest.mark.cuda
@cuda
def test_masks_stay_exact_on_cuda_with_fp16(fashion, lenet):
    model = lenet().cuda()
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0))
    fit(model, fashion.train, fashion.val, TrainConfig(epochs=1, lr=0.05, amp="fp16"), Normalization(fashion.mean, fashion.std), FitOptions(
        pruner=pruner))
    for t in pruner.targets:
        assert t.mask.device.type == "cuda"
        assert torch.all(t.module.weight[t.mask == 0] == 0)
