"""Shared fixtures: a tiny recipe, a small slice of real Fashion-MNIST, seeded models and batches.

Real data is read once per session (decompressing the IDX files takes a few
seconds) and handed out as small splits; tests that need it are skipped when
the ``dataset-fashion-mnist`` package is not installed.

The suite runs torch on one thread: its models are tiny, and on a busy two-core
machine two intra-op threads spinning against other processes make a training
step tens of times slower (8 s instead of 0.2 s for 50 LeNet steps).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import prunet.data.datasets
from prunet.data import DatasetSplits, Split, load_dataset
from prunet.models import create_model

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")

# A recipe small enough to run end to end in a few seconds on two cores.
TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "lenet_300_100"},
    "data": {
        "dataset": "fashion-mnist",
        "data_dir": str(REAL_FASHION),
        "val_size": 500,
        "train_subset": 1000,
        "batch_size": 64,
        "eval_batch_size": 1000,
    },
    "train": {"epochs": 1, "lr": 0.05, "optimizer": "sgd", "lr_schedule": "constant"},
    "prune": {
        "lr_fraction": 0.1,
        "rounds": [
            {"criterion": "threshold", "quality": {"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}, "epochs": 1},
            {"criterion": "threshold", "quality": {"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}, "epochs": 1},
        ],
    },
}


def logged(run_dir: str | Path, **fields) -> bool:
    """Whether the run in ``run_dir`` has appended a ``metrics.jsonl`` line holding ``fields``.

    The pipeline appends one JSON object per line as it goes (``{"event": "epoch", "phase":
    "round1", "epoch": 1, ...}``); a line still being written (no newline yet) does not count.
    Example: ``logged(folder, event="epoch", phase="round1")``.
    """
    metrics = Path(run_dir) / "metrics.jsonl"
    text = metrics.read_text() if metrics.is_file() else ""
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            record = json.loads(line)
            if all(record.get(k) == v for k, v in fields.items()):
                return True
    return False


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Return once ``condition()`` holds while ``proc`` runs; fail if ``proc`` exits first.

    Tests that stop a run part-way wait on what the run writes (see :func:`logged`), never on
    time: ``timeout`` only stops a run that never gets there, and is generous for a busy machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # looked at before the condition: a run that got there and ended passes
        if condition():
            return
        if exited:
            err = proc.stderr.read() if proc.stderr else b""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            pytest.fail(f"the run exited ({proc.returncode}) before {what}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not reach {what} in {timeout:.0f} s")
        time.sleep(0.01)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_plan_cache(monkeypatch):
    """sparsify times afresh in every test (and in the commands tests start) unless a test asks for a cache:
    a plan kept by one test would decide another's, and the user's own cache is not the tests' to write."""
    monkeypatch.setenv("PRUNET_PLAN_CACHE", "off")


@pytest.fixture
def tiny_recipe(tmp_path) -> dict:
    """A fresh copy of :data:`TINY_RECIPE` writing under ``tmp_path``; edit it freely."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["output_dir"] = str(tmp_path / "runs")
    return recipe


_LOADED: dict[tuple, DatasetSplits] = {}


def cached_load_dataset(name, data_dir=None, val_size=5000, seed=0, download=True) -> DatasetSplits:
    """``load_dataset`` memoised per arguments; each call gets its own ``DatasetSplits`` (callers reassign splits)."""
    key = (name, str(data_dir), val_size, seed)
    if key not in _LOADED:
        _LOADED[key] = load_dataset(name, data_dir=data_dir, val_size=val_size, seed=seed, download=download)
    return dataclasses.replace(_LOADED[key])


def use_data_cache(mp: pytest.MonkeyPatch) -> None:
    """Make ``prunet.data.load_data`` (the pipeline, the report, the CLI) read each dataset once per session."""
    mp.setattr(prunet.data.datasets, "load_dataset", cached_load_dataset)


@pytest.fixture
def fast_data(monkeypatch):
    """Every run in the test reads the dataset from the session's cache."""
    if not REAL_FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    use_data_cache(monkeypatch)


@pytest.fixture(scope="session")
def fashion() -> DatasetSplits:
    """Real Fashion-MNIST cut down: 1000 training, 500 validation and 1000 test images."""
    if not REAL_FASHION.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    full = cached_load_dataset("fashion-mnist", data_dir=str(REAL_FASHION), val_size=500, seed=0)
    return dataclasses.replace(
        full,
        train=Split(full.train.images[:1000], full.train.labels[:1000]),
        test=Split(full.test.images[:1000], full.test.labels[:1000]),
    )


@pytest.fixture
def lenet():
    """``lenet()`` -> a LeNet-300-100 initialised from ``seed`` (default 0)."""

    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return create_model("lenet_300_100", **kwargs)

    return make


@pytest.fixture
def mnist_batch():
    """``mnist_batch(n, seed)`` -> random (x, y): x (n, 1, 28, 28), y (n,) labels in 0..9."""

    def make(n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    return make


@pytest.fixture
def figures():
    """``figures(fig)`` -> fig, closed after the test. The plot functions draw without pyplot, so
    none of their figures may show up in pyplot's list (where a long session would pile them up)."""
    import matplotlib.pyplot as plt

    made = []
    yield lambda fig: made.append(fig) or fig
    open_in_pyplot = plt.get_fignums()
    for fig in made:
        plt.close(fig)
    assert open_in_pyplot == []
