"""Exact resume: a run stopped anywhere (Ctrl-C, a failed write, kill -9) continues to the same bits.

A reference run goes uninterrupted; the others are stopped at a chosen point,
continued with :func:`prunet.pipeline.resume`, and compared with it: every
checkpoint's tensors, every line of ``metrics.jsonl`` and ``summary.json``
(timings left out), bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REAL_FASHION, TINY_RECIPE, logged, use_data_cache, wait_until
from safetensors.torch import load_file

import prunet.phases
import prunet.pipeline
from prunet.checkpoint import CheckpointError
from prunet.cli import main
from prunet.config import recipe_from_dict
from prunet.pipeline import resume, run
from prunet.runfolder import PROGRESS, RunError, RunFolder

pytestmark = pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")

# Every phase has several epochs (a stop can land inside one), SGD with momentum (optimizer
# state to carry over), dropout (ratios adjusted per round) and a step schedule.
RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["threads"] = 1
RECIPE["model"]["dropout"] = 0.3
RECIPE["train"].update(epochs=2, momentum=0.9, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5)
for r in RECIPE["prune"]["rounds"]:
    r["epochs"] = 2
CHECKPOINTS = ("dense.safetensors", "round1.safetensors", "round2.safetensors", "final.safetensors",
               "final_shrunk.safetensors", "final.prunet")


def untimed(value):
    """``value`` without what differs between any two runs: wall times, and sizes of files that name their folder."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "bytes", "ratio_to_dense_file")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def assert_same_run(folder: Path, reference: Path) -> None:
    for name in CHECKPOINTS:
        a, b = load_file(str(folder / name)), load_file(str(reference / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}: {k}"
    lines = [untimed(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    expected = [untimed(json.loads(line)) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert lines == expected
    assert untimed(json.loads((folder / "summary.json").read_text())) == \
        untimed(json.loads((reference / "summary.json").read_text()))
    assert not (folder / PROGRESS).exists()  # finished: nothing left to resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        use_data_cache(mp)
        run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=folder, log=lambda line: None)
    return folder


def stopped_run(folder: Path, n: int) -> None:
    """Run the recipe into ``folder`` and stop it in its ``n``-th resume point."""
    with pytest.MonkeyPatch.context() as mp:
        stop_at_save(mp, n)
        with pytest.raises(KeyboardInterrupt):
            run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=folder, log=lambda line: None)


def stop_at_save(mp: pytest.MonkeyPatch, n: int) -> None:
    """The ``n``-th resume point is never completed: its write dies half-way (as a kill -9 would leave it)."""
    calls = {"n": 0}
    real = torch.save

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            Path(f).write_bytes(b"half a resume point")
            raise KeyboardInterrupt
        return real(obj, f, *args, **kwargs)

    mp.setattr(torch, "save", dying_save)


# Resume points: 1 the start, 2-3 dense epochs, 4 dense done, 5-6 round 1's epochs, 7 round 1 done,
# 8-9 round 2's epochs, 10 round 2 done. Stopping in the n-th write resumes from the (n-1)-th.
@pytest.mark.parametrize("n, resumes_from", [(3, "dense after epoch 1"), (6, "round1 after epoch 1"),
                                             (8, "after round 1"), (5, "after the dense phase")])
@pytest.mark.slow
def test_a_run_stopped_while_saving_resumes_from_the_point_before_to_the_same_bits(
        n, resumes_from, reference, fast_data, tmp_path):
    folder = tmp_path / "run"
    stopped_run(folder, n)
    assert not (folder / "summary.json").exists()
    lines: list[str] = []
    resume(folder, log=lines.append)
    assert f"resume: {folder} from {resumes_from}" in lines
    assert_same_run(folder, reference)


@pytest.mark.slow
def test_a_run_stopped_in_its_report_resumes_to_the_same_bits(reference, fast_data, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    with monkeypatch.context() as mp:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        mp.setattr(prunet.phases, "write_report", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=folder, log=lambda line: None)
    resume(folder, log=lambda line: None)
    assert_same_run(folder, reference)
    assert (folder / "report.html").is_file()


def test_a_run_killed_with_sigkill_mid_round_resumes_to_the_same_bits(reference, fast_data, tmp_path):
    recipe = copy.deepcopy(RECIPE)
    recipe["output_dir"] = str(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    folder = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "prunet", "run", str(path), "--run-dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Killed once round 1 has logged an epoch: inside the round, with a resume point in it.
        wait_until(proc, lambda: logged(folder, event="epoch", phase="round1"), "round 1's first epoch")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()  # no-op once it is dead; a failed wait leaves no run behind
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "summary.json").exists() and (folder / PROGRESS).is_file()
    assert main(["run", "--resume", str(folder)]) == 0
    assert_same_run(folder, reference)


def test_resuming_a_finished_or_missing_run_is_one_line(reference, tmp_path, capsys):
    with pytest.raises(RunError, match="no unfinished run to resume.*finished"):
        resume(reference)
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert main(["run", "--resume", str(reference), "recipes/demo.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "drop RECIPE" in err[1]


def test_a_damaged_resume_point_is_one_line_and_nothing_changes(fast_data, tmp_path):
    folder = tmp_path / "run"
    stopped_run(folder, 5)
    (folder / PROGRESS).write_bytes(b"\0" * 100)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".prunet-lock"}
    with pytest.raises(RunError, match="unreadable or corrupt.*--overwrite"):
        resume(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".prunet-lock"}
    assert after == before


def test_a_new_run_into_an_unfinished_one_points_to_resume(fast_data, tmp_path):
    folder = tmp_path / "run"
    stopped_run(folder, 5)
    with pytest.raises(RunError, match="unfinished run.*--resume"):
        run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=folder, log=lambda line: None)


def test_a_resumed_run_that_is_stopped_again_keeps_its_progress(reference, fast_data, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    stopped_run(folder, 3)
    with monkeypatch.context() as mp:
        stop_at_save(mp, 4)  # counted from the resume: round 1's first epoch
        with pytest.raises(KeyboardInterrupt):
            resume(folder, log=lambda line: None)
    lines: list[str] = []
    resume(folder, log=lines.append)
    assert f"resume: {folder} from round1 after epoch 1" in lines
    assert_same_run(folder, reference)


def test_from_a_pruned_checkpoint_is_refused(reference, fast_data, tmp_path):
    recipe = recipe_from_dict(copy.deepcopy(RECIPE))
    with pytest.raises(CheckpointError, match="holds a pruned model \\(round1\\).*dense.safetensors.*--resume"):
        run(recipe, run_dir=tmp_path / "more", from_checkpoint=reference / "round1.safetensors")
    assert not (tmp_path / "more").exists()


def test_from_a_dense_checkpoint_matches_the_run_it_came_from(reference, fast_data, tmp_path):
    summary = run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=tmp_path / "again",
                  from_checkpoint=reference / "dense.safetensors", log=lambda line: None)
    assert summary["weights_kept"] == json.loads((reference / "summary.json").read_text())["weights_kept"]
    assert RunFolder(tmp_path / "again").written()  # a real run folder, finished
    assert not (tmp_path / "again" / PROGRESS).exists()


@pytest.mark.slow
def test_a_killed_overwrite_run_is_offered_for_resume_not_deleted(reference, fast_data, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)  # a finished run the next one replaces
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "output_dir": str(tmp_path)}))
    proc = subprocess.Popen([sys.executable, "-m", "prunet", "run", str(path), "--run-dir", str(folder), "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # kill -9 inside round 1: nothing is put back; the kernel drops the lock. The resume point
        # appears once the earlier run is aside, so the metrics read are the new run's.
        wait_until(proc, lambda: (folder / PROGRESS).is_file() and logged(folder, event="epoch", phase="round1"),
                   "round 1's first epoch")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (folder / ".prunet-previous").is_dir() and (folder / PROGRESS).is_file()
    with pytest.raises(RunError, match="unfinished run.*--resume"):
        run(recipe_from_dict(copy.deepcopy(RECIPE)), run_dir=folder, log=lambda line: None)
    assert (folder / PROGRESS).is_file()  # still there to resume
    resume(folder, log=lambda line: None)
    assert_same_run(folder, reference)
    assert not (folder / ".prunet-previous").exists()  # the earlier run, replaced for good
