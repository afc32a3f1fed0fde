"""File size at each stage of Deep Compression: dense float32, pruned (compact), weight-shared + Huffman.

Run with ``make bench`` (or ``python benchmarks/bench_compress.py``):

* the demo's LeNet-300-100 and the LeNet-5 run (``runs/lenet300_fashion``,
  ``runs/lenet5_fashion``) when those run folders exist: their ``dense.safetensors``,
  ``final.prunet``, and at a few bit widths ``prunet export --quantized`` (no retraining)
  and the recipe's ``quantize`` phase (centroids retrained 2 epochs), with validation
  and test accuracy (validation chooses, test is reported);
* AlexNet and VGG-16 with random weights pruned to the paper's per-layer rates
  (``paper_sparsity``), shared at Deep Compression's bits (conv 8, fc 5), against
  its published 6.9 MB and 11.3 MB (240 MB and 552 MB dense).

Results go to ``benchmarks/results/bench_compress.json``; ``make results`` puts them in RESULTS.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunet import Pruner, create_model  # noqa: E402
from prunet.checkpoint import save_checkpoint  # noqa: E402
from prunet.data import load_dataset  # noqa: E402
from prunet.models import paper_sparsity  # noqa: E402
from prunet.checkpoint import load_checkpoint  # noqa: E402
from prunet.config import QuantizeConfig  # noqa: E402
from prunet.phases import retrain_shared, write_shared  # noqa: E402
from prunet.runfolder import Run  # noqa: E402
from prunet.sparse import export, huffman, load  # noqa: E402
from prunet.train import FitOptions  # noqa: E402
from prunet.train import Normalization, evaluate  # noqa: E402

RETRAIN_EPOCHS = 2  # the recipe's quantize phase: centroids retrained this long, at its default rate
PUBLISHED = {"alexnet": (240e6, 6.9e6), "vgg16": (552e6, 11.3e6)}  # Deep Compression, Table 1 (bytes)
RUNS = {"lenet_300_100": ("runs/lenet300_fashion", "fc3"), "lenet_5": ("runs/lenet5_fashion", "fc2")}


def bit_widths(last: str) -> list[dict]:
    """The bit widths tried on a LeNet (``last``: its output layer, given a bit more)."""
    return [{"fc": 5, "conv": 8}, {"fc": 4, "conv": 8}, {"fc": 4, last: 5, "conv": 6}, {"fc": 3, last: 5, "conv": 6},
            {"fc": 3, "conv": 6}]


def lenets(log) -> list[dict]:
    rows = []
    data = None
    for model, (folder, last) in RUNS.items():
        folder = ROOT / folder
        if not (folder / "final.safetensors").is_file():
            log(f"{model}: no {folder}/final.safetensors; skipped")
            continue
        data = data or load_dataset("fashion-mnist", val_size=5000, seed=0)
        norm = Normalization(data.mean, data.std)
        dense = (folder / "dense.safetensors").stat().st_size
        pruned_model = load(folder / "final.prunet")
        summary = json.loads((folder / "summary.json").read_text())
        row = {"model": model, "dense_bytes": dense, "pruned_bytes": (folder / "final.prunet").stat().st_size,
               "dense_val_acc": summary["dense"]["val_acc"], "dense_test_acc": summary["dense"]["test_acc"],
               "pruned_val_acc": evaluate(pruned_model, data.val, norm)[1],
               "pruned_test_acc": evaluate(pruned_model, data.test, norm)[1], "shared": []}
        with tempfile.TemporaryDirectory() as tmp:
            for bits in bit_widths(last):
                out = Path(tmp) / "q.prunet"
                done = export(folder, out, quantize=bits)
                shared = load(out)
                val, acc = evaluate(shared, data.val, norm)[1], evaluate(shared, data.test, norm)[1]
                row["shared"].append({"bits": bits, "bytes": done.bytes, "val_acc": val, "test_acc": acc,
                                      "streams": stream_efficiency(out), "retrained": False})
                log(f"{model} {bits}: {done.bytes:,} bytes ({dense / done.bytes:.1f}x), val {val:.2f}%, test {acc:.2f}%")
                row["shared"].append(retrained(folder, bits, data, norm, Path(tmp) / "r.prunet", log))
        rows.append(row)
    return rows


def retrained(folder: Path, bits: dict, data, norm, out: Path, log) -> dict:
    """The recipe's ``quantize`` phase on the run's final model: shared, centroids retrained, written."""
    recipe = Run(folder).recipe
    model, pruner, meta = load_checkpoint(folder / "final.safetensors")
    q = QuantizeConfig(bits=bits, epochs=RETRAIN_EPOCHS)
    cfg = recipe.retrain_config(q.epochs, q.lr_fraction)
    shared = retrain_shared(model, pruner.masks, bits, cfg, data, norm,
                            FitOptions(seed=recipe.seed + 1000, batch_size=recipe.data.batch_size))
    val, acc = evaluate(shared, data.val, norm)[1], evaluate(shared, data.test, norm)[1]
    size = write_shared(out, shared, meta, pruner.masks)[0].stat().st_size
    log(f"  retrained {RETRAIN_EPOCHS} epochs: {size:,} bytes, val {val:.2f}%, test {acc:.2f}%")
    return {"bits": bits, "bytes": size, "val_acc": val, "test_acc": acc, "streams": stream_efficiency(out),
            "retrained": True}


def stream_efficiency(path: Path) -> dict[str, float]:
    """Bytes of all Huffman streams in a compact file against their empirical entropy (the bound)."""
    tensors = load_file(str(path))
    stored = entropy = 0.0
    for name in [k[: -len(".meta")] for k in tensors if k.endswith(".meta")]:
        bits, n_codes, survivors = (int(v) for v in tensors[f"{name}.meta"])
        for stream, count in (("clusters", survivors), ("index", n_codes)):
            lengths = tensors[f"{name}.{stream}_lengths"].numpy()
            symbols = huffman.decode(tensors[f"{name}.{stream}"].numpy().tobytes(), lengths, count)
            stored += tensors[f"{name}.{stream}"].numel()
            entropy += huffman.entropy_bits(np.bincount(symbols, minlength=lengths.size)) / 8
    return {"stream_bytes": stored, "entropy_bytes": entropy, "overhead": stored / entropy - 1 if entropy else 0.0}


def paper_nets(log) -> list[dict]:
    rows = []
    for name, (dense_pub, shared_pub) in PUBLISHED.items():
        torch.manual_seed(0)
        model = create_model(name)
        Pruner(model).prune(paper_sparsity(name))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "final.safetensors"
            save_checkpoint(ckpt, model, {"model": name, "model_kwargs": {}})
            dense = sum(4 * p.numel() for p in create_model(name).parameters())
            start = time.perf_counter()
            pruned = export(ckpt, Path(tmp) / "p.prunet").bytes
            shared = export(ckpt, Path(tmp) / "q.prunet", quantize={"conv": 8, "fc": 5}).bytes
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load(Path(tmp) / "q.prunet")  # Huffman decoding of every shared layer
            load_seconds = time.perf_counter() - start
            del loaded
        rows.append({"model": name, "dense_bytes": dense, "pruned_bytes": pruned, "shared_bytes": shared,
                     "published_dense": dense_pub, "published_shared": shared_pub, "seconds": seconds,
                     "load_seconds": load_seconds})
        log(f"{name}: dense {dense / 1e6:.1f} MB, pruned {pruned / 1e6:.2f} MB, shared {shared / 1e6:.2f} MB "
            f"(published {shared_pub / 1e6:.1f} MB), export {seconds:.0f} s, load {load_seconds:.1f} s")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``--paper-only``: measure AlexNet and VGG-16 again, keep the LeNet rows of the last full run."""
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = ROOT / "benchmarks" / "results" / "bench_compress.json"
    if "--paper-only" in argv and path.is_file():
        result = {"lenets": json.loads(path.read_text())["lenets"], "paper": paper_nets(print)}
    else:
        result = {"lenets": lenets(print), "paper": paper_nets(print)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
