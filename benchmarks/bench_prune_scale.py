"""One prune step over VGG-16's 138M weights on this machine: time and the whole process's peak memory.

Run with ``make bench`` (or ``python benchmarks/bench_prune_scale.py``). Each
case runs in a fresh process (peak memory is the process's high-water mark,
``ru_maxrss``), one after the other:

* ``model``: building VGG-16 alone (the floor every case starts from);
* ``pruner``: the model and ``Pruner(model)`` (its float32 mask buffers);
* ``threshold``: ``Pruner(vgg16).prune(Threshold(1.0))``, the paper's rule;
* ``global``: ``Pruner(vgg16).prune(GlobalMagnitude(0.925))``;
* ``target``: ``Pruner(vgg16).prune(TargetThreshold(13))``, the σ rule at a target;
* ``torch-global``: ``torch.nn.utils.prune.global_unstructured`` (L1) to 92.5% on the same model.

The time is the prune call's alone; results go to ``benchmarks/results/bench_prune_scale.json``.
Targets (issue #10): at most 3 s and 1.5 GB peak for ``threshold`` and ``global``.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("model", "pruner", "threshold", "global", "target", "torch-global")
TARGET_SECONDS, TARGET_GB = 3.0, 1.5


def one(case: str) -> dict:
    """Run ``case`` in this process; return its seconds and this process's peak memory."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn as nn
    import torch.nn.utils.prune as tprune

    from prunet import GlobalMagnitude, Pruner, TargetThreshold, Threshold, create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model("vgg16")
    seconds = None
    if case == "torch-global":
        params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        start = time.perf_counter()
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.925)
        seconds = time.perf_counter() - start
    elif case != "model":
        pruner = Pruner(model)
        criterion = {"threshold": Threshold(1.0), "global": GlobalMagnitude(0.925), "target": TargetThreshold(13.0)}
        if case in criterion:
            start = time.perf_counter()
            pruner.prune(criterion[case])
            seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"case": case, "seconds": seconds, "peak_bytes": peak}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(one(sys.argv[2])))
        return 0
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        took = f"{row['seconds']:.2f} s" if row["seconds"] is not None else "-"
        print(f"{case:<13} prune {took:>8}   peak {row['peak_bytes'] / 1e9:.2f} GB")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "targets": {"seconds": TARGET_SECONDS, "peak_gb": TARGET_GB},
        "rows": rows,
    }
    path = ROOT / "benchmarks" / "results" / "bench_prune_scale.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
