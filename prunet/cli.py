"""``prunet``: a thin command line over the library. It parses, calls, prints."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

from prunet import __version__
from prunet.analysis.bits import bits_sweep, plot_bits, write_bits_csv
from prunet.analysis.file_report import FileReportError, write_file_report
from prunet.analysis.report import write_report
from prunet.analysis.sensitivity import (
    format_sensitivity_table,
    plot_sensitivity,
    propose_qualities,
    sensitivity,
    write_sensitivity_csv,
)
from prunet.analysis.tradeoff import (
    DEFAULT_FRACTIONS,
    check_study_args,
    format_tradeoff_table,
    plot_tradeoff,
    tradeoff_study,
    write_tradeoff_csv,
)
from prunet.checkpoint import CheckpointError, load_checkpoint
from prunet.checks import check_model_fits_data, model_data_mismatch
from prunet.config import (
    TARGET_METHODS, ConfigError, DataConfig, load_recipe, parse_override, recommended_method, recommended_rule,
)
from prunet.criteria import TargetError, criteria_names
from prunet.data import DATASETS, DataError, first_batch, load_data, load_dataset
from prunet.devices import DeviceError, resolve_device
from prunet.distributed import SINGLE, RankFailed, Ranks, from_env
from prunet.factory import FactoryError, call_factory, check_trusted, is_factory
from prunet.files import name_problem, write_text
from prunet.layers import format_table
from prunet.masks import baked_copy
from prunet.models import create_model, get_model_info, list_models
from prunet.obs import METHODS, ObsError, prune_once
from prunet.pipeline import resume, run
from prunet.pruner import Pruner
from prunet.runfolder import BITS_CSV, BITS_PNG, SENSITIVITY_CSV, SENSITIVITY_PNG, Run, RunError, RunFolder, \
    run_file_at
from prunet.sparse import FORMATS, CompactFileError, ExportError, export, load, measure
from prunet.sparse.export import file_meta, save_compact, source_checkpoint
from prunet.sparse.compact import VALUE_DTYPES
from prunet.train import Normalization, evaluate


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


MESSAGE_LIMIT = 1000  # characters of one error line

# What a user can cause: one line and exit code 2 (the traceback only with --debug).
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunError, CompactFileError, ExportError, UsageError,
               DeviceError, FactoryError, RankFailed)


def _recipe(args: argparse.Namespace, path: str | Path | None = None):
    """The recipe named on the command line, with ``--set`` and ``--data-dir`` applied."""
    overrides = dict(parse_override(s) for s in getattr(args, "set", None) or [])
    if getattr(args, "data_dir", None):
        overrides["data.data_dir"] = args.data_dir
    if getattr(args, "device", None):
        overrides["device"] = args.device
    return load_recipe(path or args.recipe, overrides)


def cmd_models(args: argparse.Namespace) -> int:
    print(f"{'name':<16} {'parameters':>12}  {'input':<12} description")
    for name in list_models():
        info = get_model_info(name)
        n = sum(p.numel() for p in create_model(name).parameters()) if args.count else None
        count = f"{n:,}" if n is not None else "-"
        print(f"{name:<16} {count:>12}  {'x'.join(map(str, info.input_shape)):<12} {info.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    run(recipe.dense_only(), run_dir=args.run_dir, overwrite=args.overwrite)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        given = [flag for flag, value in (("RECIPE", args.recipe), ("--set", args.set), ("--from", args.from_checkpoint),
                                          ("--target", args.target is not None), ("--method", args.method),
                                          ("--overwrite", args.overwrite), ("--run-dir", args.run_dir),
                                          ("--data-dir", args.data_dir), ("--device", args.device)) if value]
        if given:
            raise UsageError(f"--resume continues a run as it started (its recipe is in the run folder); "
                             f"drop {', '.join(given)}")
        resume(args.resume, trust_factory=args.trust_factory)
        return 0
    if args.trust_factory:
        raise UsageError("--trust-factory goes with --resume (a run folder's recipe); the recipe you name is "
                         "trusted as your own code")
    if not args.recipe:
        raise UsageError("run: give a RECIPE, or --resume RUN_DIR to continue a stopped run")
    recipe = _recipe(args)
    if args.method is not None and args.target is None:
        raise UsageError("--method goes with --target N (how to prune to N times fewer weights)")
    if args.target is not None:
        recipe = recipe.target_method(args.target, args.method)
        method = args.method or recommended_method(args.target)
        why = "" if args.method else f" (the default: {recommended_rule()}; --method picks another)"
        if recipe.prune.rounds:
            print(f"target {args.target:g}x: paper, rounds to " + ", ".join(f"{r.target:g}x" for r in recipe.prune.rounds)
                  + why)
        else:
            phase = recipe.prune.gradual or recipe.prune.acdc
            print(f"target {args.target:g}x: {method} over {phase.epochs} epochs ({phase.criterion}){why}")
    if not recipe.prune.rounds and recipe.prune.gradual is None and recipe.prune.acdc is None:
        raise UsageError(f"{args.recipe} has no prune.rounds (nor prune.gradual, prune.acdc); use 'prunet train' for dense "
                         f"training only, or --target N to prune to N times fewer weights")
    if args.from_checkpoint and not Path(args.from_checkpoint).is_file():
        raise UsageError(f"--from: checkpoint {args.from_checkpoint} does not exist")
    run(recipe, run_dir=args.run_dir, from_checkpoint=args.from_checkpoint, overwrite=args.overwrite)
    return 0


def _model_and_data(args: argparse.Namespace, checkpoint: Path, recipe=None):
    """``(recipe, model, data)`` for a command on a checkpoint, the model checked to fit the data.

    The recipe is ``recipe``, else ``--recipe``, else the ``config.yaml`` beside the checkpoint.
    The factories of a recipe the user named are trusted; a run folder's ``config.yaml`` and the
    checkpoint's own record only with ``--trust-factory``.
    """
    if recipe is None:
        source = Path(args.recipe) if args.recipe else checkpoint.parent / "config.yaml"
        if not source.is_file():
            raise UsageError(f"no {source}: pass --recipe RECIPE to say which data to evaluate on")
        recipe = _recipe(args, source)
        if not args.recipe:
            recipe.check_trusted(args.trust_factory, source)
    trust = True if args.trust_factory else recipe.factories()  # a config.yaml's are checked just above
    device = resolve_device(recipe.device, "--device")
    model, _, _ = load_checkpoint(checkpoint, trust, _given_model(args))
    data = load_data(recipe.data)
    model.to(device)
    check_model_fits_data(recipe, model, data)
    return recipe, model, data


def cmd_sensitivity(args: argparse.Namespace) -> int:
    # Arguments first: nothing is trained or written for a bad one.
    try:
        values = [float(v) for v in args.values.split(",")] if args.values else None
    except ValueError:
        raise UsageError(f"--values takes numbers separated by commas, got {args.values!r}") from None
    if not args.max_drop >= 0:
        raise UsageError(f"--max-drop takes a number >= 0 (points of accuracy, or the recipe metric's units), "
                         f"got {args.max_drop}")
    source = Path(args.source)
    if source.suffix in (".yaml", ".yml"):
        recipe = _recipe(args, source)
        out = Path(args.run_dir) if args.run_dir else Path(recipe.output_dir) / recipe.name
        checkpoint = out / "dense.safetensors"
        if not checkpoint.is_file():
            print(f"no {checkpoint}: training the dense model first")
            run(recipe.dense_only(), run_dir=out)
    else:
        checkpoint = source
        if not checkpoint.is_file():
            raise UsageError(f"{source} is neither a recipe (.yaml) nor an existing checkpoint")
        out = Path(args.run_dir) if args.run_dir else checkpoint.parent
        recipe = None
    recipe, model, data = _model_and_data(args, checkpoint, recipe)
    task = recipe.train.make_task()
    try:
        rows = sensitivity(model, data.val, Normalization(data.mean, data.std), qualities=values,
                           criterion=args.criterion, layers=args.layers.split(",") if args.layers else None,
                           batch_size=recipe.data.eval_batch_size, model_name=recipe.model.spec,
                           task=task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    folder = RunFolder(out)
    csv_path = write_sensitivity_csv(rows, folder.record(SENSITIVITY_CSV))
    png_path = folder.record(SENSITIVITY_PNG)
    plot_sensitivity(rows, png_path)
    metric = task.metric
    print(f"{checkpoint}: validation {metric.name} (fraction of the layer pruned), each layer pruned alone")
    print(format_sensitivity_table(rows))
    proposal = ", ".join(f"{k}: {v:g}" for k, v in propose_qualities(rows, args.max_drop).items()) or "none"
    units = "points" if metric.higher_is_better and metric.name == "accuracy" else metric.name
    print(f"largest {args.criterion} setting per layer within {args.max_drop:g} {units} of {metric.name}: {proposal}")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def _bits(text: str) -> float | dict[str, float]:
    """``--bits``: ``5`` (every layer) or ``conv=8,fc=5`` (layers, groups, globs)."""
    try:
        if "=" not in text:
            return float(text)
        return {k.strip(): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise UsageError(f"--bits takes a number or LAYER=BITS,... (e.g. conv=8,fc=5), got {text!r}") from None


def cmd_bits(args: argparse.Namespace) -> int:
    try:
        values = [int(v) for v in args.values.split(",")]
    except ValueError:
        raise UsageError(f"--values takes whole numbers separated by commas, got {args.values!r}") from None
    checkpoint = source_checkpoint(args.source)
    recipe, model, data = _model_and_data(args, checkpoint)
    task = recipe.train.make_task()
    try:
        rows = bits_sweep(model, data.val, Normalization(data.mean, data.std), values, recipe.data.eval_batch_size,
                          task=task)
    except ValueError as e:
        raise UsageError(f"--values: {e}") from None
    metric = task.metric
    folder = RunFolder(checkpoint.parent)
    csv_path = write_bits_csv(rows, folder.record(BITS_CSV))
    png_path = folder.record(BITS_PNG)
    plot_bits(rows, png_path, ylabel=f"validation {metric.name}" + (" (%)" if metric.name == "accuracy" else ""))
    print(f"{checkpoint}: validation {metric.name} with one group's weights shared (no retraining); "
          f"not shared {metric.format(rows[0].base_acc)}")
    for group in dict.fromkeys(r.group for r in rows):
        print(f"  {group:<4} " + "  ".join(f"{r.bits} bits {metric.format(r.val_acc)}" for r in rows
                                           if r.group == group))
    print(f"wrote {csv_path} and {png_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    quantize = _bits(args.bits) if args.quantized else None
    done = export(args.source, args.output, format=args.format, shrink=args.shrink, value_dtype=args.dtype,
                  quantize=quantize, trust_factory=args.trust_factory, model=_given_model(args))
    than = f"{done.ratio:.1f}x smaller than" if done.ratio >= 1 else f"{1 / done.ratio:.2f}x the size of"
    print(f"wrote {done.path} ({done.format}{', shrunk' if done.shrunk else ''}): {done.bytes:,} bytes, "
          f"{than} the dense float32 tensors ({done.dense_bytes:,} bytes) of {done.source}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UsageError(f"--batch-sizes takes integers separated by commas, got {args.batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes takes integers >= 1, got {args.batch_sizes!r}")
    device = resolve_device(args.device, "--device")
    model = load(args.file, sparse=args.sparse, trust_factory=args.trust_factory, model=_given_model(args)).to(device)
    data = _eval_data(args, file_meta(args.file))
    mismatch = model_data_mismatch(model, data)
    if mismatch is not None:
        raise UsageError(f"{args.file}: {mismatch[1]}")
    result = measure(model, data.test, Normalization(data.mean, data.std), sizes)
    print(f"{args.file}: test accuracy {result.accuracy:.2f}% on {result.examples:,} {data.name} test images")
    print("latency: " + ", ".join(f"batch {b} {ms:.3f} ms" for b, ms in result.latency_ms.items()))
    # Each layer's path and why ("fc1 dense (sparse 1.35x of dense time)"); "; " since a reason may hold a comma.
    print("layers: " + "; ".join(f"{name} {path}" for name, path in result.plan.items()))
    return 0


def _eval_data(args: argparse.Namespace, meta: dict):
    """What ``eval`` measures on: ``--recipe``'s data, ``--dataset``, else the data the file records it was
    trained on (a data factory only with ``--trust-factory``)."""
    if args.recipe:
        return load_data(_recipe(args, args.recipe).data)
    if args.dataset:
        return load_dataset(args.dataset, data_dir=args.data_dir, val_size=0)
    split = meta.get("split")
    if not isinstance(split, dict) or not split.get("dataset"):
        raise UsageError(f"{args.file} does not record the data it was trained on; pass --dataset NAME or "
                         f"--recipe RECIPE")
    name = split["dataset"]
    if name in DATASETS:
        return load_dataset(name, data_dir=args.data_dir, val_size=0)
    check_trusted(name, args.trust_factory, args.file, "data.factory")
    cfg = DataConfig(factory=name, kwargs=dict(split.get("kwargs") or {}), val_size=split.get("val_size", 0),
                     split_seed=split.get("split_seed", 0))
    cfg.validate("data")
    return load_data(cfg)


CALIBRATION_BATCH = 256  # calibration examples per forward pass of one-shot pruning


def cmd_prune(args: argparse.Namespace) -> int:
    """One-shot pruning of a trained model to ``--target``, no retraining: table, accuracies, a compact file."""
    _check_prune_args(args)
    device = resolve_device(args.device, "--device")
    model, _, meta = load_checkpoint(args.file, args.trust_factory, _given_model(args))
    data = _prune_data(args, meta)
    model.to(device)
    mismatch = model_data_mismatch(model, data)
    if mismatch is not None:
        raise UsageError(f"{args.file}: {mismatch[1]}")
    if args.calibration > len(data.train):
        raise UsageError(f"--calibration: {args.calibration:,} is more than the {len(data.train):,} training "
                         f"examples of {data.name}")
    norm = Normalization(data.mean, data.std)
    before = _accuracies(model, data, norm)
    pruner = Pruner(model)  # the masks a pruned checkpoint holds are kept: what they prune stays pruned
    x, _ = first_batch(data.train, args.calibration, mean=data.mean, std=data.std, device=device)
    try:
        prune_once(pruner, args.method, args.target, list(x.split(CALIBRATION_BATCH)))
    except (ObsError, TargetError) as e:
        raise UsageError(str(e)) from None
    after = _accuracies(model, data, norm)
    keep = {name: mask.bool() for name, mask in pruner.masks.items()}
    save_compact(args.output, baked_copy(model).eval(), {**meta, "exported_from": str(args.file), "shrunk": False},
                 keep=keep)
    print(f"{args.file}: {args.method} to {args.target:g}x, no retraining, calibrated on the first "
          f"{args.calibration:,} {data.name} training examples")
    print(format_table(pruner.summary()))
    for name, acc in (("before", before), ("after", after)):
        print(f"{name}: " + "  ".join(f"{split} {value:.2f}%" for split, value in acc.items()))
    print(f"wrote {args.output} ({Path(args.output).stat().st_size:,} bytes)")
    return 0


def _check_prune_args(args: argparse.Namespace) -> None:
    """``prunet prune``'s arguments, checked before anything is read."""
    if args.method not in METHODS:
        raise UsageError(f"--method: {args.method!r} is not one of {', '.join(METHODS)}")
    if not (args.target >= 1 and args.target != float("inf")):  # NaN fails too
        raise UsageError(f"--target: a compression >= 1 (weights / kept), got {args.target}")
    if args.calibration < 1:
        raise UsageError(f"--calibration: a number of training examples >= 1, got {args.calibration}")
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file} does not exist (give a checkpoint: a .safetensors file prunet wrote, "
                         f"or a torch.save-d state dict with --model)")
    out = Path(args.output)
    taken = run_file_at(out)
    if taken or out.resolve() == Path(args.file).resolve() or out.is_dir():
        what = taken or ("the checkpoint being pruned" if out.is_file() else "a folder")
        raise UsageError(f"-o {out} is {what}; prune writes only a file of its own: choose another name")


def _prune_data(args: argparse.Namespace, meta: dict):
    """``eval``'s data (``--recipe``, ``--dataset``, else what the file records), with the validation split the
    file was trained with, or 5,000 images for a dataset it does not record."""
    split = meta.get("split") if isinstance(meta.get("split"), dict) else {}
    name = args.dataset or (None if args.recipe else split.get("dataset"))
    if name in DATASETS:
        same = split.get("dataset") == name
        return load_dataset(name, data_dir=args.data_dir, val_size=split.get("val_size", 5000) if same else 5000,
                            seed=split.get("split_seed", 0) if same else 0)
    return _eval_data(args, meta)


def _accuracies(model, data, norm: Normalization) -> dict[str, float]:
    """Validation (which a user chooses by) then test (only reported) accuracy, %; no validation row if none."""
    splits = [("validation", data.val)] if len(data.val) else []
    return {name: evaluate(model, split, norm)[1] for name, split in splits + [("test", data.test)]}


def cmd_report(args: argparse.Namespace) -> int:
    if args.sram_mib is not None and not args.sram_mib > 0:
        raise UsageError(f"--sram-mib takes a size in MiB > 0, got {args.sram_mib}")
    sram = int(args.sram_mib * 2**20) if args.sram_mib is not None else None
    source = Path(args.run_dir)
    if source.is_file():  # a model file, not a run folder: what the file shows
        out = Path(args.output) if args.output else source.with_name(f"{source.stem}_report")
        try:
            md, html = write_file_report(source, out, model=_given_model(args), trust_factory=args.trust_factory,
                                         sram_bytes=sram)
        except FileReportError as e:
            raise UsageError(str(e)) from None
        print(f"wrote {md}\nwrote {html}")
        return 0
    if args.output or args.model:
        raise UsageError("-o and --model are for a report of a model file; a run folder's report goes into it")
    md, html = write_report(Run(args.run_dir, trust_factory=args.trust_factory), sram_bytes=sram,
                            histogram_layer=args.layer, device=resolve_device(args.device, "--device"))
    print(f"wrote {md}\nwrote {html}")
    return 0


def cmd_tradeoff(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    try:
        fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else list(DEFAULT_FRACTIONS)
    except ValueError:
        raise UsageError(f"--fractions takes comma-separated numbers, e.g. 0.5,0.9; got {args.fractions!r}") from None
    try:
        check_study_args(fractions, args.retrain_epochs, args.dense_epochs, args.l1, args.l2, args.criterion)
    except ValueError as e:
        raise UsageError(f"tradeoff: {e}") from None
    out = Path(args.run_dir) if args.run_dir else Path(recipe.output_dir) / f"{recipe.name}_tradeoff"
    plot = Path(args.plot) if args.plot else out / "tradeoff.png"
    for path, flag in ((out / "tradeoff.csv", "--run-dir"), (out / "tradeoff.md", "--run-dir"), (plot, "--plot")):
        taken = run_file_at(path)
        if taken:
            raise UsageError(f"{flag}: {path} is {taken}; tradeoff writes only files of its own: choose another")
    rows = tradeoff_study(recipe, fractions=fractions, retrain_epochs=args.retrain_epochs,
                          dense_epochs=args.dense_epochs, l1_strength=args.l1, l2_strength=args.l2,
                          criterion=args.criterion)
    csv_path = write_tradeoff_csv(rows, out / "tradeoff.csv")
    plot_tradeoff(rows, plot, f"{recipe.model.spec}, {recipe.data.dataset}")
    tables = ("## Validation accuracy loss, points (accuracy %)\n\n" + format_tradeoff_table(rows, "val")
              + "\n## Test accuracy loss, points (accuracy %), reported only\n\n" + format_tradeoff_table(rows, "test"))
    write_text(out / "tradeoff.md", tables)
    print(tables)
    print(f"wrote {csv_path}, {plot}, {out / 'tradeoff.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunet",
        description="Learn which connections matter, prune the rest, retrain (Han et al., NIPS 2015).",
    )
    parser.add_argument("--version", action="version", version=f"prunet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_models_parser, _train_parser, _run_parser, _tradeoff_parser, _sensitivity_parser, _bits_parser,
                _export_parser, _eval_parser, _prune_parser, _report_parser):
        add(sub)
    return parser


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--count", action="store_true", help="build each model and count its parameters")
    p.set_defaults(func=cmd_models)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a dense model from a recipe")
    _recipe_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run folder")
    p.set_defaults(func=cmd_train)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="dense training, then the recipe's prune -> retrain rounds")
    _recipe_args(p, optional=True)
    p.add_argument("--target", type=float, metavar="N",
                   help="replace the recipe's pruning by pruning to N times fewer weights, by --method")
    p.add_argument("--method", choices=TARGET_METHODS, metavar="METHOD",
                   help="with --target: paper (the paper's ladder of rounds), gradual (cubic, ERK's shares among "
                        "layers) or acdc, each over the epochs the ladder would spend; default: "
                        + recommended_rule() + " (chosen on validation, benchmarks/bench_frontier.py)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run (Ctrl-C, a crash, kill -9) after the last epoch it finished")
    p.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from this dense checkpoint instead of training")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the run folder")
    _trust_arg(p, "the --resume folder's recipe", model=False)
    p.set_defaults(func=cmd_run)


def _tradeoff_parser(sub) -> None:
    p = sub.add_parser("tradeoff", help="Figure 5: accuracy loss vs. parameters pruned, L1/L2, with/without retraining")
    _recipe_args(p)  # --run-dir: the output folder (default <output_dir>/<name>_tradeoff)
    p.add_argument("--fractions", metavar="P,P,...",
                   help="fractions of weights to prune, also the iterative ladder (default 0.5,...,0.97)")
    p.add_argument("--retrain-epochs", type=int, default=2, help="retraining epochs per point and per ladder step")
    p.add_argument("--dense-epochs", type=int, help="dense training epochs (default: the recipe's train.epochs)")
    p.add_argument("--l1", type=float, default=2e-5, help="L1 strength, penalty strength*sum|w| (default 2e-5)")
    p.add_argument("--l2", type=float, help="L2 weight decay (default: the recipe's train.reg_strength)")
    p.add_argument("--criterion", choices=criteria_names(setting="sparsity"), default="sparsity",
                   help="sparsity: every layer pruned to the fraction (default); global: one cut over all layers")
    p.add_argument("--plot", metavar="PNG", help="where to write the figure (default <run-dir>/tradeoff.png)")
    p.set_defaults(func=cmd_tradeoff)


def _sensitivity_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="prune each layer alone over a range of thresholds, no retraining (Fig. 6)")
    p.add_argument("source", metavar="RECIPE|CHECKPOINT",
                   help="a recipe (uses its run folder's dense.safetensors, trained first if missing) or a checkpoint")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set data.val_size=2000 (repeatable)")
    p.add_argument("--run-dir", help="where sensitivity.csv/.png go (default: the recipe's run folder, "
                                     "or the checkpoint's folder)")
    p.add_argument("--recipe", help="with a CHECKPOINT: the recipe whose data to use (default: config.yaml beside it)")
    p.add_argument("--data-dir", help="folder with the dataset's four IDX files (sets data.data_dir)")
    p.add_argument("--criterion", choices=criteria_names(per_layer=True), default="threshold",
                   help="sweep the quality parameter (the paper) or per-layer sparsity")
    p.add_argument("--values", metavar="V,V,...",
                   help="settings to sweep (default: quality 0,0.25,...,2 or sparsity 0,0.1,...,0.9,0.95)")
    p.add_argument("--layers", metavar="L,L,...", help="layers, groups (fc, conv, attn, embed, all) or globs (default: all)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="print the largest setting per layer costing at most this much accuracy (default 1.0)")
    _device_arg(p, "sets the recipe's device")
    _trust_arg(p, "the checkpoint or the config.yaml beside it")
    p.set_defaults(func=cmd_sensitivity)


def _bits_parser(sub) -> None:
    p = sub.add_parser("bits", help="accuracy against bits per shared weight, conv and FC (Deep Compression Fig. 6)")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run folder (its final.safetensors) or a checkpoint")
    p.add_argument("--recipe", help="the recipe whose data to use (default: config.yaml beside the checkpoint)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a recipe field (repeatable)")
    p.add_argument("--values", default="1,2,3,4,5,6,7,8", metavar="B,B,...", help="bit widths (default 1..8)")
    _device_arg(p, "sets the recipe's device")
    _trust_arg(p, "the checkpoint or the config.yaml beside it")
    p.set_defaults(func=cmd_bits)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a pruned model as a compact file, a dense safetensors file or ONNX")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run folder (its final.safetensors) or a checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--format", choices=FORMATS, default="prunet",
                   help="prunet: survivors and relative indices (default); safetensors: baked, dense; onnx")
    p.add_argument("--shrink", action="store_true", help="remove dead neurons first (layers physically smaller)")
    p.add_argument("--dtype", choices=list(VALUE_DTYPES), default="float32",
                   help="with --format prunet: the survivors' value type (default float32)")
    p.add_argument("--quantized", action="store_true",
                   help="share weights (k-means per layer) and Huffman code them (Deep Compression)")
    p.add_argument("--bits", default="conv=8,fc=5", metavar="B|LAYER=B,...",
                   help="with --quantized: bits per weight index (default conv=8,fc=5, the paper's AlexNet)")
    _trust_arg(p, "the checkpoint")
    p.set_defaults(func=cmd_export)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy and latency of an exported file or a checkpoint")
    p.add_argument("file", metavar="FILE", help="a file from 'prunet export', or a checkpoint")
    p.add_argument("--dataset", choices=list(DATASETS),
                   help="evaluate on this dataset (default: the data the file records it was trained on)")
    p.add_argument("--recipe", help="evaluate on this recipe's data (a data.factory, say)")
    p.add_argument("--data-dir", help="folder with the dataset's four IDX files")
    p.add_argument("--sparse", action="store_true", help="run pruned layers with sparse kernels where faster")
    p.add_argument("--batch-sizes", default="1,64", metavar="B,B,...", help="batch sizes to time (default 1,64)")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), auto, cuda, cuda:N or mps")
    _trust_arg(p, "the file")
    p.set_defaults(func=cmd_eval)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="one-shot pruning of a trained model, no retraining: a compact file")
    p.add_argument("file", metavar="CHECKPOINT",
                   help="a checkpoint (dense or pruned), or a torch state dict with --model")
    p.add_argument("--target", type=float, required=True, metavar="N", help="N times fewer prunable weights")
    p.add_argument("--calibration", type=int, default=1024, metavar="K",
                   help="training examples the obs method fits each layer's outputs on (default 1024)")
    p.add_argument("--method", default="obs", metavar="METHOD",
                   help=f"{' | '.join(METHODS)}: one global magnitude cut; LAMP's layer-adaptive cut; "
                        f"layer-wise OBS, the survivors compensating (default obs)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.prunet", help="the compact file to write")
    p.add_argument("--dataset", choices=list(DATASETS),
                   help="calibrate and evaluate on this dataset (default: the data the file records)")
    p.add_argument("--recipe", help="calibrate and evaluate on this recipe's data (a data.factory, say)")
    p.add_argument("--data-dir", help="folder with the dataset's four IDX files")
    p.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), auto, cuda, cuda:N or mps")
    _trust_arg(p, "the file")
    p.set_defaults(func=cmd_prune)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="write report.md and a self-contained report.html for a run folder or a file")
    p.add_argument("run_dir", metavar="RUN_DIR|FILE",
                   help="a folder written by 'prunet run', or a model file (checkpoint, compact file, torch state dict)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="with a FILE: the folder for report.md and report.html (default FILE's stem + _report)")
    p.add_argument("--layer", help="layer whose weights are histogrammed (default: the largest)")
    p.add_argument("--sram-mib", type=float, metavar="MIB", help="on-chip SRAM for the energy estimate (default 4)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the activation pass runs: cpu (default), auto, cuda, cuda:N or mps")
    _trust_arg(p, "the run folder or file")
    p.set_defaults(func=cmd_report)


def _recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("recipe", nargs="?" if optional else None, help="YAML recipe (see recipes/)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--run-dir", help="run folder (default: <output_dir>/<name> from the recipe)")
    p.add_argument("--data-dir", help="folder with the dataset's four IDX files (sets data.data_dir)")
    _device_arg(p, "sets the recipe's device")


def _trust_arg(p: argparse.ArgumentParser, what: str, model: bool = True) -> None:
    p.add_argument("--trust-factory", action="store_true",
                   help=f"build the user's own model or data that {what} names by a factory (module:function): "
                        f"that runs its code, so only for files you trust; registry models need no trust")
    if model:
        p.add_argument("--model", metavar="NAME|FACTORY",
                       help="the model the file holds, a registry name or module:function (for a file that names "
                            "none, such as torch.save(model.state_dict(), 'model.pt')); built instead of the file's own")


def _given_model(args: argparse.Namespace):
    """The model ``--model`` names, built (a factory the user typed is trusted), or None."""
    spec = getattr(args, "model", None)
    if spec is None:
        return None
    try:
        return call_factory(spec, {}, "--model") if is_factory(spec) else create_model(spec)
    except (FactoryError, ValueError, TypeError) as e:
        raise UsageError(f"--model {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _device_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--device", metavar="DEVICE",
                   help=f"auto (CUDA when present), cpu, cuda, cuda:N or mps{f'; {what}' if what else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM (a scheduler stopping the job, `kill`) behaves like Ctrl-C: the run folder is put right.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.func not in (cmd_run, cmd_train) and _ranks().distributed:
            error = UsageError(f"{args.command} runs in one process; start it without torchrun "
                               f"(only 'prunet run' and 'prunet train' run on several)")
            error.quiet = not _ranks().main  # every rank refuses alike: rank 0 says it
            raise error
        if getattr(args, "device", None):  # a device this machine lacks fails before anything is read
            resolve_device(args.device, "--device")
        run_dir = getattr(args, "run_dir", None)
        if run_dir is not None and (problem := name_problem(run_dir)):  # '' silently meant the recipe's folder
            raise UsageError(f"{'RUN_DIR' if args.command == 'report' else '--run-dir'}: {run_dir!r} {problem}; "
                             f"choose another folder")
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        _error(e, str(e))
        return 2
    except OSError as e:  # a full disk, a read-only folder, a file that vanished: the system's words, one line
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _error(e, f"{where}{e.strerror or e}")
        return 2
    except KeyboardInterrupt:  # a run has said what it left ("run stopped: ..."); nothing else is claimed here
        print("prunet: interrupted; files written so far are complete", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(e: BaseException, text: str) -> None:
    """One line on stderr. Under torchrun: an error every rank met (they agree on their inputs first) is
    said once, by the first rank that met it (the others are ``quiet``); any other, by its rank, named."""
    quiet = getattr(e, "quiet", None)
    if quiet:
        return
    rank = _ranks().rank
    text = " ".join(text.split())  # one line, whatever the message holds
    if len(text) > MESSAGE_LIMIT:  # a file or recipe can make a message of any size (a YAML alias bomb)
        text = text[:MESSAGE_LIMIT - 40] + f" ... ({len(text):,} characters in all)"
    print(f"prunet: error: {f'rank {rank}: ' if rank else ''}{text}", file=sys.stderr)


def _ranks() -> Ranks:
    """torchrun's ranks for this process (one process when its environment is malformed: the run says why)."""
    try:
        return from_env()
    except ValueError:
        return SINGLE


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
