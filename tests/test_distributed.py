"""Two processes under torchrun (``gloo`` on the CPU): the same run as one process, masks identical on every rank.

These start ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m prunet ...``
exactly as a user would, on a small slice of real Fashion-MNIST. The one run compared with a
single process (the ``runs`` fixture, about 20 s on 2 cores) is the check ``make test`` keeps;
every other test here starts runs of its own and is marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from prunet.checkpoint import read_checkpoint
from prunet.distributed import mask_digest

from conftest import REAL_FASHION, logged, needs_fashion, wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = needs_fashion

RECIPE = {
    "name": "ddp",
    "seed": 0,
    "threads": 1,
    "device": "cpu",  # gloo on the CPU: the same test on a machine with one GPU (two ranks cannot share it)
    "model": {"name": "lenet_300_100"},
    "data": {"dataset": "fashion-mnist", "data_dir": str(REAL_FASHION), "train_subset": 3000, "val_size": 1000,
             "batch_size": 64, "eval_batch_size": 500},
    "train": {"epochs": 2, "lr": 0.05},
    "prune": {"rounds": [{"criterion": "threshold", "quality": 0.6, "epochs": 3},
                         {"criterion": "threshold", "quality": 0.8, "epochs": 1}]},
}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PRUNET_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "prunet", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "prunet", *args]


def launch(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env(), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "runs")}))
    return path


def kill_all(proc: subprocess.Popen, marker: str, timeout: float = 60) -> None:
    """SIGKILL torchrun and its workers (which it starts in sessions of their own), and return once all are dead.

    Every process whose command line names ``marker`` and prunet is killed; dead means gone or
    a zombie, which can write nothing more.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # torchrun (and its group) already ended
        pass
    killed = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "prunet" in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in killed if running(pid)]:
        assert time.monotonic() < deadline, f"processes {alive} outlived SIGKILL"
        time.sleep(0.01)


def running(pid: str) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "final.safetensors")[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recipe run once under torchrun with 2 processes and once as a single process."""
    tmp = tmp_path_factory.mktemp("ddp")
    path = write(tmp, RECIPE)
    two = launch(torchrun("run", str(path), "--run-dir", str(tmp / "two")), tmp)
    launch(single("run", str(path), "--run-dir", str(tmp / "one")), tmp)
    return tmp, path, two


def test_masks_are_identical_on_both_ranks_after_every_round(runs):
    tmp, _, _ = runs
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["rounds"]) == 2
    for r in summary["rounds"]:
        a, b = r["mask_digests"]  # each rank's digest of all its masks, gathered after the round
        assert a == b
    # The digest is of the masks rank 0 wrote: the final checkpoint holds them.
    state = final_state(tmp / "two")
    masks = {k[: -len("_prunet_mask")]: v for k, v in state.items() if k.endswith("_prunet_mask")}
    assert mask_digest(masks) == summary["rounds"][-1]["mask_digests"][0]


def test_two_processes_end_where_one_process_does_with_the_same_global_batch(runs):
    tmp, _, _ = runs
    two = json.loads((tmp / "two" / "summary.json").read_text())
    one = json.loads((tmp / "one" / "summary.json").read_text())
    for phase in ("dense", "final"):
        for split in ("val_acc", "test_acc"):
            assert abs(two[phase][split] - one[phase][split]) <= 0.5, (phase, split, two[phase], one[phase])
    assert abs(two["weights_kept"] - one["weights_kept"]) <= 0.01 * one["weights_kept"]


def test_only_rank_zero_prints_and_writes(runs):
    tmp, _, two = runs
    assert two.stdout.count("final: ") == 1 and two.stdout.count("dense epoch 1:") == 1
    lines = [json.loads(x) for x in (tmp / "two" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(x["phase"], x["epoch"]) for x in lines if x["event"] == "epoch"]
    assert len(epochs) == len(set(epochs)) == 2 + 3 + 1  # each epoch once, not once per rank
    assert "2 processes (rank 0 writes)" in two.stdout


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_model(runs):
    """kill -9 of torchrun and both ranks inside round 1, then --resume under torchrun: bit-identical."""
    tmp, path, _ = runs
    run_dir = tmp / "killed"
    proc = subprocess.Popen(torchrun("run", str(path), "--run-dir", str(run_dir)), cwd=tmp, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(proc, lambda: logged(run_dir, event="epoch", phase="round1"), "round 1's first epoch")
    finally:
        kill_all(proc, str(run_dir))
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    assert (run_dir / ".prunet-progress.pt").is_file()

    launch(torchrun("run", "--resume", str(run_dir)), tmp)
    whole, resumed = final_state(tmp / "two"), final_state(run_dir)
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert not (run_dir / ".prunet-progress.pt").exists()


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    """A stopped 2-process run continued by one process: one line, exit 2, the resume point kept."""
    recipe = {**RECIPE, "prune": {"rounds": [{"criterion": "threshold", "quality": 0.6, "epochs": 1}]}}
    path = write(tmp_path, recipe)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun("run", str(path), "--run-dir", str(run_dir)), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(proc, lambda: logged(run_dir, event="epoch", phase="dense"), "the first dense epoch")
    finally:
        kill_all(proc, str(run_dir))
    assert (run_dir / ".prunet-progress.pt").is_file()
    done = subprocess.run(single("run", "--resume", str(run_dir)), capture_output=True, text=True, cwd=tmp_path,
                          env=env(), timeout=120)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "was started with 2 processes; resume it with the same number (this is 1)" in err[0]
    assert (run_dir / ".prunet-progress.pt").is_file()


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_the_processes_is_one_line(tmp_path):
    recipe = {**RECIPE, "data": {**RECIPE["data"], "batch_size": 63}}
    path = write(tmp_path, recipe)
    done = subprocess.run(torchrun("run", str(path)), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=120)
    assert done.returncode != 0
    # Both ranks stop with exit 2 (torchrun then reports it); rank 0 says why, once, and neither has a traceback.
    assert done.stderr.count("prunet: error: data.batch_size: 63 does not split over 2 processes") == 1
    assert "exitcode  : 2" in done.stderr and f'File "{ROOT / "prunet"}' not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_factory_resnet_with_batch_norm_evaluates_as_its_saved_checkpoint(tmp_path):
    """Batch-norm statistics are rank 0's on every rank before evaluation: the reported accuracy is the saved model's."""
    from prunet.checkpoint import load_checkpoint
    from prunet.config import recipe_from_dict
    from prunet.data import load_data
    from prunet.train import Normalization, evaluate

    example = ROOT / "examples" / "resnet.py"
    recipe = {"name": "bn", "seed": 0, "threads": 1, "device": "cpu",
              "model": {"factory": f"{example}:resnet", "kwargs": {"depth": 8, "width": 8, "num_classes": 4}},
              "data": {"factory": f"{example}:synthetic_splits",
                       "kwargs": {"n_train": 512, "n_val": 128, "n_test": 128, "size": 12},
                       "val_size": 128, "batch_size": 64, "eval_batch_size": 64},
              "train": {"epochs": 2, "lr": 0.05},
              "prune": {"rounds": [{"criterion": "threshold", "quality": 0.6, "epochs": 1}]}}
    path = write(tmp_path, recipe)
    launch(torchrun("run", str(path), "--run-dir", str(tmp_path / "bn")), tmp_path)
    summary = json.loads((tmp_path / "bn" / "summary.json").read_text())
    model, _, _ = load_checkpoint(tmp_path / "bn" / "final.safetensors", trust_factory=True)
    data = load_data(recipe_from_dict(recipe).data)
    val_loss, val_acc = evaluate(model, data.val, Normalization(data.mean, data.std), 64)
    assert val_acc == summary["final"]["val_acc"]
    assert val_loss == pytest.approx(summary["final"]["val_loss"], rel=1e-5)  # the loss shows any other statistics
    a, b = summary["rounds"][0]["mask_digests"]
    assert a == b


@pytest.mark.slow
def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path):
    done = subprocess.run(torchrun("report", str(tmp_path)), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("prunet: error: report runs in one process; start it without torchrun") == 1
    assert "rank 1:" not in done.stderr


@pytest.mark.slow
def test_a_diverging_two_process_run_stops_on_every_rank_with_one_line(tmp_path):
    """The loss is summed over the ranks before each step: both stop at the same step, rank 0 says why."""
    recipe = {**RECIPE, "train": {"epochs": 1, "lr": 1e8}}
    path = write(tmp_path, recipe)
    done = subprocess.run(torchrun("run", str(path)), capture_output=True, text=True, cwd=tmp_path, env=env(),
                          timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("prunet: error: train.lr: the training loss became") == 1
    assert "rank 1" not in done.stderr.split("torch.distributed")[0] and "exitcode  : 2" in done.stderr
