"""A character-level language model pruned: prunet beside ``torch.nn.utils.prune``, in bits per character.

Run with ``make bench`` or ``python benchmarks/bench_lm.py`` (about 95 minutes on 2 quiet cores;
``--points 10``: the 10x point alone, about 50; ``--quick``: a smoke run of a few minutes on a small
corpus, numbers meaningless). The model, corpus and loop are ``examples/char_lm.py``'s: a 2-layer
causal transformer (d_model 256, dropout 0.1) on the first 400,000 characters of Python's standard
library, split by position (90% train, 5% validation, 5% test; validation chooses every epoch kept,
test is only reported).

From **one dense model** (trained in the example's own loop: a warm-up, then a cosine rate), at each
compression of the prunable weights (the Pruner's defaults: every linear layer and the attention
in-projections, embeddings dense), each method a run of its own from that dense model with the same
retraining (epochs, learning rate, batch, AdamW):

* ``prunet``: the example's own loop, ``prunet.Pruner`` driven by ``PruningSchedule.gradual`` (Zhu &
  Gupta's cubic rise over the first 30% of the epochs, ERK's shares among the layers: small layers
  such as the output head denser);
* ``torch-global-l1``: ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured)`` over the same
  weights to the compression at once, then the same retraining in the same loop;
* ``prunet-recipe``: ``prunet run examples/char_lm.yaml --from DENSE`` with the same gradual phase
  (``prune.gradual``; prunet's own loop, ``train.metric: bits_per_token``), at 10x; then
  ``prunet export`` (compact and quantized), ``prunet.load`` (outputs compared) and ``prunet report``;
* ``dense-longer``: the dense model trained on for the same epochs at the same rate: what the
  extra training alone is worth.

Results go to ``benchmarks/results/bench_lm.json`` (``--quick``: ``bench_lm_quick.json``);
``python benchmarks/make_results.py`` puts them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import char_lm as lm  # noqa: E402

import prunet  # noqa: E402
from prunet.factory import absolute  # noqa: E402
from prunet.schedule import PruningSchedule  # noqa: E402
from prunet.share import share  # noqa: E402

COMPRESSIONS = (4.0, 10.0, 20.0)
WITHIN = 0.05  # bits/char of test loss over dense that 10x may cost (issue 19)
MODEL = {"block": 64, "d_model": 256, "layers": 2, "heads": 4, "ffn": 4, "dropout": 0.1}
FULL = {"chars": 400_000, "dense_epochs": 12, "warmup_steps": 100, "lr": 2e-3, "prune_epochs": 24, "ramp": 0.3,
        "every_steps": 50, "prune_lr_fraction": 0.5, "criterion": "erk", "batch_size": 32, "weight_decay": 0.01}
QUICK = {**FULL, "chars": 50_000, "dense_epochs": 2, "prune_epochs": 2, "warmup_steps": 20}
RECIPE = ROOT / "examples" / "char_lm.yaml"
RECIPE_TARGET = 10.0  # the recipe path's compression: the own loop's is compared with it
BITS = {"fc": 5, "attn": 5}  # the quantized export: 32 shared values per layer


def point(model: nn.Module, params: list[tuple[nn.Module, str]], data: lm.CharData, c: float, method: str, log,
          seconds: float) -> dict:
    total, kept = nonzero(params)
    row = {"target": c, "compression": total / kept, "val_bpc": lm.bits_per_char(model, data.val),
           "test_bpc": lm.bits_per_char(model, data.test), "seconds": seconds}
    log(f"  {method:<16} {c:>4g}x (actual {row['compression']:.2f}x): val {row['val_bpc']:.4f}  "
        f"test {row['test_bpc']:.4f} bits/char")
    return row


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` of what ``prunet.Pruner(model)`` prunes by default: one definition for both."""
    return [(t.module, t.attr) for t in prunet.find_layers(model)]


def nonzero(params: list[tuple[nn.Module, str]]) -> tuple[int, int]:
    """(weights, non-zero ones) of ``params``, however they are masked (torch's reparametrization included)."""
    total = kept = 0
    for module, attr in params:
        w = getattr(module, attr)
        total, kept = total + w.numel(), kept + int((w != 0).sum())
    return total, kept


def prune_cfg(spec: dict, seed: int = 1) -> lm.LoopConfig:
    """The retraining every method gets from the dense model (seed 1: the batch order of the recipe's phase)."""
    return lm.LoopConfig(epochs=spec["prune_epochs"], lr=spec["lr"] * spec["prune_lr_fraction"],
                         batch_size=spec["batch_size"], weight_decay=spec["weight_decay"], seed=seed)


def gradual_prunet(model, data, spec, c: float, log) -> tuple[dict, prunet.Pruner]:
    """The example's loop pruning ``model`` to ``c`` on the gradual schedule, retraining as it goes."""
    pruner = prunet.Pruner(model)
    steps = math.ceil(len(data.train) / spec["batch_size"])
    schedule = PruningSchedule.gradual(pruner, target=c, start=0,
                                       end=round(spec["ramp"] * spec["prune_epochs"] * steps),
                                       every=spec["every_steps"], criterion=spec["criterion"])
    start = time.perf_counter()
    lm.train(model, data, prune_cfg(spec), schedule, log=log, label=f"prunet {c:g}x")
    return point(model, prunable(model), data, c, "prunet", log, time.perf_counter() - start), pruner


def refresh_out_proj(mha: nn.MultiheadAttention, args) -> None:
    """Recompute ``out_proj.weight`` from torch's reparametrization before the attention runs.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``, so the
    forward pre-hook of ``torch.nn.utils.prune`` never recomputes it: training would step a
    stale tensor (and a second backward fails). The in-projection's hook is on the attention itself.
    """
    for hook in mha.out_proj._forward_pre_hooks.values():
        hook(mha.out_proj, args)


def torch_l1(model, data, spec, c: float, log) -> dict:
    """torch's global L1 cut to ``c`` at once, then the same retraining in the example's loop."""
    params = prunable(model)  # before torch's reparametrization turns the weights into plain attributes
    total = sum(getattr(m, a).numel() for m, a in params)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_pre_hook(refresh_out_proj)
    start = time.perf_counter()
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=total - round(total / c))
    lm.train(model, data, prune_cfg(spec), log=log, label=f"torch {c:g}x")
    return point(model, params, data, c, "torch-global-l1", log, time.perf_counter() - start)


def dense_longer(model, data, spec, log) -> dict:
    """The dense model trained on for the epochs every pruned model retrains, at their rate."""
    start = time.perf_counter()
    lm.train(model, data, prune_cfg(spec), log=log, label="dense-longer")
    return {**point(model, prunable(model), data, 1.0, "dense-longer", log, time.perf_counter() - start),
            "epochs": spec["prune_epochs"]}


def exported(model: nn.Module, data: lm.CharData, work: Path, log) -> dict:
    """The own loop's model at one compression: saved, exported compact and quantized, loaded back, and its
    report (``prunet report FILE``)."""
    meta = {"model": absolute("examples/char_lm.py:char_gpt"), "model_kwargs": MODEL,
            "input_shape": [MODEL["block"]], "input_dtype": "int64"}
    ckpt = prunet.save(model, work / "own.safetensors", meta)
    x, _ = data.test.batch(torch.arange(8))
    model.eval()
    with torch.no_grad():
        want = model(x)
    out = {"checkpoint_bytes": ckpt.stat().st_size}
    compact = prunet.export(ckpt, work / "own.prunet", trust_factory=True)
    back = prunet.load(compact.path, model=lm.char_gpt(**MODEL))
    with torch.no_grad():
        got = back(x)
    out["compact"] = {"bytes": compact.bytes, "dense_bytes": compact.dense_bytes, "equal": torch.equal(got, want),
                      "max_abs_diff": float((got - want).abs().max())}
    quant = prunet.export(ckpt, work / "own_q.prunet", quantize=BITS, trust_factory=True)
    shared = copy.deepcopy(model)
    share(shared, BITS)  # the same clustering in memory: what the file must give back
    back_q = prunet.load(quant.path, model=lm.char_gpt(**MODEL))
    with torch.no_grad():
        got_q, want_q = back_q(x), shared.eval()(x)
    out["quantized"] = {"bits": BITS, "bytes": quant.bytes, "equal": torch.equal(got_q, want_q),
                        "max_abs_diff": float((got_q - want_q).abs().max()),
                        "val_bpc": lm.bits_per_char(back_q, data.val), "test_bpc": lm.bits_per_char(back_q, data.test)}
    error = prunet_cli("report", str(ckpt), "-o", str(work / "own_report"), "--trust-factory", log=log)
    out["report"] = {"error": error} if error else {"files": sorted(p.name for p in (work / "own_report").glob("report*"))}
    log(f"  export: compact {compact.bytes:,} B ({compact.ratio:.1f}x smaller than dense float32), loaded back "
        f"equal: {out['compact']['equal']}; quantized {quant.bytes:,} B, equal: {out['quantized']['equal']}, "
        f"test {out['quantized']['test_bpc']:.4f} bits/char")
    return out


def prunet_cli(*args: str, log) -> str | None:
    """Run the ``prunet`` command line; None when it succeeds, else the last line it printed on stderr."""
    log("  $ prunet " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "prunet", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    error = lines[-1] if lines else f"exit code {done.returncode}"
    log(f"    failed ({done.returncode}): {error}")
    return error


def recipe_path(dense_ckpt: Path, spec: dict, run_dir: Path, work: Path, log, sets: list[str]) -> dict:
    """``prunet run`` of the recipe from the same dense checkpoint, then export, load and report.

    Each step's outcome is recorded (``errors``: step -> the last line of its error), and the next
    steps run on what the earlier ones left: a run whose report failed still has its rounds.
    """
    start = time.perf_counter()
    model = "{" + ", ".join(f"{k}: {v}" for k, v in MODEL.items()) + "}"
    gradual = (f"{{target: {RECIPE_TARGET:g}, epochs: {spec['prune_epochs']}, prune_epochs: "
               f"{spec['ramp'] * spec['prune_epochs']:g}, every_steps: {spec['every_steps']}, criterion: "
               f"{spec['criterion']}, lr_fraction: {spec['prune_lr_fraction']}}}")
    sets = [*sets, f"model.kwargs={model}", f"data.kwargs.max_chars={spec['chars']}", f"train.lr={spec['lr']}",
            f"data.batch_size={spec['batch_size']}", f"train.reg_strength={spec['weight_decay']}",
            "prune.rounds=[]", f"prune.gradual={gradual}"]
    errors = {}
    errors["run"] = prunet_cli("run", str(RECIPE.relative_to(ROOT)), "--from", str(dense_ckpt), "--run-dir",
                               str(run_dir), "--overwrite", *[a for s in sets for a in ("--set", s)], log=log)
    out = {"run_dir": str(run_dir), "seconds": time.perf_counter() - start}
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        out["points"] = recipe_points(json.loads(summary_file.read_text()))
        for p in out["points"]:
            log(f"  {'prunet-recipe':<16} {p['target']:>4g}x (actual {p['compression']:.2f}x): val {p['val_bpc']:.4f}  "
                f"test {p['test_bpc']:.4f} bits/char")
    if (run_dir / "final.safetensors").is_file():
        errors["export"] = prunet_cli("export", str(run_dir), "-o", str(work / "recipe.prunet"), "--trust-factory",
                                      log=log)
        errors["export --quantized"] = prunet_cli(
            "export", str(run_dir), "-o", str(work / "recipe_q.prunet"), "--quantized", "--bits",
            ",".join(f"{k}={v}" for k, v in BITS.items()), "--trust-factory", log=log)
        if errors["export"] is None:
            final = prunet.load(run_dir / "final.safetensors", trust_factory=True)
            back = prunet.load(work / "recipe.prunet", trust_factory=True)
            x = torch.randint(0, lm.VOCAB_SIZE, (8, MODEL["block"]))
            with torch.no_grad():
                out["compact_equal"] = torch.equal(back(x), final(x))
            out["compact_bytes"] = (work / "recipe.prunet").stat().st_size
        if errors["export --quantized"] is None:
            out["quantized_bytes"] = (work / "recipe_q.prunet").stat().st_size
        errors["report"] = prunet_cli("report", str(run_dir), "--trust-factory", log=log)
    out["report"] = [p.name for p in sorted(run_dir.glob("report*"))]
    out["errors"] = {k: v for k, v in errors.items() if v is not None}
    return out


def recipe_points(summary: dict) -> list[dict]:
    """The gradual phase of ``summary.json``: target, compression, validation and test bits/char."""
    return [{"target": RECIPE_TARGET, "compression": rnd["compression"], "val_bpc": rnd["val_bits"],
             "test_bpc": rnd["test_bits"]} for rnd in summary["rounds"]]


def train_dense(data: lm.CharData, spec: dict, device: str, log) -> tuple[nn.Module, dict]:
    """The one dense model every method starts from, trained in the example's loop; its record."""
    torch.manual_seed(0)
    model = lm.char_gpt(**MODEL).to(device)
    t = time.perf_counter()
    records = lm.train(model, data, lm.LoopConfig(epochs=spec["dense_epochs"], lr=spec["lr"],
                       batch_size=spec["batch_size"], weight_decay=spec["weight_decay"],
                       warmup_steps=spec["warmup_steps"]), log=log, label="dense")
    dense = {"val_bpc": lm.bits_per_char(model, data.val), "test_bpc": lm.bits_per_char(model, data.test),
             "seconds": time.perf_counter() - t, "epochs": records}
    log(f"dense: val {dense['val_bpc']:.4f}  test {dense['test_bpc']:.4f} bits/char")
    return model, dense


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on 50,000 characters (about a minute)")
    parser.add_argument("--no-recipe", action="store_true", help="leave out the recipe path")
    parser.add_argument("--points", type=float, nargs="+", choices=COMPRESSIONS, metavar="N",
                        help="the compressions to measure (default 4 10 20; the recipe path runs at 10)")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/bench_lm*.json)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="where the models train: cpu (default), cuda")
    parser.add_argument("--corpus-root", help="read the *.py files of this folder instead of this Python's library "
                                              "(a copy of another machine's, to train on the same text)")
    parser.add_argument("--corpus-label", help="what the --corpus-root files are, for RESULTS.md "
                                               "(e.g. \"Python 3.11.7's standard library\")")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = QUICK if args.quick else FULL
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_lm{'_quick' if args.quick else ''}.json"
    log = functools.partial(print, flush=True)
    started = time.perf_counter()
    data = lm.char_data(spec["chars"], MODEL["block"], root=args.corpus_root)
    log(f"corpus: {data.corpus.chars:,} characters, {len(data.corpus.files)} files of {data.corpus.root}; "
        f"windows train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    dense_model, dense = train_dense(data, spec, args.device, log)
    state = copy.deepcopy(dense_model.state_dict())

    def fresh() -> nn.Module:
        model = lm.char_gpt(**MODEL)
        model.load_state_dict(state)
        return model.to(args.device)

    coverage = str(prunet.Pruner(fresh()).coverage())
    layers = [r.layer for r in prunet.Pruner(fresh()).summary()]
    log(f"Pruner(model): {coverage}")
    cs = sorted(args.points or COMPRESSIONS)
    own = {c: fresh() for c in cs}
    methods = {"prunet": {"points": [gradual_prunet(own[c], data, spec, c, log)[0] for c in cs]},
               "torch-global-l1": {"points": [torch_l1(fresh(), data, spec, c, log) for c in cs]}}
    longer = dense_longer(fresh(), data, spec, log)
    headline = RECIPE_TARGET if RECIPE_TARGET in cs else cs[-1]
    # The files the bench writes (checkpoints, exports, the own loop's report) and the recipe's run folder.
    run_dir = ROOT / "runs" / f"char_lm_bench{'_quick' if args.quick else ''}"
    work = run_dir.with_name(run_dir.name + "_files")
    work.mkdir(parents=True, exist_ok=True)
    export = {**exported(own[headline].cpu(), data, work, log), "target": headline}
    recipe = None
    if not args.no_recipe and RECIPE_TARGET in cs:
        meta = {"model": absolute("examples/char_lm.py:char_gpt"), "model_kwargs": MODEL}
        dense_ckpt = prunet.save(fresh().cpu(), work / "dense.safetensors", meta)
        sets = [f"threads={args.threads}", f"device={args.device}"]
        if args.corpus_root:
            sets.append(f"data.kwargs.root={Path(args.corpus_root).resolve()}")
        recipe = recipe_path(dense_ckpt, spec, run_dir, work, log, sets)
        if "points" in recipe:
            methods["prunet-recipe"] = {"points": recipe["points"]}
    report = {
        "quick": args.quick,
        "command": " ".join(["python benchmarks/bench_lm.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "corpus": {**data.describe(), "label": args.corpus_label or f"Python {data.corpus.python}'s standard library"},
        "model": MODEL, "spec": spec,
        "parameters": sum(p.numel() for p in dense_model.parameters()),
        "coverage": coverage, "pruned_layers": layers,
        "compressions": cs, "within_bpc": WITHIN,
        "dense": dense, "dense_longer": longer, "methods": methods, "export": export, "recipe": recipe,
        "seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
