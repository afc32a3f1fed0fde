"""prunet against the common baseline, side by side, from the same dense models: accuracy at fixed compressions.

Run with ``make bench`` (``--quick``: one seed of LeNet-300-100 on part of the
data, a few minutes) or ``python benchmarks/bench_reproduce.py`` (the full run:
LeNet-300-100 with 3 seeds and LeNet-5 with 1, Fashion-MNIST, about an hour on
2 cores). Every method starts from the **same dense checkpoint** of its seed,
uses the same data split (validation chooses, test is only reported), the same
training loop (``prunet.train.fit``), batch size, learning rate and epochs:

* ``prunet``: the paper's ladder, each step a :class:`prunet.TargetThreshold`
  (per-layer threshold = quality × std of the survivors, the last layer at half
  the others' relative quality, one factor found for the target), then fine-tuning.
* ``torch-global-l1``: ``torch.nn.utils.prune.global_unstructured`` with
  ``L1Unstructured``, pruned iteratively to the same compressions, fine-tuned alike.
* ``prunet-distill``: ``prunet`` retrained with distillation from the dense model
  (its logits as soft targets, alpha 0.5, T 4); ``prunet-lr0.1``: ``prunet`` fine-tuned at
  a tenth of the learning rate instead of rewinding it to the dense rate.
* ``gmp-global``: gradual magnitude pruning (Zhu & Gupta's cubic schedule, one
  global magnitude cut every 50 steps), a separate run from dense for each
  compression, given the epochs the ladders spend to reach it (the sparsity
  rises over 3/4 of them).

For each compression (4, 8, 12, 25, 50x) the test accuracy (mean ± std over
seeds) and the validation accuracy, and per method the largest compression
whose validation accuracy stays within 0.5 points of dense. Results go to
``benchmarks/results/bench_reproduce.json`` (``--quick``: ``bench_reproduce_quick.json``);
``python benchmarks/make_results.py`` writes RESULTS.md from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunet import Pruner, TargetThreshold, create_model  # noqa: E402
from prunet.config import TrainConfig  # noqa: E402
from prunet.data import Split, load_dataset, num_batches  # noqa: E402
from prunet.schedule import PruningSchedule, gradual_events  # noqa: E402
from prunet.train import FitOptions, Normalization, evaluate, fit  # noqa: E402

COMPRESSIONS = (4.0, 8.0, 12.0, 25.0, 50.0)
WITHIN = 0.5  # points of validation accuracy below dense that still count as "no loss"
METHODS = ("prunet", "torch-global-l1", "gmp-global", "prunet-distill", "prunet-lr0.1")

FULL = {
    "lenet_300_100": {"seeds": [0, 1, 2], "dense_epochs": 30, "epochs": 4, "relative": {"fc": 1.0, "fc3": 0.5}},
    "lenet_5": {"seeds": [0], "dense_epochs": 15, "epochs": 3, "relative": {"conv": 1.0, "fc": 1.0, "fc2": 0.5}},
}
QUICK = {"lenet_300_100": {"seeds": [0], "dense_epochs": 6, "epochs": 1, "relative": {"fc": 1.0, "fc3": 0.5},
                           "train_subset": 15000}}
LR, BATCH = 0.05, 64
DENSE_CFG = dict(optimizer="sgd", momentum=0.9, regularization="l2", reg_strength=5e-4, lr_schedule="cosine")


def train_cfg(epochs: int, lr_fraction: float = 1.0) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=LR * lr_fraction, **DENSE_CFG)


def accuracies(model: nn.Module, data, norm: Normalization) -> dict[str, float]:
    return {"val_acc": evaluate(model, data.val, norm)[1], "test_acc": evaluate(model, data.test, norm)[1]}


def kept_fraction(model: nn.Module) -> tuple[int, int]:
    """(weights, non-zero weights) of the Linear/Conv weights, however they are masked."""
    total = kept = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight
            total += w.numel()
            kept += int((w != 0).sum())
    return total, kept


def ladder_prunet(model, data, norm, spec, seed, log, method="prunet", teacher=None, lr_fraction=1.0):
    pruner = Pruner(model)
    points = []
    for i, c in enumerate(COMPRESSIONS, start=1):
        pruner.prune(TargetThreshold(c, spec["relative"]))
        fit(model, data.train, data.val, train_cfg(spec["epochs"], lr_fraction), norm, FitOptions(
            batch_size=BATCH, seed=seed + i, pruner=pruner, phase=f"{method} {c:g}x", teacher=teacher))
        points.append(point(model, data, norm, c, log, method))
    return points


def ladder_torch(model, data, norm, spec, seed, log):
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(m.weight.numel() for m, _ in params)
    points = []
    for i, c in enumerate(COMPRESSIONS, start=1):
        _, kept = kept_fraction(model)
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=kept - round(total / c))
        fit(model, data.train, data.val, train_cfg(spec["epochs"]), norm, FitOptions(
            batch_size=BATCH, seed=seed + i, phase=f"torch {c:g}x"))
        points.append(point(model, data, norm, c, log, "torch-global-l1"))
    return points


def gmp(dense_state, data, norm, spec, seed, log, name):
    points = []
    steps = num_batches(len(data.train), BATCH)
    for i, c in enumerate(COMPRESSIONS, start=1):
        model = create_model(name)
        model.load_state_dict(dense_state)
        pruner = Pruner(model)
        epochs = i * spec["epochs"]  # what the ladders spent to get here
        end = round(0.75 * epochs * steps)
        schedule = PruningSchedule(pruner, gradual_events(0, end, 50, 0.0, 1 - 1 / c, "global"))
        fit(model, data.train, data.val, train_cfg(epochs), norm, FitOptions(
            batch_size=BATCH, seed=seed + 100 + i, pruner=pruner, on_step=schedule.advance_to,
            choose_after=math.ceil(0.75 * epochs), phase=f"gmp {c:g}x"))
        points.append(point(model, data, norm, c, log, "gmp-global"))
    return points


def point(model, data, norm, c, log, method) -> dict:
    total, kept = kept_fraction(model)
    acc = accuracies(model, data, norm)
    log(f"  {method:<16} {c:>4g}x (actual {total / kept:.2f}x): val {acc['val_acc']:.2f}  test {acc['test_acc']:.2f}")
    return {"target": c, "compression": total / kept, **acc}


def splits(spec: dict):
    """Fashion-MNIST with 5,000 validation images (the training images cut to ``train_subset``), and its norm."""
    data = load_dataset("fashion-mnist", val_size=5000, seed=0)
    if spec.get("train_subset"):
        data.train = Split(data.train.images[: spec["train_subset"]], data.train.labels[: spec["train_subset"]])
    return data, Normalization(data.mean, data.std)


def dense_of(name: str, data, norm, spec: dict, seed: int, log) -> tuple[dict, dict]:
    """The dense model every method of a seed starts from: its state dict, and its accuracies and time."""
    torch.manual_seed(seed)
    dense_model = create_model(name)
    t = time.perf_counter()
    fit(dense_model, data.train, data.val, train_cfg(spec["dense_epochs"]), norm, FitOptions(
        batch_size=BATCH, seed=seed, phase="dense"))
    dense = {**accuracies(dense_model, data, norm), "seconds": time.perf_counter() - t}
    log(f"{name} seed {seed}: dense val {dense['val_acc']:.2f}  test {dense['test_acc']:.2f}")
    return copy.deepcopy(dense_model.state_dict()), dense


def run_model(name: str, spec: dict, log) -> dict:
    data, norm = splits(spec)
    seeds = []
    for seed in spec["seeds"]:
        state, dense = dense_of(name, data, norm, spec, seed, log)
        result = {"seed": seed, "dense": dense, "methods": {}}
        for method in METHODS:
            t = time.perf_counter()
            model = create_model(name)
            model.load_state_dict(state)
            if method == "gmp-global":
                points = gmp(state, data, norm, spec, seed, log, name)
            elif method == "torch-global-l1":
                points = ladder_torch(model, data, norm, spec, seed, log)
            elif method == "prunet-distill":
                teacher = create_model(name)
                teacher.load_state_dict(state)
                points = ladder_prunet(model, data, norm, spec, seed, log, method, teacher=teacher.requires_grad_(False))
            else:
                points = ladder_prunet(model, data, norm, spec, seed, log, method,
                                       lr_fraction=0.1 if method == "prunet-lr0.1" else 1.0)
            result["methods"][method] = {"points": points, "seconds": time.perf_counter() - t}
        seeds.append(result)
    return {"model": name, "spec": spec, "seeds": seeds, "summary": summarise(seeds)}


def summarise(seeds: list[dict]) -> dict:
    """Per method and compression: test accuracy mean ± std, validation mean; the largest compression within 0.5."""
    out = {}
    dense_test = [s["dense"]["test_acc"] for s in seeds]
    for method in METHODS:
        rows = []
        for k, c in enumerate(COMPRESSIONS):
            test = [s["methods"][method]["points"][k]["test_acc"] for s in seeds]
            val = [s["methods"][method]["points"][k]["val_acc"] for s in seeds]
            # Paired with the same seed's prunet run: the difference's mean and spread.
            diff = [s["methods"]["prunet"]["points"][k]["test_acc"] - t for s, t in zip(seeds, test)]
            rows.append({"target": c, "test_mean": statistics.mean(test),
                         "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                         "val_mean": statistics.mean(val), "prunet_minus_this": statistics.mean(diff)})
        best = []
        for s in seeds:
            ok = [p for p in s["methods"][method]["points"] if p["val_acc"] >= s["dense"]["val_acc"] - WITHIN]
            best.append({"compression": ok[-1]["target"] if ok else None, "test_acc": ok[-1]["test_acc"] if ok else None})
        out[method] = {"points": rows, "largest_within": best,
                       "seconds": statistics.mean(s["methods"][method]["seconds"] for s in seeds)}
    out["dense_test_mean"] = statistics.mean(dense_test)
    return out


def machine() -> dict:
    """Where a benchmark ran, for its results file."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed of LeNet-300-100 on 15,000 images")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/bench_reproduce*.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_reproduce{'_quick' if args.quick else ''}.json"
    started = time.perf_counter()
    models = [run_model(name, spec, print) for name, spec in (QUICK if args.quick else FULL).items()]
    report = {
        "quick": args.quick,
        "compressions": COMPRESSIONS,
        "within_points": WITHIN,
        "lr": LR, "batch_size": BATCH, "train": DENSE_CFG,
        "machine": machine(),
        "command": "python benchmarks/bench_reproduce.py" + (" --quick" if args.quick else ""),
        "seconds": time.perf_counter() - started,
        "models": models,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
