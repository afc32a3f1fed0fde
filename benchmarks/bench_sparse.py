"""What pruning buys at inference: file size and latency, dense vs sparse, side by side in one run.

Run with ``make bench`` (or ``python benchmarks/bench_sparse.py``). Two parts:

* **Size.** For each pruned model, the dense float32 safetensors file, prunet's
  compact file, and the entropy bound on the compact file (float32 values plus
  ``H(d)/d`` position bits per survivor plus the unpruned tensors); per layer,
  the index bits per survivor (fillers included) against ``H(d)/d``.
* **Latency.** One layer's forward pass at batch 1, 8 and 64: dense PyTorch,
  ``torch.sparse`` CSR, SciPy CSR (the yardsticks), prunet's native kernel
  (``prunet.sparse.native``: float32 values; and the same layer with its weights
  rounded to fp16, as a compact file with ``value_dtype="float16"`` holds them,
  and shared among 32 values, as a 5-bit quantized export does) and prunet (the
  path ``prunet.sparse.sparsify`` chooses for the layer: the native kernel, or
  dense where that is faster), on layers shaped like AlexNet fc6 (9216 -> 4096,
  9% kept) and VGG-16 fc6 (25088 -> 4096, 4% kept) with random weights, and on
  the demo model's layers; and whole models, dense against
  ``prunet.load(sparse=True)`` (for a LeNet, its layers fused into one native call).
  Each repetition times every method once, in alternating order, with the caches
  evicted before each call (as the other layers of a forward pass evict them),
  so machine noise falls on all alike; the medians are compared. Each model's plan is
  made five times in this process with the plan cache off (the timing rule alone), and
  once in each of five fresh processes sharing a new plan cache (as a user's later runs
  get it: the first process times, the others read its decisions); the runs that agree are counted.

``--threads N`` sets torch's thread count, which the native kernel follows too (on a
machine that other processes keep busy, a second thread can cost more than it gives: one
thread is the steadier measurement there).

The models: the demo's pruned LeNet-300-100 (``runs/lenet300_fashion``) and a
pruned LeNet-5 (``runs/lenet5_fashion``) when those run folders exist, else the
same networks with random weights at the demo's per-layer densities (said in
the output). Results go to ``benchmarks/results/bench_sparse.json``;
``python benchmarks/bench_sparse.py --table FILE.json`` prints the Markdown
tables of docs/benchmarks.md from such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scipy.sparse
import torch
import torch.nn as nn

import prunet
from prunet.checkpoint import load_checkpoint, save_checkpoint
from prunet.masks import get_mask, set_mask
from prunet.sparse import SparseLinear, export, load, native, plan, read_header, sparsify
from prunet.sparse.codec import entropy_bits_per_survivor
from prunet.sparse.compact import sparse_infos

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_sparse.json"
# Kept fractions of the demo's final models (README): what a random stand-in is pruned to.
DEMO_DENSITIES = {
    "lenet_300_100": {"fc1": 0.061, "fc2": 0.064, "fc3": 0.357},
    "lenet_5": {"conv1": 0.778, "conv2": 0.147, "fc1": 0.054, "fc2": 0.284},
}
RUNS = {"lenet_300_100": ROOT / "runs" / "lenet300_fashion", "lenet_5": ROOT / "runs" / "lenet5_fashion"}
LAYERS = [("alexnet_fc6", 9216, 4096, 0.09), ("vgg16_fc6", 25088, 4096, 0.04)]
# Issue 21, at batch 1: the native kernel's speed-up over dense, and over each of torch CSR and SciPy.
TARGETS = {"alexnet_fc6": (4.0, 1.5), "vgg16_fc6": (8.0, 1.5)}
BATCHES = (1, 8, 64)
MODEL_TARGET = ("lenet_300_100", 1, 1.5)  # the demo model, batch 1: prunet.load(sparse=True) over dense


def pruned_checkpoint(name: str, folder: Path) -> tuple[Path, str]:
    """The run folder's final checkpoint, or a random stand-in at the demo's densities."""
    final = RUNS[name] / "final.safetensors"
    if final.is_file():
        return final, f"trained and pruned ({RUNS[name].relative_to(ROOT)})"
    torch.manual_seed(0)
    model = prunet.create_model(name)
    pruner = prunet.Pruner(model)
    for layer in pruner.targets:
        keep = torch.rand(layer.weight.shape) < DEMO_DENSITIES[name][layer.layer]
        set_mask(layer.module, layer.attr, keep)
    path = folder / f"{name}.safetensors"
    save_checkpoint(path, model, {"model": name, "model_kwargs": {}})
    return path, "random weights at the demo's densities (no run folder)"


def size_of(name: str, folder: Path) -> dict:
    ckpt, origin = pruned_checkpoint(name, folder)
    model, pruner, meta = load_checkpoint(ckpt)
    dense = folder / f"{name}_dense.safetensors"
    save_checkpoint(dense, pruner.bake() if pruner else model, meta)  # dense float32, no masks
    compact = export(ckpt, folder / f"{name}.prunet")
    infos = sparse_infos(read_header(compact.path))
    layers, bound_bits = [], 0.0
    for param, info in infos.items():
        h = entropy_bits_per_survivor(info.size, info.survivors)
        bound_bits += info.survivors * (32 + h)
        layers.append({"tensor": param, "density": info.survivors / info.size, "bits": info.bits,
                       "index_bits_per_survivor": info.index_bits_per_survivor, "entropy_bits_per_survivor": h,
                       "ratio_to_bound": info.index_bits_per_survivor / h if h else None})
    sparse_names = set(infos)
    plain_bits = 8 * sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                         if k not in sparse_names and not k.endswith("_mask"))
    bound = (bound_bits + plain_bits) / 8
    return {"model": name, "weights": origin, "dense_bytes": dense.stat().st_size, "compact_bytes": compact.bytes,
            "bound_bytes": bound, "dense_over_compact": dense.stat().st_size / compact.bytes,
            "compact_over_bound": compact.bytes / bound, "layers": layers}


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs), in bytes; None where it reports none."""
    sizes, units = [], {"K": 2**10, "M": 2**20, "G": 2**30}
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


# Read before every timed call so that the call finds its weights in memory, not in the cache: twice the
# last-level cache, at least 64 MiB and at most 1 GiB. A virtual machine can report a cache of hundreds of
# MiB (shared with its host's other guests); there 64 MiB left part of a layer's sparse weights cached
# between calls and made the sparse product look up to a quarter faster than it is cold.
EVICT_BYTES = min(max(2 * (last_level_cache_bytes() or 0), 64 * 2**20), 2**30)
EVICT = torch.ones(EVICT_BYTES // 4)


def time_methods(methods: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each method, every repetition timing all of them in alternating order, caches cold."""
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(repeats):
        order = list(methods) if i % 2 == 0 else list(reversed(methods))
        for k in order:
            EVICT.sum()
            start = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def shared_weight(weight: torch.Tensor, levels: int = 32) -> torch.Tensor:
    """The survivors of ``weight`` shared among ``levels`` values spread over their range (as a 5-bit
    quantized export holds them; the codebook is linear here, not k-means: the speed does not depend on it)."""
    keep = weight != 0
    lo, hi = float(weight[keep].min()), float(weight[keep].max())
    table = torch.linspace(lo, hi, levels)
    return torch.where(keep, table[torch.bucketize(weight, (table[1:] + table[:-1]) / 2)], torch.zeros(()))


def linear_of(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False)
    linear.weight.copy_(weight)
    return linear.eval()


@torch.no_grad()
def latency_of(label: str, weight: torch.Tensor, batch: int, repeats: int) -> dict:
    out_f, in_f = weight.shape
    linear = linear_of(weight)
    x = torch.randn(batch, in_f)
    chosen = sparsify(nn.Sequential(linear), x)  # the path prunet chooses for this layer and batch
    ours = chosen[0]
    sp = scipy.sparse.csr_matrix(weight.numpy())
    xt = x.numpy().T.copy()  # (in, B) for SciPy
    methods = {"dense": linear, "torch_csr": SparseLinear(linear, use_native=False), "scipy_csr": lambda v: sp @ xt}
    references = {}
    if native.available():
        methods["native"] = SparseLinear(linear, use_native=True, values="f32")
        for kind, w in (("fp16", weight.half().float()), ("codebook", shared_weight(weight))):
            methods[f"native_{kind}"] = SparseLinear(linear_of(w), use_native=True, values=kind)
            references[f"native_{kind}"] = x @ w.t()  # its own weights: the dense product of those
    methods["prunet"] = ours
    ms = time_methods({k: (lambda fn=fn: fn(x)) for k, fn in methods.items()}, repeats)
    dense = linear(x)
    errors = {k: relative_error(methods[k](x), references.get(k, dense))
              for k in methods if k not in ("dense", "scipy_csr")}
    speedup = {k: ms["dense"] / v for k, v in ms.items()}
    ratios = {f"{k}_over_{base}": ms[base] / ms[k] for k in ms if k.startswith("native")
              for base in ("torch_csr", "scipy_csr")}
    return {"layer": label, "shape": [out_f, in_f], "density": float((weight != 0).float().mean()),
            "batch": batch, "ms": ms, "speedup_vs_dense": speedup, "native_ratios": ratios,
            "prunet_path": plan(chosen)["0"].split(" (")[0], "relative_error": errors}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """max |y - reference| over max |reference|: 1e-5 or less is what the tests hold every kernel to."""
    return float((y - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


PLAN_RUNS = 5  # sparsify runs per model and batch size whose plans are compared


@torch.no_grad()
def model_latency_of(name: str, ckpt: Path, batch: int, repeats: int) -> dict:
    """A whole model: dense (masks multiplied in) against prunet.load(sparse=True) for this batch size."""
    x = torch.randn(batch, *prunet.models.get_model_info(name).input_shape)
    dense = load(ckpt)
    sparse = load(ckpt, sparse=True, example_input=x)
    ms = time_methods({"dense": lambda: dense(x), "prunet": lambda: sparse(x)}, repeats)
    # The plan again, from scratch, PLAN_RUNS - 1 more times: the paths (the text before the reason) must agree.
    # In this process the plan cache is off: this is the timing rule alone.
    plans = [plan(sparse)] + [plan(load(ckpt, sparse=True, example_input=x)) for _ in range(PLAN_RUNS - 1)]
    cached = cached_plans(ckpt, tuple(x.shape))
    return {"model": name, "batch": batch, "ms": ms, "speedup_vs_dense": ms["dense"] / ms["prunet"],
            "plan": plans[0], "plans": plans, "same_plan": agreeing(plans), "cached_plans": cached,
            "same_plan_cached": agreeing(cached),
            "fused": type(sparse).__name__ == "SparseSequential", "relative_error": relative_error(sparse(x), dense(x))}


def agreeing(plans: list[dict]) -> int:
    """How many of ``plans`` give every layer the path most of them give (the text before the reason)."""
    paths = [json.dumps({k: v.split(" (")[0] for k, v in p.items()}) for p in plans]
    return max(paths.count(p) for p in paths)


PLAN_SCRIPT = """
import json, sys, torch
import prunet.sparse as sparse
torch.set_num_threads(int(sys.argv[3]))
shape = json.loads(sys.argv[2])
model = sparse.load(sys.argv[1], sparse=True, example_input=torch.randn(*shape))
print(json.dumps(sparse.plan(model)))
"""


def cached_plans(ckpt: Path, shape: tuple[int, ...]) -> list[dict]:
    """The plans of ``prunet.load(ckpt, sparse=True)`` in PLAN_RUNS fresh processes sharing a new plan cache,
    as a user's later runs on this machine get them: the first times each layer, the others read its decisions."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PRUNET_PLAN_CACHE": str(Path(tmp) / "plans.json")}
        runs = [subprocess.run([sys.executable, "-c", PLAN_SCRIPT, str(ckpt), json.dumps(shape),
                                str(torch.get_num_threads())], env=env, cwd=ROOT, capture_output=True, text=True,
                               check=True) for _ in range(PLAN_RUNS)]
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]


def main(repeats: int) -> dict:
    torch.manual_seed(0)
    results = {"benchmark": "sparse export and inference", "torch": torch.__version__, "scipy": scipy.__version__,
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "native": native.status(),
               "load_average": os.getloadavg(), "last_level_cache_bytes": last_level_cache_bytes(),
               "evict_bytes": EVICT_BYTES, "size": [], "latency": [], "models": []}
    print(f"native kernel: {native.status()}; torch threads {torch.get_num_threads()}; load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; caches evicted by reading {EVICT_BYTES / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lenet_300_100", "lenet_5"):
            r = size_of(name, Path(tmp))
            results["size"].append(r)
            print(f"size {name}: dense {r['dense_bytes']:,} B, compact {r['compact_bytes']:,} B "
                  f"({r['dense_over_compact']:.1f}x smaller), {r['compact_over_bound']:.3f}x the bound "
                  f"[{r['weights']}]")
        shapes = [(label, torch.randn(o, i) * (torch.rand(o, i) < d)) for label, i, o, d in LAYERS]
        ckpt, _ = pruned_checkpoint("lenet_300_100", Path(tmp))
        demo, _, _ = load_checkpoint(ckpt)
        shapes += [(f"lenet_300_100_{n}", getattr(demo, n).weight.detach() * get_mask(getattr(demo, n), "weight"))
                   for n in ("fc1", "fc2")]
        for label, weight in shapes:
            for batch in BATCHES:
                r = latency_of(label, weight, batch, repeats)
                results["latency"].append(r)
                s = r["speedup_vs_dense"]
                natives = ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in s.items() if k.startswith("native"))
                print(f"latency {label} batch {batch}: dense {r['ms']['dense']:.3f} ms; speed-up torch CSR "
                      f"{s['torch_csr']:.2f}x, SciPy {s['scipy_csr']:.2f}x, {natives or 'no native kernel'}, "
                      f"prunet ({r['prunet_path']}) {s['prunet']:.2f}x")
        for name in ("lenet_300_100", "lenet_5"):
            ckpt, origin = pruned_checkpoint(name, Path(tmp))
            for batch in BATCHES:
                r = model_latency_of(name, ckpt, batch, repeats)
                r["weights"] = origin
                results["models"].append(r)
                print(f"model {name} batch {batch}: dense {r['ms']['dense']:.3f} ms, prunet sparse "
                      f"{r['ms']['prunet']:.3f} ms ({r['speedup_vs_dense']:.2f}x); {r['plan']}; "
                      f"the same plan in {r['same_plan']} of {PLAN_RUNS} runs by the timing rule alone, "
                      f"{r['same_plan_cached']} of {PLAN_RUNS} processes with the plan cache")
    results["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {RESULTS}")
    return results


def verdict(r: dict) -> str:
    """Whether a layer at batch 1 meets issue 21's targets: native f32 over dense, and over torch CSR and SciPy."""
    target = TARGETS.get(r["layer"]) if r["batch"] == 1 else None
    if target is None:
        return ""
    s = r["speedup_vs_dense"]
    if "native" not in s:
        return "no native kernel"
    over = min(r["native_ratios"]["native_over_torch_csr"], r["native_ratios"]["native_over_scipy_csr"])
    met = s["native"] >= target[0] and over >= target[1]
    return f"≥ {target[0]}× dense, ≥ {target[1]}× both: {'met' if met else 'missed'} ({s['native']:.2f}×, {over:.2f}×)"


def tables(results: dict) -> str:
    """The Markdown tables of docs/benchmarks.md, from a results file."""
    lines = ["| model | weights | dense fp32 file | compact file | smaller | compact / entropy bound |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results["size"]:
        lines.append(f"| {r['model']} | {r['weights']} | {r['dense_bytes']:,} B | {r['compact_bytes']:,} B | "
                     f"{r['dense_over_compact']:.1f}× | {r['compact_over_bound']:.3f} |")
    lines += ["", "| model | tensor | kept | bits | index bits / survivor | H(d)/d | ratio (target ≤ 1.1) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["size"]:
        for layer in r["layers"]:
            ratio = layer["ratio_to_bound"]
            lines.append(f"| {r['model']} | {layer['tensor']} | {100 * layer['density']:.1f}% | {layer['bits']} | "
                         f"{layer['index_bits_per_survivor']:.2f} | {layer['entropy_bits_per_survivor']:.2f} | "
                         + (f"{ratio:.3f}" if ratio is not None else "–") + " |")
    lines += ["", "Speed-up over dense; the native kernel with float32 values, and with the same layer's weights "
                  "in fp16 and shared among 32 values (codebook).", "",
              "| layer | kept | batch | dense ms | torch CSR | SciPy CSR | native f32 | native fp16 | native codebook "
              "| prunet | prunet's path | target (native f32) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results["latency"]:
        s = r["speedup_vs_dense"]
        cell = {k: f"{s[k]:.2f}×" if k in s else "–" for k in ("native", "native_fp16", "native_codebook")}
        lines.append(f"| {r['layer']} | {100 * r['density']:.1f}% | {r['batch']} | {r['ms']['dense']:.3f} | "
                     f"{s['torch_csr']:.2f}× | {s['scipy_csr']:.2f}× | {cell['native']} | {cell['native_fp16']} | "
                     f"{cell['native_codebook']} | {s['prunet']:.2f}× | {r['prunet_path']} | {verdict(r)} |")
    lines += ["", "| model | weights | batch | dense ms | prunet sparse ms | speed-up | layers (why) | same plan: "
                  "timing rule | same plan: with the cache | target |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in results["models"]:
        layers = ", ".join(f"{k} {v}" for k, v in r["plan"].items())
        same = f"{r['same_plan']} of {len(r['plans'])}" if "plans" in r else "–"
        same += f" | {r['same_plan_cached']} of {len(r['cached_plans'])}" if "cached_plans" in r else " | –"
        name, batch, target = MODEL_TARGET
        goal = (f"≥ {target}×: {'met' if r['speedup_vs_dense'] >= target else 'missed'}"
                if (r["model"], r["batch"]) == (name, batch) else "")
        lines.append(f"| {r['model']} | {r['weights']} | {r['batch']} | {r['ms']['dense']:.3f} | "
                     f"{r['ms']['prunet']:.3f} | {r['speedup_vs_dense']:.2f}× | {layers} | {same} | {goal} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed repetitions per method (default 40)")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown tables of a results file and exit")
    parser.add_argument("--threads", type=int, help="torch's (and the native kernel's) threads (default torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["PRUNET_PLAN_CACHE"] = "off"  # in this process: every plan from the timing rule alone
    if args.table:
        sys.stdout.write(tables(json.loads(Path(args.table).read_text())))
    else:
        sys.stdout.write("\n" + tables(main(args.repeats)))
