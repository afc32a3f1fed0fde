"""Train -> prune -> retrain -> iterate, driven by a recipe: read :func:`run` top to bottom.

``run(recipe)`` is what ``prunet run`` calls. Everything it decides (the best
epoch of each round, whether to stop the ladder) it decides on the validation
split; the test split is only reported. What it writes, and where, is
:mod:`prunet.runfolder`'s; the checks it makes before writing anything are
:mod:`prunet.checks`'.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from prunet import runfolder as F
from prunet.analysis.report import write_report
from prunet.checkpoint import load_model
from prunet.checks import (
    check_checkpoint_fits,
    check_model_fits_data,
    check_rounds,
    split_identity,
)
from prunet.config import Recipe, RoundConfig
from prunet.data import DatasetSplits, batches, load_data
from prunet.layers import find_layers, format_table, totals
from prunet.masks import baked_copy
from prunet.models import create_model
from prunet.neurons import remove_dead_neurons
from prunet.pruner import Pruner
from prunet.regularize import DropoutAdjuster
from prunet.sparse import export
from prunet.train import DivergedError, EpochRecord, Normalization, evaluate, evaluate_splits, fit

Log = Callable[[str], None]


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
    data = load_data(recipe.data)
    meta = {"model": recipe.model.name, "model_kwargs": recipe.model.kwargs(), "recipe": recipe.name,
            "split": split_identity(recipe)}
    model, pruner = _starting_model(recipe, from_checkpoint)
    check_model_fits_data(recipe, model, data)
    check_rounds(recipe, pruner.targets if pruner else find_layers(model))
    folder = F.RunFolder.create(run_dir or Path(recipe.output_dir) / recipe.name, overwrite=overwrite)
    try:
        summary = _execute(recipe, data, meta, model, pruner, folder, from_checkpoint, log, started)
    except BaseException:
        # An earlier run this one replaces is put back; nothing of it is lost.
        log(f"run stopped: {folder.abandon()}")
        raise
    folder.commit()  # never raises for what it deletes; it always unlocks
    log(f"run folder: {folder.path}")
    return summary


def _execute(
    recipe: Recipe,
    data: DatasetSplits,
    meta: dict[str, Any],
    model: nn.Module,
    pruner: Pruner | None,
    folder: F.RunFolder,
    from_checkpoint: str | Path | None,
    log: Log,
    started: float,
) -> dict[str, Any]:
    """The run itself, in a folder :func:`run` has made: dense phase, rounds, final model, report."""
    norm = Normalization(data.mean, data.std)
    folder.write_yaml(F.CONFIG, recipe.to_dict())
    log(f"data: {data.name} from {data.source} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)})")
    ctx = _Context(recipe, data, norm, folder, log)

    # 1. Dense training (or a given checkpoint).
    if from_checkpoint:
        log(f"dense: loaded {from_checkpoint}")
    else:
        log(f"dense: training {recipe.model.name} for {recipe.train.epochs} epochs")
        ctx.fit(model, recipe.train, seed=recipe.seed, phase="dense")
    folder.save_checkpoint(F.DENSE, model, {**meta, "phase": "dense"})
    dense = ctx.evaluate(model)
    log(f"dense: val {dense['val_acc']:.2f}%  test {dense['test_acc']:.2f}%")
    folder.log_metrics("dense", **dense)
    if not recipe.prune.rounds:
        summary = {"recipe": recipe.name, "model": meta["model"], "dataset": data.name, "dense": dense,
                   "parameters": _parameters(model), "seconds": time.perf_counter() - started}
        folder.write_json(F.SUMMARY, summary)
        return summary

    # 2. Prune -> retrain rounds, each kept only while validation accuracy stays within the budget.
    pruner = pruner or Pruner(model)
    dropout = DropoutAdjuster(model, [t.layer for t in pruner.targets])
    dense_weights = {r.layer: r.weights for r in pruner.summary()}
    rounds: list[dict[str, Any]] = []
    accepted_state = _copy_state(model)
    stopped = None
    for i, rnd in enumerate(recipe.prune.rounds, start=1):
        try:
            result = _run_round(ctx, i, rnd, model, pruner, dropout, dense_weights)
        except DivergedError as e:  # keep the last good round, say why the ladder stopped
            result = {"round": i, "criterion": rnd.criterion, "setting": rnd.setting, "error": str(e)}
            stop = f"round {i}: {e}"
        else:
            drop, limit = dense["val_acc"] - result["val_acc"], recipe.prune.max_accuracy_drop
            stop = None if limit is None or drop <= limit else \
                f"round {i}: validation accuracy fell {drop:.2f} points below dense (> {limit})"
        result["accepted"] = stop is None
        rounds.append(result)
        folder.log_metrics("round", **result)
        if stop is not None:
            stopped = stop
            log(f"stop: {stopped}; keeping {f'round {i - 1}' if i > 1 else 'the dense model'}")
            model.load_state_dict(accepted_state)
            break
        accepted_state = _copy_state(model)
        folder.save_checkpoint(F.round_checkpoint(i), model, {**meta, "phase": f"round{i}"})

    # 3. The final model, its shrunken twin, the summary and the report.
    dropout.restore()  # a checkpoint's model is rebuilt with the original ratios
    folder.save_checkpoint(F.FINAL, model, {**meta, "phase": "final"})
    final = ctx.evaluate(model)
    summary = _summary(recipe, data, model, pruner, dense, final, rounds, stopped)
    summary["seconds"] = time.perf_counter() - started  # pruning time: neuron removal and the report excluded
    if recipe.prune.remove_dead_neurons:
        summary["neurons"] = _remove_neurons(ctx, model, meta)
    summary["compact"] = _write_compact(ctx)
    folder.write_json(F.SUMMARY, summary)
    _, html = write_report(folder.path, data=data, progress=False)
    log(f"report: {html}")
    compression = summary["compression"]
    log(
        f"final: {f'{compression:.1f}x fewer weights' if compression else 'every weight pruned'} "
        f"({summary['weights_kept']:,} of {summary['weights']:,}); "
        f"test {final['test_acc']:.2f}% (dense {dense['test_acc']:.2f}%, "
        f"change {summary['accuracy_change_test']:+.2f})"
    )
    return summary


class _Context:
    """What every phase of a run shares: the recipe, the data, the run folder, the log."""

    def __init__(self, recipe: Recipe, data: DatasetSplits, norm: Normalization, folder: F.RunFolder, log: Log):
        self.recipe, self.data, self.norm, self.folder, self.log = recipe, data, norm, folder, log

    def on_epoch(self, rec: EpochRecord) -> None:
        self.folder.log_metrics("epoch", **rec.to_dict())
        self.log(
            f"  {rec.phase} epoch {rec.epoch}: lr {rec.lr:.4g}  train loss {rec.train_loss:.4f} "
            f"acc {rec.train_acc:.2f}%  val {rec.val_acc:.2f}%  ({rec.seconds:.1f}s)"
        )

    def fit(self, model: nn.Module, cfg, *, seed: int, phase: str, **kwargs) -> None:
        d = self.recipe.data
        fit(model, self.data.train, self.data.val, cfg, self.norm, seed=seed, phase=phase, on_epoch=self.on_epoch,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, **kwargs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_splits(model, self.data.val, self.data.test, self.norm, self.recipe.data.eval_batch_size)


def _starting_model(recipe: Recipe, from_checkpoint: str | Path | None) -> tuple[nn.Module, Pruner | None]:
    """The model to start from: a checkpoint (checked against the recipe) or a fresh, seeded one."""
    if from_checkpoint:
        model, pruner, ckpt_meta = load_model(from_checkpoint)
        check_checkpoint_fits(recipe, ckpt_meta, from_checkpoint)
        return model, pruner
    torch.manual_seed(recipe.seed)
    return create_model(recipe.model.name, **recipe.model.kwargs()), None


def _run_round(
    ctx: _Context,
    i: int,
    rnd: RoundConfig,
    model: nn.Module,
    pruner: Pruner,
    dropout: DropoutAdjuster,
    dense_weights: dict[str, int],
) -> dict[str, Any]:
    """One round: prune the named layers, adjust dropout, retrain the named layers."""
    start = time.perf_counter()
    recipe = ctx.recipe
    pruner.prune(rnd.make_criterion(), layers=rnd.prune)
    _, pruned_val = evaluate(model, ctx.data.val, ctx.norm, recipe.data.eval_batch_size)
    kept = {r.layer: r.kept for r in pruner.summary()}
    ratios = dropout.adjust(kept, dense_weights) if recipe.prune.adjust_dropout else {}
    trainable = None
    if not any(k in ("all", "*") for k in rnd.train):
        modules = {id(t.module): t.module for t in pruner.select(rnd.train)}
        trainable = [p for m in modules.values() for p in m.parameters()]
    cfg = recipe.retrain_config(rnd.epochs, rnd.lr_fraction)
    ctx.log(f"round {i}: pruned {', '.join(rnd.prune)} ({rnd.criterion}); val before retraining {pruned_val:.2f}%; "
            f"retraining {', '.join(rnd.train)} for {cfg.epochs} epochs at lr {cfg.lr:.3g}"
            + (f"; dropout {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}" if ratios else ""))
    ctx.fit(model, cfg, seed=recipe.seed + i, phase=f"round{i}", pruner=pruner, trainable=trainable)
    acc = ctx.evaluate(model)
    rows = pruner.summary()
    ctx.log(format_table(rows))
    ctx.log(f"round {i}: val {acc['val_acc']:.2f}%  test {acc['test_acc']:.2f}%")
    t = totals(rows)
    return {
        "round": i,
        "criterion": rnd.criterion,
        "setting": rnd.setting,
        "pruned_layers": rnd.prune,
        "trained_layers": rnd.train,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "val_acc_pruned": pruned_val,
        **acc,
        "dropout": ratios,
        "layers": [r.to_dict() for r in rows],
        "weights": t.weights,
        "weights_kept": t.kept,
        "compression": t.compression_or_none(),
        "seconds": time.perf_counter() - start,
    }


def _summary(
    recipe: Recipe,
    data: DatasetSplits,
    model: nn.Module,
    pruner: Pruner,
    dense: dict[str, float],
    final: dict[str, float],
    rounds: list[dict[str, Any]],
    stopped: str | None,
) -> dict[str, Any]:
    """``summary.json``: accuracies before and after, compression of weights and of all parameters, rounds."""
    rows = pruner.summary()
    t = totals(rows)
    params_dense = _parameters(model)
    params_kept = params_dense - (t.weights - t.kept)
    return {
        "recipe": recipe.name,
        "model": recipe.model.name,
        "dataset": data.name,
        "dense": dense,
        "final": final,
        "accuracy_change_test": final["test_acc"] - dense["test_acc"],
        "accuracy_change_val": final["val_acc"] - dense["val_acc"],
        "weights": t.weights,
        "weights_kept": t.kept,
        "compression": t.compression_or_none(),
        "parameters": params_dense,
        "parameters_kept": params_kept,
        "parameter_compression": params_dense / params_kept if params_kept else None,
        "layers": [r.to_dict() for r in rows],
        "rounds": rounds,
        "stopped": stopped,
    }


def _remove_neurons(ctx: _Context, model: nn.Module, meta: dict) -> dict[str, Any] | None:
    """Remove dead neurons from a baked copy, check outputs are unchanged, save it."""
    if not isinstance(model, nn.Sequential):
        ctx.log("neurons: not removed (needs an nn.Sequential model)")
        return None
    x, _ = next(batches(ctx.data.val, 512, shuffle=False, mean=ctx.norm.mean, std=ctx.norm.std))
    small, report = remove_dead_neurons(baked_copy(model), example_input=x)
    ctx.folder.save_checkpoint(F.SHRUNK, small, {**meta, "phase": "final_shrunk"})
    nonzero = sum(int((p != 0).sum()) for p in small.parameters())
    ctx.log("neurons: dead neurons removed\n" + report.table())
    if report.max_abs_diff is not None and report.max_abs_diff > 1e-5:
        ctx.log(f"WARNING: the shrunken model's outputs differ by {report.max_abs_diff:.2e} (> 1e-5)")
    ctx.log(f"neurons: shrunken model has {report.params_after:,} parameters ({nonzero:,} non-zero); "
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


def _write_compact(ctx: _Context) -> dict[str, Any]:
    """The final model as a compact file (survivors and relative indices), sized against the dense checkpoint."""
    done = export(ctx.folder.path / F.FINAL, ctx.folder.record(F.COMPACT))
    dense_file = (ctx.folder.path / F.DENSE).stat().st_size
    ctx.log(f"compact: {F.COMPACT} {done.bytes:,} bytes, {dense_file / done.bytes:.1f}x smaller than {F.DENSE} "
            f"({dense_file:,} bytes)")
    return {"file": F.COMPACT, "bytes": done.bytes, "dense_file_bytes": dense_file,
            "ratio_to_dense_file": dense_file / done.bytes}


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}
