"""Cost of a masked training step: prunet's masks vs dense vs torch.nn.utils.prune.

Run with ``make bench``. For each model, three copies train side by side on the
same batches, their steps interleaved so that machine noise hits all three
alike: a dense model, the model with prunet masks (90% pruned, enforced by
gradient hooks and the global optimizer step hooks), and the model with
``torch.nn.utils.prune`` (forward pre-hooks recomputing ``weight = orig * mask``).
The result is the ratio of median step times, written to
``benchmarks/results/bench_masks.json``; the target is prunet <= 1.03x dense at batch 64, <= 1.02x at 256.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as tprune

import prunet

RESULTS = Path(__file__).parent / "results" / "bench_masks.json"
SPARSITY = 0.9


def make_variants(name: str, seed: int = 0) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    variants = {}
    for kind in ("dense", "prunet", "torch.prune"):
        torch.manual_seed(seed)
        model = prunet.create_model(name)
        if kind == "prunet":
            pruner = prunet.Pruner(model)
            pruner.prune(prunet.Sparsity(SPARSITY))
        elif kind == "torch.prune":
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    tprune.l1_unstructured(m, "weight", amount=SPARSITY)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if kind == "prunet":
            pruner.attach(opt)
        variants[kind] = (model, opt)
    return variants


# Wall time; ``--cpu-clock`` (one thread only) takes this thread's CPU time instead, which a busy
# machine's other processes do not stretch (they still share its caches).
CLOCK = [time.perf_counter]


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = CLOCK[0]()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return CLOCK[0]() - start


def bench_model(name: str, batch_size: int, steps: int, warmup: int = 20) -> dict:
    info = prunet.models.get_model_info(name)
    variants = make_variants(name)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, batch_size, *info.input_shape, generator=g)
    ys = torch.randint(0, 10, (8, batch_size), generator=g)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        x, y = xs[i % 8], ys[i % 8]
        order = list(variants) if i % 2 == 0 else list(reversed(variants))  # no fixed position advantage
        for kind in order:
            t = step(*variants[kind], x, y)
            if i >= warmup:
                times[kind].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "batch_size": batch_size,
        "steps": steps,
        "median_step_ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_vs_dense": {k: med[k] / med["dense"] for k in med},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time each step by this thread's CPU time (needs --threads 1): for a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_clock:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-clock needs --threads 1 (other threads' time is not counted)")
        CLOCK[0] = time.thread_time
    torch.manual_seed(0)
    cases = [("lenet_300_100", 64, 400), ("lenet_300_100", 256, 200), ("lenet_5", 64, 150)]
    results = []
    for name, bs, steps in cases:
        r = bench_model(name, bs, steps)
        results.append(r)
        ratios = ", ".join(f"{k} {v:.3f}x" for k, v in r["ratio_vs_dense"].items())
        ms = r["median_step_ms"]["dense"]
        print(f"{name:<14} batch {bs:>4}: dense {ms:.2f} ms/step; {ratios}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "masked training step cost",
        "sparsity": SPARSITY,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "thread CPU time" if args.cpu_clock else "wall",
        "machine": platform.machine(),
        "results": results,
    }, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
