"""A full disk and odd run names: one line, exit 2, and an earlier run put back at once.

The disk fills in two ways here: a writer that fails from its N-th file on (torch's writer raises
``RuntimeError``, safetensors and Python ``OSError``), and, where this process may mount one, a real
tmpfs a few megabytes large.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import prunet.files
from prunet.cli import main

from conftest import REAL_FASHION, TINY_RECIPE, use_data_cache

pytestmark = pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")


def recipe_file(tmp_path: Path, output_dir: Path, rounds: int = 1) -> Path:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["output_dir"] = str(output_dir)
    recipe["prune"]["rounds"] = recipe["prune"]["rounds"][:rounds]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("prunet: error: ")
    return err


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".prunet-lock"}


def full_from(monkeypatch, n: int, error: BaseException) -> None:
    """From the n-th whole-file write on, every write fails with ``error`` (as on a disk that filled up)."""
    calls = {"n": 0}
    real = prunet.files.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        calls["n"] += 1
        fd, name = real(*args, **kwargs)
        if calls["n"] >= n:
            os.close(fd)
            os.unlink(name)
            raise error
        return fd, name

    monkeypatch.setattr(prunet.files.tempfile, "mkstemp", mkstemp)


def torch_writer_fails_from(monkeypatch, n: int) -> None:
    """torch.save raising what it raises on a full disk, from its n-th call on (the resume points)."""
    calls = {"n": 0}
    real = torch.save

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 946752 vs 946624")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("how", ["torch", "oserror"])
def test_a_full_disk_in_a_fresh_run_and_its_resume_is_one_line(tmp_path, capsys, monkeypatch, how):
    use_data_cache(monkeypatch)
    path = recipe_file(tmp_path, tmp_path / "runs")
    with monkeypatch.context() as mp:
        if how == "torch":
            torch_writer_fails_from(mp, 3)  # the start, dense epoch 1, then epoch 2's resume point fails
        else:
            full_from(mp, 10, OSError(errno.ENOSPC, "No space left on device"))  # at dense.safetensors
        assert main(["run", str(path)]) == 2
    err = one_line(capsys)
    run_dir = tmp_path / "runs" / "tiny"
    assert str(run_dir) in err and "free in" in err
    assert ("No space left on device" if how == "oserror" else "could not be written") in err
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]  # no half-written file left
    with monkeypatch.context() as mp:  # the disk is still full: resuming says so, in one line too
        full_from(mp, 1, OSError(errno.ENOSPC, "No space left on device"))
        assert main(["run", "--resume", str(run_dir)]) == 2
    assert "No space left on device" in one_line(capsys)
    assert main(["run", "--resume", str(run_dir)]) == 0  # room again: the run goes on


@pytest.mark.parametrize("n", [3, 11])  # while the folder is made ready; at the new run's dense checkpoint
def test_a_full_disk_during_overwrite_puts_the_earlier_run_back_before_exiting(tmp_path, capsys, monkeypatch, n):
    use_data_cache(monkeypatch)
    path = recipe_file(tmp_path, tmp_path / "runs")
    assert main(["run", str(path)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "notes.txt").write_text("mine")
    before = files(run_dir)
    capsys.readouterr()
    with monkeypatch.context() as mp:  # full from the n-th write on: no write succeeds after it
        full_from(mp, n, OSError(errno.ENOSPC, "No space left on device"))
        assert main(["run", str(path), "--overwrite"]) == 2
        assert "No space left on device" in one_line(capsys)
        assert files(run_dir) == before  # put back with the disk still full: renames need no room
    assert not (run_dir / ".prunet-previous").exists()


@pytest.mark.parametrize("field, value", [
    ("name", ".prunet-previous"), ("name", "a\nb"), ("name", ""), ("output_dir", ""),
    ("output_dir", "runs/x/.prunet-previous"), ("output_dir", "runs\x07"),
])
def test_odd_run_names_are_refused_in_one_line(tmp_path, capsys, field, value):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["output_dir"] = str(tmp_path / "runs")
    recipe[field] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 2
    assert f"{field}:" in one_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run_dir", ["", "X/.prunet-previous", "x\ny"])
def test_odd_run_dirs_are_refused_in_one_line(tmp_path, capsys, monkeypatch, run_dir):
    monkeypatch.chdir(tmp_path)
    path = recipe_file(tmp_path, tmp_path / "runs")
    for command in (["run", str(path)], ["train", str(path)], ["tradeoff", str(path)]):
        assert main([*command, "--run-dir", run_dir]) == 2
        assert "--run-dir:" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written anywhere


def mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_real_small_filesystem(tmp_path, capsys, monkeypatch):
    """The same on a real tmpfs: a finished run, the disk filled to 300 KB free, then --overwrite."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "24m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        use_data_cache(monkeypatch)
        path = recipe_file(tmp_path, disk)
        assert main(["run", str(path)]) == 0
        run_dir = disk / "tiny"
        before = files(run_dir)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 300 * 1024))
        capsys.readouterr()
        assert main(["run", str(path), "--overwrite"]) == 2
        err = one_line(capsys)
        assert "No space left on device" in err and "free in" in err
        assert files(run_dir) == before and not (run_dir / ".prunet-previous").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_export_onto_a_device_or_fifo_replaces_nothing(tmp_path, capsys):
    from prunet import Pruner, Sparsity, create_model
    from prunet.checkpoint import save_checkpoint

    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(0.9))
    save_checkpoint(tmp_path / "final.safetensors", model, {"model": "lenet_300_100"})
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # stands for /dev/null, which only root could replace
    assert main(["export", str(tmp_path), "-o", str(fifo)]) == 2
    assert "is not a regular file" in one_line(capsys)
    assert fifo.is_fifo()


@pytest.mark.parametrize("field, value", [("data.workers", 10**30), ("threads", 100000)])
def test_unbounded_resources_are_refused_in_one_line(tmp_path, capsys, field, value):
    path = recipe_file(tmp_path, tmp_path / "runs")
    assert main(["run", str(path), "--set", f"{field}={value}"]) == 2
    assert f"{field}:" in one_line(capsys) and not (tmp_path / "runs").exists()


def test_an_error_message_is_capped_in_length(tmp_path, capsys):
    path = recipe_file(tmp_path, tmp_path / "runs")
    assert main(["run", str(path), "--set", "name=" + "x/" * 5000]) == 2
    err = one_line(capsys)
    assert len(err) < 1100 and "characters in all" in err


def test_a_yaml_alias_bomb_in_factory_kwargs_is_a_short_line(tmp_path, capsys):
    """9 levels of 9 aliases are 387 million elements if expanded; the message names them without expanding."""
    (tmp_path / "boom.py").write_text("def splits(**kwargs):\n    raise ValueError('no data here')\n")
    levels = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    recipe = yaml.safe_load(yaml.safe_dump({**TINY_RECIPE, "output_dir": str(tmp_path / "runs")}))
    text = yaml.safe_dump(recipe).replace("data:\n", f"data:\n  factory: {tmp_path / 'boom.py'}:splits\n"
                                                    "  kwargs:\n" + "\n".join(levels) + "\n", 1)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = one_line(capsys)
    assert "raised ValueError: no data here" in err and len(err) < 1000


def test_from_a_checkpoint_holding_nan_is_one_line(tmp_path, capsys, monkeypatch):
    from prunet import create_model
    from prunet.checkpoint import save_checkpoint

    use_data_cache(monkeypatch)
    model = create_model("lenet_300_100")
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    ckpt = save_checkpoint(tmp_path / "dense.safetensors", model, {"model": "lenet_300_100", "model_kwargs":
                                                                    {"num_classes": 10}})
    path = recipe_file(tmp_path, tmp_path / "runs")
    assert main(["run", str(path), "--from", str(ckpt)]) == 2
    assert "fc2.weight" in one_line(capsys) and not (tmp_path / "runs").exists()
