"""Where a run computes, side by side: one process against torchrun, in-memory batches against a DataLoader.

Run with ``make bench`` (or ``python benchmarks/bench_ddp.py``). Each case is ``prunet train`` of
LeNet-300-100 on Fashion-MNIST (55,000 training images) for ``EPOCHS`` epochs, in a fresh
process (or torchrun's processes), and reports the mean epoch time from ``metrics.jsonl``
(training plus the validation pass) with the final validation accuracy:

* one process, 2 threads (the IDX data batched from memory);
* torchrun with 2 processes of 1 thread, gloo (each takes half of every batch of 64);
* one process reading the same images through a ``DataLoader`` (``examples/resnet.py:fashion_splits``
  at 28x28, a ``torch.utils.data.Dataset`` that builds each example in Python), with 0 and 2 workers.

CUDA cases run only where there is a GPU. Results go to ``benchmarks/results/bench_ddp.json``;
``make results`` puts them in RESULTS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from prunet.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2


def recipe(out: Path, **changes) -> dict:
    r = {"name": "bench", "seed": 0, "output_dir": str(out), "threads": 2, "model": {"name": "lenet_300_100"},
         "data": {"dataset": "fashion-mnist", "batch_size": 64}, "train": {"epochs": EPOCHS, "lr": 0.05},
         "device": "cpu"}
    for key, value in changes.items():
        set_dotted(r, key, value)
    return r


def case(name: str, tmp: Path, launcher: list[str], **changes) -> dict:
    folder = tmp / name
    folder.mkdir()
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(folder, **changes)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRUNET_NO_DOWNLOAD": "1"}
    done = subprocess.run([*launcher, "-m", "prunet", "train", str(path), "--run-dir", str(folder / "run")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    row = {"case": name, "epoch_seconds": sum(x["seconds"] for x in epochs) / len(epochs),
           "val_acc": epochs[-1]["val_acc"]}
    print(f"{name}: {row['epoch_seconds']:.1f} s an epoch, val {row['val_acc']:.2f}%", flush=True)
    return row


def main() -> int:
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    loader = {"data.factory": "examples/resnet.py:fashion_splits", "data.kwargs": {"size": 28, "val_size": 5000}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(case("one process, 2 threads", tmp, python))
        rows.append(case("torchrun, 2 processes x 1 thread (gloo)", tmp, torchrun, threads=1))
        rows.append(case("one process, DataLoader, 0 workers", tmp, python, **loader))
        rows.append(case("one process, DataLoader, 2 workers", tmp, python, **loader, **{"data.workers": 2}))
        if torch.cuda.is_available():
            rows.append(case("one GPU", tmp, python, device="cuda"))
            rows.append(case("one GPU, fp16", tmp, python, device="cuda", **{"train.amp": "fp16"}))
    out = {"machine": {"processor": platform.processor() or platform.machine(), "threads": os.cpu_count(),
                       "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else None}, "epochs": EPOCHS, "rows": rows}
    path = ROOT / "benchmarks" / "results" / "bench_ddp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
