"""Tests for prunet.runfolder: a run's files, what --overwrite may remove, and the read view."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunet import runfolder as F
from prunet.models import create_model
from prunet.runfolder import MissingRunFileError, Run, RunError, RunFolder

ROOT = Path(__file__).resolve().parent.parent


def a_run(path):
    """A folder holding a small run: config, a checkpoint, metrics, a summary."""
    folder = RunFolder.create(path)
    folder.write_yaml(F.CONFIG, {"name": "x", "model": {"name": "lenet_300_100"}})
    torch.manual_seed(0)
    folder.save_checkpoint(F.DENSE, create_model("lenet_300_100"), {"model": "lenet_300_100"})
    folder.log_metrics("dense", val_acc=90.0)
    folder.log_metrics("round", round=1, val_acc=89.5)
    folder.write_json(F.SUMMARY, {"model": "lenet_300_100", "dense": {}, "final": {}, "rounds": []})
    folder.commit()
    return folder


def test_the_manifest_names_what_was_written(tmp_path):
    folder = a_run(tmp_path / "run")
    assert folder.written() == [F.METRICS, F.CONFIG, F.DENSE, F.SUMMARY]


def test_a_folder_holding_a_run_is_not_reused_without_overwrite(tmp_path):
    a_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunError, match=r"already holds a run .*--overwrite"):
        RunFolder.create(tmp_path / "run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    a_run(tmp_path / "run")
    mine = dict.fromkeys(["notes.txt", "report_notes.txt", "my_export.safetensors"], "mine")
    for name, text in mine.items():
        (tmp_path / "run" / name).write_text(text)
    (tmp_path / "run" / "report_archive").mkdir()
    folder = RunFolder.create(tmp_path / "run", overwrite=True)
    folder.commit()
    left = {p.name for p in folder.path.iterdir()}
    assert left == set(mine) | {"report_archive", F.MANIFEST, F.METRICS, F.LOCK}
    assert folder.written() == [F.METRICS]
    assert (folder.path / F.METRICS).read_text() == ""


@pytest.mark.parametrize("name", ["round2.safetensors", "sensitivity.csv", "final_shared.prunet", "report.md"])
def test_a_users_file_named_like_prunets_is_never_replaced(tmp_path, name):
    """Not on the earlier run's record: the user's. The run is refused, the earlier run stays in place."""
    a_run(tmp_path / "run")
    (tmp_path / "run" / name).write_text("mine")
    before = visible(tmp_path / "run")
    with pytest.raises(RunError, match=f"holds {name}, named like prunet's files but not written by it"):
        RunFolder.create(tmp_path / "run", overwrite=True)
    assert visible(tmp_path / "run") == before and not (tmp_path / "run" / F.PREVIOUS).exists()
    with pytest.raises(RunError, match="is there and prunet did not write it"):  # nor by a later command
        RunFolder.open(tmp_path / "run").write_text(name, "prunet's")
    assert (tmp_path / "run" / name).read_text() == "mine"


def test_a_folder_without_a_manifest_holds_no_file_of_prunets(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("summary.json", "round3.safetensors", "report.md", "notes.txt"):
        (old / name).write_text("x")
    for overwrite in (False, True):
        with pytest.raises(RunError, match="named like prunet's files but not written by it"):
            RunFolder.create(old, overwrite=overwrite)
    assert {p.name for p in old.iterdir() if p.name != F.LOCK} == {"summary.json", "round3.safetensors", "report.md",
                                                                   "notes.txt"}


def test_a_folder_with_only_user_files_is_free(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    RunFolder.create(tmp_path / "mine").commit()  # no error, nothing removed
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


@pytest.mark.parametrize("name", ["../escape.txt", "sub/file.txt", "", ".", "..", F.MANIFEST])
def test_only_plain_names_in_the_folder_are_written(tmp_path, name):
    with pytest.raises(ValueError, match="is not a file name in the run folder"):
        RunFolder.create(tmp_path / "run").record(name)


def test_run_view_reads_what_the_folder_wrote(tmp_path):
    a_run(tmp_path / "run")
    run = Run(tmp_path / "run")
    assert run.recipe.name == "x" and run.recipe.model.name == "lenet_300_100"
    assert run.summary["model"] == "lenet_300_100"
    assert [m["event"] for m in run.metrics()] == ["dense", "round"]
    model, pruner, meta = run.load(F.DENSE)
    assert pruner is None and meta == {"model": "lenet_300_100"}
    torch.manual_seed(0)
    assert torch.equal(model.fc1.weight, create_model("lenet_300_100").fc1.weight)
    assert run.files() == sorted([F.CONFIG, F.DENSE, F.METRICS, F.SUMMARY])  # the manifest is hidden


def test_run_view_names_the_missing_or_corrupt_file(tmp_path):
    with pytest.raises(MissingRunFileError, match="does not exist"):
        Run(tmp_path / "nowhere")
    a_run(tmp_path / "run")
    run = Run(tmp_path / "run")
    with pytest.raises(MissingRunFileError, match=r"has no final\.safetensors"):
        run.load(F.FINAL)
    (tmp_path / "run" / F.METRICS).write_text('{"event": "dense"}\nnot json\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl, line 2"):
        run.metrics()
    (tmp_path / "run" / F.SUMMARY).write_text(json.dumps({"model": "x"}))
    with pytest.raises(RunError, match="lacks 'dense'"):
        Run(tmp_path / "run").summary
    (tmp_path / "run" / F.CONFIG).write_text("train: {lr: -1}\n")
    with pytest.raises(RunError, match=r"config\.yaml: train\.lr"):
        Run(tmp_path / "run").recipe


@pytest.mark.parametrize("manifest", ['["/tmp/victim.txt"]', '["../victim.txt"]', '"config.yaml"', "5", "{not json"])
def test_a_corrupt_manifest_deletes_nothing(tmp_path, manifest):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("c", "o", "config.yaml"):
        (folder / name).write_text("x")
    (folder / F.MANIFEST).write_text(manifest)
    with pytest.raises(RunError, match=r"\.prunet-files is corrupt .* delete it"):
        RunFolder.create(folder, overwrite=True)
    assert victim.read_text() == "keep me"
    assert {p.name for p in folder.iterdir()} - {F.LOCK} == {"c", "o", "config.yaml", F.MANIFEST}


def test_writing_into_a_folder_without_a_manifest_records_only_what_prunet_writes(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "round3.safetensors", "final_shrunk.safetensors"):
        (old / name).write_text("x")
    RunFolder.open(old).write_text(F.REPORT_MD, "# report")  # e.g. `prunet report` there
    assert RunFolder(old).written() == [F.REPORT_MD]
    with pytest.raises(RunError, match="named like prunet's files but not written by it"):
        RunFolder.create(old, overwrite=True)
    assert {p.name for p in old.iterdir() if p.name != F.LOCK} == {"config.yaml", "round3.safetensors",
                                                                   "final_shrunk.safetensors", F.REPORT_MD, F.MANIFEST}


def test_a_name_recorded_before_its_file_exists_stays_recorded(tmp_path):
    folder = RunFolder.create(tmp_path / "run")
    target = folder.record("round2.safetensors")  # a checkpoint about to be written...
    RunFolder(tmp_path / "run").record(F.SENSITIVITY_CSV)  # ...while another command adds a file
    target.write_text("checkpoint")
    assert "round2.safetensors" in folder.written()



def test_a_failed_replacement_puts_the_earlier_run_back(tmp_path):
    a_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")}
    folder = RunFolder.create(tmp_path / "run", overwrite=True)
    folder.write_text(F.CONFIG, "name: new\n")  # the new run got this far...
    folder.write_text("round1.safetensors", "partial")
    assert "back in place" in folder.abandon()  # ...then failed
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")}
    assert after == before
    assert RunFolder(tmp_path / "run").written() == [F.METRICS, F.CONFIG, F.DENSE, F.SUMMARY]


def test_a_killed_replacement_is_undone_by_the_next_run(tmp_path):
    a_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")}
    folder = RunFolder.create(tmp_path / "run", overwrite=True)
    folder.write_text("round1.safetensors", "partial")
    folder.lock.release()  # as if the process were killed (the kernel drops its lock): no commit, no abandon
    with pytest.raises(RunError, match="already holds a run"):  # the earlier run is back, and protected
        RunFolder.create(tmp_path / "run")
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")}
    assert after == before and not (tmp_path / "run" / F.PREVIOUS).exists()


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    folder = RunFolder.create(tmp_path / "run")
    with pytest.raises(RunError, match=r"being written by another prunet run \(pid \d+\)"):
        RunFolder.create(tmp_path / "run", overwrite=True)
    folder.commit()
    RunFolder.create(tmp_path / "run", overwrite=True).commit()  # free again


def test_a_file_where_the_folder_should_be_is_one_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(RunError, match="cannot make run folder"):
        RunFolder.create(tmp_path / "run")


def visible(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_an_interrupt_while_moving_the_earlier_run_aside_loses_nothing(tmp_path, monkeypatch):
    a_run(tmp_path / "run")
    before = visible(tmp_path / "run")
    real_replace, calls = os.replace, []

    def third_fails(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C: the files moved so far are put back at once
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", third_fails)
    with pytest.raises(KeyboardInterrupt):
        RunFolder.create(tmp_path / "run", overwrite=True)
    monkeypatch.undo()
    assert visible(tmp_path / "run") == before
    with pytest.raises(RunError, match="already holds a run"):
        RunFolder.create(tmp_path / "run")


# The manifest aside is written (one os.replace), then the earlier run's files move one by one:
# the third os.replace moves its second file, and the process is killed in it.
KILLED_WHILE_MOVING_ASIDE = """
import os, signal, sys
from prunet.runfolder import RunFolder
real_replace, calls = os.replace, []
def third_kills(src, dst):
    calls.append(src)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = third_kills
RunFolder.create(sys.argv[1], overwrite=True)
"""


def test_a_kill_while_moving_the_earlier_run_aside_loses_nothing(tmp_path):
    """kill -9 half-way through moving the earlier run aside: nothing puts it back then; the next run does."""
    a_run(tmp_path / "run")
    before = visible(tmp_path / "run")
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_MOVING_ASIDE, str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / "run" / F.PREVIOUS).is_dir() and visible(tmp_path / "run") != before  # really half-way
    with pytest.raises(RunError, match="already holds a run"):  # the next run finds the earlier one whole
        RunFolder.create(tmp_path / "run")
    assert visible(tmp_path / "run") == before


def test_a_stray_file_among_the_earlier_runs_files_does_not_break_commit(tmp_path):
    a_run(tmp_path / "run")
    folder = RunFolder.create(tmp_path / "run", overwrite=True)
    (tmp_path / "run" / F.PREVIOUS / "mine.txt").write_text("mine")
    folder.write_text(F.CONFIG, "name: new\n")
    folder.commit()
    assert (tmp_path / "run" / F.CONFIG).read_text() == "name: new\n"
    assert not (tmp_path / "run" / F.PREVIOUS).exists()
    kept = list((tmp_path / "run").glob(".prunet-discard-*/mine.txt"))
    assert [p.read_text() for p in kept] == ["mine"]
    RunFolder.create(tmp_path / "run", overwrite=True).commit()  # and the folder is usable


def test_a_replacement_that_finished_but_died_before_cleanup_is_kept_not_undone(tmp_path):
    """The new run wrote its summary and dropped its resume point, then died before deleting the earlier run:
    a refused plain run must not put the earlier run back over the finished one."""
    a_run(tmp_path / "run")
    folder = RunFolder.create(tmp_path / "run", overwrite=True)
    folder.write_yaml(F.CONFIG, {"name": "new"})
    folder.write_json(F.SUMMARY, {"model": "new", "dense": {}, "final": {}, "rounds": []})
    folder.lock.release()  # killed before commit: the earlier run is still aside, whole
    finished = visible(tmp_path / "run")
    with pytest.raises(RunError, match="already holds a run"):
        RunFolder.create(tmp_path / "run")
    assert visible(tmp_path / "run") == finished and not (tmp_path / "run" / F.PREVIOUS).exists()


def test_leftovers_of_an_interrupted_cleanup_are_finished_and_an_empty_aside_does_not_wedge(tmp_path):
    a_run(tmp_path / "run")
    leftover = tmp_path / "run" / ".prunet-discard-1-2"
    leftover.mkdir()
    (leftover / "dense.safetensors").write_text("old")
    (leftover / F.MANIFEST).write_text('["dense.safetensors"]\n')
    (tmp_path / "run" / F.PREVIOUS).mkdir()  # killed after making the aside folder, before its manifest
    with pytest.raises(RunError, match="already holds a run"):
        RunFolder.create(tmp_path / "run")
    assert not leftover.exists() and not (tmp_path / "run" / F.PREVIOUS).exists()
    RunFolder.create(tmp_path / "run", overwrite=True).commit()
