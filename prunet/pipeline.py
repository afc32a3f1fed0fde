"""Train -> prune -> retrain -> iterate, driven by a recipe.

``run(recipe)`` is what ``prunet run`` calls. Everything it decides (the best
epoch of each round, whether to stop the ladder) it decides on the validation
split; the test split is only reported. Its run folder holds:

* ``config.yaml``: the recipe as run;
* ``metrics.jsonl``: one JSON object per epoch and per round;
* ``dense.safetensors``, ``round<k>.safetensors``, ``final.safetensors``: checkpoints
  (masks included), and ``final_shrunk.safetensors`` after dead-neuron removal;
* ``summary.json``: the per-round table, accuracies, compression.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml

from prunet.checkpoint import load_model, save_checkpoint
from prunet.config import ConfigError, Recipe, RoundConfig
from prunet.data import DatasetSplits, Split, batches, load_dataset
from prunet.masks import baked_copy
from prunet.models import create_model
from prunet.neurons import remove_dead_neurons
from prunet.pruner import DEFAULT_TYPES, LayerSummary, Pruner, find_targets, matches
from prunet.regularize import DropoutAdjuster
from prunet.schedule import retrain_config, round_criterion
from prunet.train import EpochRecord, Normalization, evaluate, evaluate_splits, fit

Log = Callable[[str], None]


def load_data(recipe: Recipe) -> DatasetSplits:
    """The recipe's dataset, split into train / validation / test (train optionally subset)."""
    d = recipe.data
    data = load_dataset(d.dataset, data_dir=d.data_dir, val_size=d.val_size, seed=d.split_seed)
    if d.train_subset is not None and d.train_subset < len(data.train):
        n = d.train_subset
        data.train = Split(data.train.images[:n], data.train.labels[:n])
    return data


def format_layer_table(rows: list[LayerSummary]) -> str:
    """The paper's per-layer table: layer, weights, kept, kept %, totals and compression."""
    lines = [f"{'layer':<12} {'weights':>12} {'kept':>12} {'kept %':>8}"]
    for r in rows:
        lines.append(f"{r.layer:<12} {r.weights:>12,} {r.kept:>12,} {100 * r.kept_frac:>7.2f}%")
    total, kept = sum(r.weights for r in rows), sum(r.kept for r in rows)
    ratio = total / kept if kept else float("inf")
    lines.append(f"{'total':<12} {total:>12,} {kept:>12,} {100 * kept / total:>7.2f}%   {ratio:.1f}x smaller")
    return "\n".join(lines)


class RunFolder:
    """The files of one run; every write is whole (JSON lines appended, others replaced)."""

    # What a run writes; an earlier run's files are removed only with overwrite=True.
    OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "*.safetensors", "report*", "layers.csv",
               "sensitivity.*")

    def __init__(self, path: Path, overwrite: bool = False):
        self.path = path
        earlier = sorted({p for pattern in self.OUTPUTS for p in path.glob(pattern)}) if path.is_dir() else []
        if earlier and not overwrite:
            raise ConfigError(
                f"run folder {path} already holds a run ({earlier[0].name}, ...); pass --overwrite to replace it, "
                f"or --run-dir / a new recipe name to keep it"
            )
        for p in earlier:
            p.unlink()
        path.mkdir(parents=True, exist_ok=True)
        self.metrics = path / "metrics.jsonl"
        self.metrics.write_text("")

    def log_metrics(self, event: str, **fields: Any) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / (name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path / name)

    def write_yaml(self, name: str, data: Any) -> None:
        (self.path / name).write_text(yaml.safe_dump(data, sort_keys=False))


def run(
    recipe: Recipe,
    *,
    run_dir: str | Path | None = None,
    from_checkpoint: str | Path | None = None,
    overwrite: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Run a recipe: dense training (or a checkpoint), then each prune + retrain round.

    Args:
        recipe: a validated recipe.
        run_dir: the run folder; default ``<recipe.output_dir>/<recipe.name>``.
        from_checkpoint: skip dense training and start from this checkpoint.
        overwrite: replace an earlier run in the run folder (otherwise that is an error).
        log: where progress lines go.

    Returns:
        The summary also written to ``summary.json``.
    """
    started = time.perf_counter()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    # Inputs first: bad data, a bad checkpoint or a layer-name typo fails before an
    # earlier run's folder is touched.
    data = load_data(recipe)
    norm = Normalization(data.mean, data.std)
    meta = {"model": recipe.model.name, "model_kwargs": recipe.model.kwargs(), "recipe": recipe.name,
            "split": split_identity(recipe)}
    pruner: Pruner | None = None
    if from_checkpoint:
        model, pruner, ckpt_meta = load_model(from_checkpoint)
        check_checkpoint_fits(recipe, ckpt_meta, from_checkpoint)
    else:
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model.name, **recipe.model.kwargs())
    check_model_fits_data(recipe, model, data, norm)
    check_rounds(recipe, pruner.targets if pruner else find_targets(model, None, None, DEFAULT_TYPES))
    folder = RunFolder(Path(run_dir) if run_dir else Path(recipe.output_dir) / recipe.name, overwrite=overwrite)
    folder.write_yaml("config.yaml", recipe.to_dict())
    log(f"data: {data.name} from {data.source} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)})")

    def on_epoch(rec: EpochRecord) -> None:
        folder.log_metrics("epoch", **rec.to_dict())
        log(
            f"  {rec.phase} epoch {rec.epoch}: lr {rec.lr:.4g}  train loss {rec.train_loss:.4f} "
            f"acc {rec.train_acc:.2f}%  val {rec.val_acc:.2f}%  ({rec.seconds:.1f}s)"
        )

    # 1. Dense training (or a given checkpoint).
    if from_checkpoint:
        log(f"dense: loaded {from_checkpoint}")
    else:
        log(f"dense: training {recipe.model.name} for {recipe.train.epochs} epochs")
        fit(model, data.train, data.val, recipe.train, norm, seed=recipe.seed, phase="dense", on_epoch=on_epoch,
            batch_size=recipe.data.batch_size, eval_batch_size=recipe.data.eval_batch_size)
    save_checkpoint(folder.path / "dense.safetensors", model, {**meta, "phase": "dense"})
    dense = evaluate_splits(model, data.val, data.test, norm, recipe.data.eval_batch_size)
    log(f"dense: val {dense['val_acc']:.2f}%  test {dense['test_acc']:.2f}%")
    folder.log_metrics("dense", **dense)

    if not recipe.prune.rounds:
        summary = {"recipe": recipe.name, "model": meta["model"], "dataset": data.name, "dense": dense,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "seconds": time.perf_counter() - started}
        folder.write_json("summary.json", summary)
        log(f"run folder: {folder.path}")
        return summary

    # 2. Prune -> retrain rounds.
    pruner = pruner or Pruner(model)
    dropout = DropoutAdjuster(model, [t.layer for t in pruner.targets])
    dense_weights = {r.layer: r.weights for r in pruner.summary()}
    rounds: list[dict[str, Any]] = []
    accepted_state = {k: v.clone() for k, v in model.state_dict().items()}
    stopped = None
    for i, rnd in enumerate(recipe.prune.rounds, start=1):
        result = _run_round(i, rnd, model, pruner, data, norm, recipe, dropout, dense_weights, on_epoch, log)
        drop = dense["val_acc"] - result["val_acc"]
        limit = recipe.prune.max_accuracy_drop
        if limit is not None and drop > limit:
            result["accepted"] = False
            rounds.append(result)
            folder.log_metrics("round", **result)
            stopped = f"round {i}: validation accuracy fell {drop:.2f} points below dense (> {limit})"
            log(f"stop: {stopped}; keeping {f'round {i - 1}' if i > 1 else 'the dense model'}")
            model.load_state_dict(accepted_state)
            break
        result["accepted"] = True
        rounds.append(result)
        folder.log_metrics("round", **result)
        accepted_state = {k: v.clone() for k, v in model.state_dict().items()}
        save_checkpoint(folder.path / f"round{i}.safetensors", model, {**meta, "phase": f"round{i}"})

    # 3. The final model.
    dropout.restore()  # a checkpoint's model is rebuilt with the original ratios
    save_checkpoint(folder.path / "final.safetensors", model, {**meta, "phase": "final"})
    final = evaluate_splits(model, data.val, data.test, norm, recipe.data.eval_batch_size)
    layers = [dataclasses.asdict(r) for r in pruner.summary()]
    total = sum(r["weights"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    params_dense = sum(p.numel() for p in model.parameters())
    params_kept = params_dense - (total - kept)
    summary = {
        "recipe": recipe.name,
        "model": meta["model"],
        "dataset": data.name,
        "dense": dense,
        "final": final,
        "accuracy_change_test": final["test_acc"] - dense["test_acc"],
        "accuracy_change_val": final["val_acc"] - dense["val_acc"],
        "weights": total,
        "weights_kept": kept,
        "compression": total / kept if kept else None,
        "parameters": params_dense,
        "parameters_kept": params_kept,
        "parameter_compression": params_dense / params_kept if params_kept else None,
        "layers": layers,
        "rounds": rounds,
        "stopped": stopped,
        "seconds": time.perf_counter() - started,
    }
    if recipe.prune.remove_dead_neurons:
        summary["neurons"] = _shrink(model, data, norm, folder, meta, log)
    folder.write_json("summary.json", summary)
    from prunet.analysis.report import write_report  # report.py imports this module

    _, html = write_report(folder.path, data=data, progress=False)
    log(f"report: {html}")
    log(
        f"final: {summary['compression']:.1f}x fewer weights ({kept:,} of {total:,}); "
        f"test {final['test_acc']:.2f}% (dense {dense['test_acc']:.2f}%, "
        f"change {summary['accuracy_change_test']:+.2f})"
    )
    log(f"run folder: {folder.path}")
    return summary


def split_identity(recipe: Recipe) -> dict[str, Any]:
    """What fixes the train / validation split; stored in checkpoints so a later run can check it."""
    return {"dataset": recipe.data.dataset, "val_size": recipe.data.val_size, "split_seed": recipe.data.split_seed}


def check_checkpoint_fits(recipe: Recipe, meta: dict[str, Any], path: str | Path) -> None:
    """A ``--from`` checkpoint must hold the recipe's model, trained on the recipe's training split.

    A different split would put the checkpoint's training images into this run's
    validation split, which then chooses epochs and thresholds on data the model has seen.
    """
    if meta.get("model") != recipe.model.name or meta.get("model_kwargs", {}) != recipe.model.kwargs():
        raise ConfigError(
            f"model: {path} holds {meta.get('model')} {meta.get('model_kwargs', {})}, the recipe asks for "
            f"{recipe.model.name} {recipe.model.kwargs()}"
        )
    split = meta.get("split")
    if split is not None and split != split_identity(recipe):
        raise ConfigError(f"data: {path} was trained with split {split}, the recipe's is {split_identity(recipe)}")


def check_model_fits_data(recipe: Recipe, model: nn.Module, data: DatasetSplits, norm: Normalization) -> None:
    """One validation batch through the model: input size and class count must fit the data."""
    x, _ = next(batches(data.val, 2, shuffle=False, mean=norm.mean, std=norm.std))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except RuntimeError as e:
        raise ConfigError(
            f"model.name: {recipe.model.name} does not take {data.name} images of shape {tuple(x.shape[1:])} "
            f"({str(e).splitlines()[0]})"
        ) from None
    if out.shape[-1] != len(data.classes):
        raise ConfigError(f"model.num_classes: the model has {out.shape[-1]} outputs, {data.name} has "
                          f"{len(data.classes)} classes")


def check_rounds(recipe: Recipe, targets: list) -> None:
    """Every layer name, group or glob in the rounds must name one of the prunable ``targets``."""
    layers = ", ".join(t.layer for t in targets)
    for i, rnd in enumerate(recipe.prune.rounds):
        setting = rnd.quality if rnd.criterion == "threshold" else rnd.sparsity
        fields = {"quality" if rnd.criterion == "threshold" else "sparsity": list(setting) if isinstance(setting, dict) else [],
                  "prune": rnd.prune, "train": rnd.train}
        for field, keys in fields.items():
            for key in keys:
                if not any(matches(t, key) for t in targets):
                    raise ConfigError(
                        f"prune.rounds[{i}].{field}: {key!r} names no layer of {recipe.model.name}; "
                        f"layers: {layers} (groups: fc, conv, all)"
                    )


def _run_round(
    i: int,
    rnd: RoundConfig,
    model: nn.Module,
    pruner: Pruner,
    data: DatasetSplits,
    norm: Normalization,
    recipe: Recipe,
    dropout: DropoutAdjuster,
    dense_weights: dict[str, int],
    on_epoch: Callable[[EpochRecord], None],
    log: Log,
) -> dict[str, Any]:
    """One round: prune the named layers, adjust dropout, retrain the named layers."""
    start = time.perf_counter()
    pruner.prune(round_criterion(rnd), layers=rnd.prune)
    _, pruned_val = evaluate(model, data.val, norm, recipe.data.eval_batch_size)
    kept = {r.layer: r.kept for r in pruner.summary()}
    ratios = dropout.adjust(kept, dense_weights) if recipe.prune.adjust_dropout else {}
    trainable = None
    if not any(k in ("all", "*") for k in rnd.train):
        modules = {id(t.module): t.module for t in pruner.select(rnd.train)}
        trainable = [p for m in modules.values() for p in m.parameters()]
    cfg = retrain_config(recipe, rnd.epochs, rnd.lr_fraction)
    log(f"round {i}: pruned {', '.join(rnd.prune)} ({rnd.criterion}); val before retraining {pruned_val:.2f}%; "
        f"retraining {', '.join(rnd.train)} for {cfg.epochs} epochs at lr {cfg.lr:.3g}"
        + (f"; dropout {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}" if ratios else ""))
    fit(model, data.train, data.val, cfg, norm, seed=recipe.seed + i, pruner=pruner, trainable=trainable,
        phase=f"round{i}", on_epoch=on_epoch, batch_size=recipe.data.batch_size,
        eval_batch_size=recipe.data.eval_batch_size)
    acc = evaluate_splits(model, data.val, data.test, norm, recipe.data.eval_batch_size)
    rows = pruner.summary()
    log(format_layer_table(rows))
    log(f"round {i}: val {acc['val_acc']:.2f}%  test {acc['test_acc']:.2f}%")
    total, kept_total = sum(r.weights for r in rows), sum(r.kept for r in rows)
    return {
        "round": i,
        "criterion": rnd.criterion,
        "setting": rnd.quality if rnd.criterion == "threshold" else rnd.sparsity,
        "pruned_layers": rnd.prune,
        "trained_layers": rnd.train,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "val_acc_pruned": pruned_val,
        **acc,
        "dropout": ratios,
        "layers": [dataclasses.asdict(r) for r in rows],
        "weights": total,
        "weights_kept": kept_total,
        "compression": total / kept_total if kept_total else None,
        "seconds": time.perf_counter() - start,
    }


def _shrink(
    model: nn.Module, data: DatasetSplits, norm: Normalization, folder: RunFolder, meta: dict, log: Log
) -> dict[str, Any] | None:
    """Remove dead neurons from a baked copy, check outputs are unchanged, save it."""
    if not isinstance(model, nn.Sequential):
        log("neurons: not removed (needs an nn.Sequential model)")
        return None
    x, _ = next(batches(data.val, 512, shuffle=False, mean=norm.mean, std=norm.std))
    small, report = remove_dead_neurons(baked_copy(model), example_input=x)
    save_checkpoint(folder.path / "final_shrunk.safetensors", small, {**meta, "phase": "final_shrunk"})
    nonzero = sum(int((p != 0).sum()) for p in small.parameters())
    log("neurons: dead neurons removed\n" + report.table())
    if report.max_abs_diff is not None and report.max_abs_diff > 1e-5:
        log(f"WARNING: the shrunken model's outputs differ by {report.max_abs_diff:.2e} (> 1e-5)")
    log(f"neurons: shrunken model has {report.params_after:,} parameters ({nonzero:,} non-zero); "
        f"largest output difference {report.max_abs_diff:.2e}")
    return {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_nonzero_after": nonzero,
        "max_abs_diff": report.max_abs_diff,
        "iterations": report.iterations,
        "boundaries": report.boundaries,
        "layers": report.rows(),
    }
