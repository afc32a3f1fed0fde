"""Train -> prune -> retrain -> iterate, driven by a recipe: read :func:`run` top to bottom.

``run(recipe)`` is what ``prunet run`` calls. Everything it decides (the best
epoch of each round, whether to stop the ladder) it decides on the validation
split; the test split is only reported. What it writes, and where, is
:mod:`prunet.runfolder`'s; the checks it makes before writing anything are
:mod:`prunet.checks`'.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from prunet import runfolder as F
from prunet.analysis.report import write_report
from prunet.analysis.sensitivity import propose_qualities, sensitivity
from prunet.checkpoint import CheckpointError, model_from_state, read_checkpoint
from prunet.checks import (
    check_checkpoint_fits,
    check_model_fits_data,
    check_ranks,
    check_rounds,
    split_identity,
)
from prunet.config import ConfigError, GradualConfig, Recipe, RoundConfig, recipe_from_dict
from prunet.criteria import TargetError
from prunet.data import DatasetSplits, first_batch, load_data, loader_batches
from prunet.devices import model_device, resolve_device
from prunet.factory import Trust
from prunet.distributed import Ranks, agree, broadcast_object, from_env, gather_objects, init_process_group, \
    mask_digest, shutdown
from prunet.layers import find_layers, format_table, totals
from prunet.masks import baked_copy
from prunet.models import create_model
from prunet.neurons import remove_dead_neurons
from prunet.pruner import Pruner
from prunet.regularize import DropoutAdjuster
from prunet.schedule import PruningSchedule
from prunet.share import share, shared_layers, unshare
from prunet.sparse import export
from prunet.sparse.export import write_model
from prunet.train import DivergedError, EpochRecord, Normalization, evaluate, evaluate_splits, fit

Log = Callable[[str], None]


def _silent(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def run(
    recipe: Recipe,
    *,
    run_dir: str | Path | None = None,
    from_checkpoint: str | Path | None = None,
    overwrite: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Run a recipe: dense training (or a checkpoint), then each prune + retrain round.

    After every epoch and every phase the run saves a resume point in its folder;
    :func:`resume` continues a run that was stopped (a crash, ``kill -9``, or Ctrl-C in a
    folder it does not replace an earlier run in: there Ctrl-C puts the earlier run back).

    Args:
        recipe: a validated recipe.
        run_dir: the run folder; default ``<recipe.output_dir>/<recipe.name>``.
        from_checkpoint: skip dense training and start from this dense checkpoint.
        overwrite: replace an earlier run in the run folder (otherwise that is an error).
        log: where progress lines go.

    Returns:
        The summary also written to ``summary.json``.
    """
    started = time.perf_counter()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    ranks = from_env()
    with _process_group(ranks):
        log = log if ranks.main else _silent
        path = Path(run_dir or Path(recipe.output_dir) / recipe.name)
        folder, error = None, None
        try:
            # The device first (`device: cuda` on a machine without one), then the inputs: bad data, a
            # bad checkpoint or a layer-name typo fails before an earlier run's folder is touched.
            device = _device(recipe, ranks)
            check_ranks(recipe, ranks.world_size)
            data = load_data(recipe.data)
            model, pruner = _starting_model(recipe, from_checkpoint)
            check_model_fits_data(recipe, model, data)
            check_rounds(recipe, pruner.targets if pruner else find_layers(model))
            model.to(device)
            folder = F.RunFolder.create(path, overwrite=overwrite) if ranks.main else F.RankFolder(path)
        except BaseException as e:
            error = e
        _agree(ranks, error, folder)
        state = _RunState(recipe, model, pruner, from_checkpoint=str(from_checkpoint) if from_checkpoint else None)
        state.input_shape = _input_shape(data)
        return _guarded(folder, log, lambda: _execute(state, data, folder, log, started, resumed=False, ranks=ranks))


def resume(run_dir: str | Path, *, trust_factory: Trust = False, log: Log = print) -> dict[str, Any]:
    """Continue a run that was stopped, from its last resume point, in its folder.

    The run goes on with the recipe it started with, after the last epoch it
    finished; its final masks, weights and metrics are bit-identical to those of
    a run that was never stopped (same machine, same thread count).

    Args:
        run_dir: the run folder.
        trust_factory: a run of the user's own model or data names the factories that build
            them, code that resuming calls: ``True`` when you trust the folder (registry models
            and datasets need no trust).

    Returns:
        The summary also written to ``summary.json``.

    Raises:
        RunError: nothing to resume in ``run_dir``, or its resume point is damaged.
        prunet.factory.UntrustedFactoryError: the run names a factory and ``trust_factory`` is False.
    """
    started = time.perf_counter()
    ranks = from_env()
    with _process_group(ranks):
        log = log if ranks.main else _silent
        folder, saved, error = None, None, None
        try:
            folder = F.RunFolder.resume(run_dir) if ranks.main else F.RankFolder(run_dir)
            if ranks.main:
                saved = folder.load_progress()
        except BaseException as e:
            error = e
        _agree(ranks, error, folder)
        try:
            # Rank 0 read the resume point; it hands it to the others (who may have no copy of the folder).
            saved = broadcast_object(saved, ranks)
            started_with = saved.get("world_size", 1)
            if started_with != ranks.world_size:
                raise F.RunError(f"{folder.path} was started with {started_with} process"
                                 f"{'es' if started_with != 1 else ''}; resume it with the same number "
                                 f"(this is {ranks.world_size})")
            state = _RunState.restore(saved, folder.path / F.PROGRESS, trust_factory)
            state.model.to(_device(state.recipe, ranks))
            if state.recipe.threads:
                torch.set_num_threads(state.recipe.threads)
            data = load_data(state.recipe.data)
        except BaseException as e:
            error = e
        _agree(ranks, error, folder)
        folder.rewind(saved)  # only now that the run goes on: a refused resume leaves the folder as it was
        log(f"resume: {folder.path} from {state.where()}")
        return _guarded(folder, log, lambda: _execute(state, data, folder, log, started, resumed=True, ranks=ranks))


def _device(recipe: Recipe, ranks: Ranks) -> torch.device:
    """The recipe's device on this machine (this process's GPU under torchrun), checked usable for its precision."""
    device = resolve_device(recipe.device, local_rank=ranks.local_rank if ranks.distributed else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if recipe.train.amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ConfigError(f"train.amp: bf16 needs a GPU that computes in bfloat16, and {device} "
                              f"({torch.cuda.get_device_name(device)}) does not; use fp16")
    return device


class _process_group:
    """Join (and at the end leave) the process group of a torchrun run; nothing for one process."""

    def __init__(self, ranks: Ranks):
        self.ranks, self.joined = ranks, False

    def __enter__(self) -> None:
        self.joined = init_process_group(self.ranks)

    def __exit__(self, *exc) -> None:
        if self.joined:
            shutdown()


def _agree(ranks: Ranks, error: BaseException | None, folder) -> None:
    """Every rank checked its inputs: go on only if all of them passed (else the folder is put back)."""
    try:
        agree(ranks, error)
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise


def _input_shape(data: DatasetSplits) -> list[int]:
    """One example's shape, as the model sees it (for exports of the model without its data)."""
    x, _ = first_batch(data.val if len(data.val) else data.test, 1, mean=data.mean, std=data.std)
    return list(x.shape[1:])


def _guarded(folder: F.RunFolder, log: Log, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in ``folder``: commit when it finishes, abandon (and say what is left) when it does not."""
    try:
        summary = body()
    except BaseException:
        # An earlier run this one replaces is put back; nothing of it is lost.
        log(f"run stopped: {folder.abandon()}")
        raise
    folder.commit()  # never raises for what it deletes; it always unlocks
    log(f"run folder: {folder.path}")
    return summary


class _RunState:
    """Everything a run needs to go on from where it is: saved at each resume point, restored by :func:`resume`.

    Attributes:
        recipe, model, pruner: the run's recipe, its model (masks included) and pruner
            (None until the first round, or for a dense checkpoint).
        dense: the dense model's accuracies, once the dense phase is done.
        rounds: the results of the finished rounds.
        stopped: why the ladder stopped early, if it did.
        accepted: the model state of the last accepted round (what a failing round falls back to).
        open_round: the round being retrained: ``{"round", "val_acc_pruned", "dropout"}``.
        fit: :func:`prunet.train.fit`'s state after its last finished epoch, in the phase ``fit_phase``.
    """

    def __init__(self, recipe: Recipe, model: nn.Module, pruner: Pruner | None, from_checkpoint: str | None):
        self.recipe, self.model, self.pruner, self.from_checkpoint = recipe, model, pruner, from_checkpoint
        self.dense: dict[str, float] | None = None
        self.rounds: list[dict[str, Any]] = []
        self.stopped: str | None = None
        self.accepted: dict[str, torch.Tensor] | None = None
        self.open_round: dict[str, Any] | None = None
        self.fit: dict[str, Any] | None = None
        self.fit_phase: str | None = None
        self.dropout: dict[str, float] = {}  # ratios to set once the run's dropout adjuster exists
        self.relative: dict[str, float] | None = None  # target rounds' relative qualities, from sensitivity
        self.input_shape: list[int] | None = None  # one example's shape (C, H, W)
        self.world_size = 1

    @property
    def meta(self) -> dict[str, Any]:
        """What every checkpoint of the run records about it."""
        r = self.recipe
        meta = {"model": r.model.spec, "model_kwargs": r.model.arguments(), "recipe": r.name,
                "split": split_identity(r)}
        if self.input_shape is not None:
            meta["input_shape"] = self.input_shape
        return meta

    def where(self) -> str:
        """Where the run stands, for the log."""
        if self.fit is not None:
            return f"{self.fit_phase} after epoch {self.fit['epoch']}"
        if self.dense is None:
            return "the start"
        return f"after round {len(self.rounds)}" if self.rounds else "after the dense phase"

    def resume_fit(self, phase: str) -> dict[str, Any] | None:
        """The saved training state of ``phase``, if the run stopped inside it."""
        return self.fit if self.fit_phase == phase else None

    def save(self, folder: F.RunFolder, fit: dict[str, Any] | None = None, phase: str | None = None) -> None:
        """Write a resume point: this state, with ``fit`` the training phase in progress (if any)."""
        self.fit, self.fit_phase = fit, phase
        folder.save_progress({
            "recipe": self.recipe.to_dict(),
            "from_checkpoint": self.from_checkpoint,
            "model_state": self.model.state_dict(),
            "dropout": {n: m.p for n, m in self.model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)},
            "pruned": self.pruner is not None,
            "dense": self.dense, "rounds": self.rounds, "stopped": self.stopped, "accepted": self.accepted,
            "open_round": self.open_round, "fit": fit, "fit_phase": phase, "relative": self.relative,
            "input_shape": self.input_shape, "world_size": self.world_size,
        })

    @classmethod
    def restore(cls, saved: dict[str, Any], path: Path, trust: Trust) -> "_RunState":
        """The state :meth:`save` wrote; the model rebuilt from the recipe and the saved weights and masks.

        The recipe's factories, if any, are built only when ``trust`` allows them (the file names them).
        """
        try:
            recipe = recipe_from_dict(saved["recipe"])
            recipe.check_trusted(trust, path.parent)
            model, pruner = _build(recipe, saved["model_state"], path)
        except (KeyError, ConfigError, CheckpointError) as e:
            raise F.RunError(f"{path} does not hold a run prunet can continue ({e}); start it again with "
                             f"--overwrite") from None
        state = cls(recipe, model, pruner if saved["pruned"] else None, saved["from_checkpoint"])
        state.dense, state.rounds, state.stopped = saved["dense"], saved["rounds"], saved["stopped"]
        state.accepted, state.open_round = saved["accepted"], saved["open_round"]
        state.fit, state.fit_phase = saved["fit"], saved["fit_phase"]
        state.dropout, state.relative = saved["dropout"], saved.get("relative")
        state.input_shape = saved.get("input_shape")
        return state

    def apply_dropout(self) -> None:
        """Give a restored model the dropout ratios it had when saved (the paper's adjusted ones)."""
        modules = dict(self.model.named_modules())
        for name, p in self.dropout.items():
            modules[name].p = p
        self.dropout = {}


def _execute(
    state: _RunState,
    data: DatasetSplits,
    folder: F.RunFolder,
    log: Log,
    started: float,
    resumed: bool,
    ranks: Ranks,
) -> dict[str, Any]:
    """The run itself, in a folder :func:`run` has made: dense phase, rounds, final model, report.

    Every rank of a distributed run executes it alike; only rank 0's folder writes.
    """
    state.world_size = ranks.world_size
    recipe, model, meta = state.recipe, state.model, state.meta
    norm = Normalization(data.mean, data.std)
    if not resumed:
        folder.write_yaml(F.CONFIG, recipe.to_dict())
        state.save(folder)  # the start: a kill before the first epoch ends resumes from here
    where = "" if str(data.source) == data.name else f" from {data.source}"
    log(f"data: {data.name}{where} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)})")
    ctx = _Context(recipe, data, norm, folder, log, state, ranks)
    device = model_device(model)
    if device.type != "cpu" or ranks.distributed:
        log(f"device: {device}" + (f", {ranks.world_size} processes (rank 0 writes)" if ranks.distributed else ""))

    # 1. Dense training (or a given checkpoint).
    if state.dense is None:
        if state.from_checkpoint:
            log(f"dense: loaded {state.from_checkpoint}")
        else:
            log(f"dense: training {recipe.model.spec} for {recipe.train.epochs} epochs")
            ctx.fit(model, recipe.train, seed=recipe.seed, phase="dense")
        folder.save_checkpoint(F.DENSE, model, {**meta, "phase": "dense"})
        state.dense = ctx.evaluate(model)
        folder.log_metrics("dense", **state.dense)
    dense = state.dense
    log(f"dense: val {dense['val_acc']:.2f}%  test {dense['test_acc']:.2f}%")
    if not recipe.prune.rounds and recipe.prune.gradual is None:
        summary = {"recipe": recipe.name, "model": meta["model"], "dataset": data.name, "dense": dense,
                   "parameters": _parameters(model), "seconds": time.perf_counter() - started}
        folder.write_json(F.SUMMARY, summary)
        folder.forget(F.PROGRESS)
        return broadcast_object(summary, ranks)

    # 2. Prune -> retrain rounds, each kept only while validation accuracy stays within the budget.
    pruner = state.pruner = state.pruner or Pruner(model)
    dropout = DropoutAdjuster(model, [t.layer for t in pruner.targets])  # the model's ratios are the originals
    state.apply_dropout()  # a resumed run's adjusted ratios
    dense_weights = {r.layer: r.weights for r in pruner.summary()}
    if state.accepted is None:
        state.accepted = _copy_state(model)
        state.save(folder)
    for i, rnd in enumerate(recipe.prune.rounds or [recipe.prune.gradual], start=1):
        if i <= len(state.rounds):
            continue  # finished before the run was resumed
        if state.stopped is not None:
            break
        try:
            result = _run_round(ctx, i, rnd, model, pruner, dropout, dense_weights) if isinstance(rnd, RoundConfig) \
                else _run_gradual(ctx, rnd, model, pruner)
        except (DivergedError, TargetError) as e:  # keep the last good round, say why the ladder stopped
            result = {"round": i, "criterion": getattr(rnd, "criterion", "gradual"),
                      "setting": rnd.setting if isinstance(rnd, RoundConfig) else rnd.sparsity, "error": str(e)}
            stop = f"round {i}: {e}"
        else:
            drop, limit = dense["val_acc"] - result["val_acc"], recipe.prune.max_accuracy_drop
            stop = None if limit is None or drop <= limit else \
                f"round {i}: validation accuracy fell {drop:.2f} points below dense (> {limit})"
        result["accepted"] = stop is None
        state.rounds.append(result)
        state.open_round = None
        folder.log_metrics("round", **result)
        if stop is not None:
            state.stopped = stop
            log(f"stop: {stop}; keeping {f'round {i - 1}' if i > 1 else 'the dense model'}")
            model.load_state_dict(state.accepted)
            state.save(folder)
            break
        state.accepted = _copy_state(model)
        folder.save_checkpoint(F.round_checkpoint(i), model, {**meta, "phase": f"round{i}"})
        state.save(folder)
    rounds, stopped = state.rounds, state.stopped

    # 3. The final model, its shrunken twin, the summary and the report.
    dropout.restore()  # a checkpoint's model is rebuilt with the original ratios
    folder.save_checkpoint(F.FINAL, model, {**meta, "phase": "final"})
    final = ctx.evaluate(model)
    summary = _summary(recipe, data, model, pruner, dense, final, rounds, stopped)
    summary["seconds"] = time.perf_counter() - started  # pruning time: neuron removal and the report excluded
    if ranks.main:  # what follows reads and writes files, and computes on one process
        if recipe.prune.remove_dead_neurons:
            summary["neurons"] = _remove_neurons(ctx, model, meta)
        summary["compact"] = _write_compact(ctx)
    if recipe.quantize is not None:  # retrains: every rank
        summary["quantize"] = _quantize(ctx, model, pruner, meta, summary.get("compact"))
    if ranks.distributed:
        summary["world_size"] = ranks.world_size
    if ranks.main:
        folder.write_json(F.SUMMARY, summary)
        _, html = write_report(F.Run(folder.path, trust_factory=recipe.factories()), data=data, progress=False)
        folder.forget(F.PROGRESS)  # finished: nothing left to resume
        log(f"report: {html}")
    summary = broadcast_object(summary, ranks)
    compression = summary["compression"]
    log(
        f"final: {f'{compression:.1f}x fewer weights' if compression else 'every weight pruned'} "
        f"({summary['weights_kept']:,} of {summary['weights']:,}); "
        f"test {final['test_acc']:.2f}% (dense {dense['test_acc']:.2f}%, "
        f"change {summary['accuracy_change_test']:+.2f})"
    )
    return summary


class _Context:
    """What every phase of a run shares: the recipe, the data, the run folder, the log, the run's state."""

    def __init__(self, recipe: Recipe, data: DatasetSplits, norm: Normalization, folder: F.RunFolder, log: Log,
                 state: _RunState, ranks: Ranks):
        self.recipe, self.data, self.norm, self.folder, self.log = recipe, data, norm, folder, log
        self.state, self.ranks = state, ranks
        self.device = model_device(state.model)
        self._teacher: nn.Module | None = None

    def on_epoch(self, rec: EpochRecord) -> None:
        self.folder.log_metrics("epoch", **rec.to_dict())
        self.log(
            f"  {rec.phase} epoch {rec.epoch}: lr {rec.lr:.4g}  train loss {rec.train_loss:.4f} "
            f"acc {rec.train_acc:.2f}%  val {rec.val_acc:.2f}%  ({rec.seconds:.1f}s)"
        )

    def fit(self, model: nn.Module, cfg, *, seed: int, phase: str, **kwargs) -> None:
        """Train one phase, saving a resume point after each epoch; continue it if the run stopped inside it."""
        d, prune = self.recipe.data, self.recipe.prune
        if phase != "dense" and prune.distill_alpha > 0:
            kwargs.update(teacher=self.teacher(), distill_alpha=prune.distill_alpha,
                          distill_temperature=prune.distill_temperature)
        resume = self.state.resume_fit(phase)
        if resume is not None:
            self.log(f"  {phase}: continuing after epoch {resume['epoch']}")
        fit(model, self.data.train, self.data.val, cfg, self.norm, seed=seed, phase=phase, on_epoch=self.on_epoch,
            on_checkpoint=lambda s: self.state.save(self.folder, s, phase), resume=resume,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, ranks=self.ranks, workers=d.workers,
            **kwargs)

    def teacher(self) -> nn.Module:
        """The dense model, from the run's dense checkpoint (the same after a resume), on the run's device."""
        if self._teacher is None:
            self._teacher = self.dense_model()
            self._teacher.requires_grad_(False)
        return self._teacher

    def dense_model(self) -> nn.Module:
        """The run's dense checkpoint as a model on the run's device; rank 0 reads it and hands it to the others."""
        path = self.folder.path / F.DENSE
        state = broadcast_object(read_checkpoint(path)[0] if self.ranks.main else None, self.ranks)
        return _build(self.recipe, state, path)[0].to(self.device)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_splits(model, self.data.val, self.data.test, self.norm, self.recipe.data.eval_batch_size,
                               ranks=self.ranks, workers=self.recipe.data.workers)

    def evaluate_val(self, model: nn.Module) -> float:
        return evaluate(model, self.data.val, self.norm, self.recipe.data.eval_batch_size, ranks=self.ranks,
                        workers=self.recipe.data.workers)[1]

    def check_masks_agree(self, pruner: Pruner, where: str) -> list[str] | None:
        """Under several ranks: every rank's masks, as digests; an error if they differ (they are computed alike)."""
        if not self.ranks.distributed:
            return None
        digests = gather_objects(mask_digest(pruner.masks), self.ranks)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{where}: the masks differ between ranks ({', '.join(d[:12] for d in digests)})")
        return digests


def _starting_model(recipe: Recipe, from_checkpoint: str | Path | None) -> tuple[nn.Module, Pruner | None]:
    """The model to start from: a dense checkpoint (checked against the recipe) or a fresh, seeded one.

    A pruned checkpoint is refused: its accuracy is not the dense baseline every round is measured against.
    """
    if from_checkpoint:
        state, ckpt_meta = read_checkpoint(from_checkpoint)
        check_checkpoint_fits(recipe, ckpt_meta, from_checkpoint)  # before anything is built: the recipe's model
        model, pruner = _build(recipe, state, Path(from_checkpoint))
        if pruner is not None and totals(pruner.summary()).kept < totals(pruner.summary()).weights:
            phase = ckpt_meta.get("phase")
            raise CheckpointError(
                f"--from {from_checkpoint} holds a pruned model{f' ({phase})' if phase else ''}, not a dense one: "
                f"start from the run's {F.DENSE}, or continue a stopped run with 'prunet run --resume RUN_DIR'")
        return model, pruner
    torch.manual_seed(recipe.seed)
    return create_model(recipe.model.spec, **recipe.model.arguments()), None


def _build(recipe: Recipe, state: dict[str, torch.Tensor], path: Path) -> tuple[nn.Module, Pruner | None]:
    """The recipe's model (registry or factory) with the weights and masks of ``state``."""
    return model_from_state(recipe.model.spec, recipe.model.arguments(), state, path)


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
    recipe, state = ctx.recipe, ctx.state
    opened = state.open_round if state.open_round and state.open_round["round"] == i else None
    if opened is None:
        wants_relative = rnd.target and rnd.criterion == "threshold" and rnd.quality is None
        criterion = rnd.make_criterion(_relative_qualities(ctx, model) if wants_relative else None)
        pruner.prune(criterion, layers=rnd.prune)
        # A target round's setting is what it found: the quality (or sparsity) each layer was pruned with.
        setting = getattr(criterion, "qualities", None) or criterion.setting
        pruned_val = ctx.evaluate_val(model)
        kept = {r.layer: r.kept for r in pruner.summary()}
        ratios = dropout.adjust(kept, dense_weights) if recipe.prune.adjust_dropout else {}
        state.open_round = {"round": i, "val_acc_pruned": pruned_val, "dropout": ratios, "setting": setting}
    else:  # resumed inside this round: pruned and adjusted already
        pruned_val, ratios, setting = opened["val_acc_pruned"], opened["dropout"], opened["setting"]
    trainable = None
    if not any(k in ("all", "*") for k in rnd.train):
        modules = {id(t.module): t.module for t in pruner.select(rnd.train)}
        trainable = [p for m in modules.values() for p in m.parameters()]
    cfg = recipe.retrain_config(rnd.epochs, rnd.lr_fraction)
    found = f", target {rnd.target:g}x: {_format_setting(setting)}" if rnd.target else ""
    ctx.log(f"round {i}: pruned {', '.join(rnd.prune)} ({rnd.criterion}{found}); val before retraining "
            f"{pruned_val:.2f}%; retraining {', '.join(rnd.train)} for {cfg.epochs} epochs at lr {cfg.lr:.3g}"
            + (f"; dropout {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}" if ratios else ""))
    ctx.fit(model, cfg, seed=recipe.seed + i, phase=f"round{i}", pruner=pruner, trainable=trainable)
    digests = ctx.check_masks_agree(pruner, f"round {i}")
    return {
        "round": i,
        "criterion": rnd.criterion,
        "setting": setting,
        "target": rnd.target,
        "pruned_layers": rnd.prune,
        "trained_layers": rnd.train,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "val_acc_pruned": pruned_val,
        "dropout": ratios,
        **({"mask_digests": digests} if digests else {}),
        **_outcome(ctx, model, pruner, f"round {i}", start),
    }


def _relative_qualities(ctx: _Context, model: nn.Module) -> dict[str, float] | None:
    """The relative per-layer qualities of target rounds, from the dense model's sensitivity (once per run)."""
    max_drop = ctx.recipe.prune.relative_from_sensitivity
    if max_drop is None:
        return None
    if ctx.state.relative is None:  # every rank sweeps its part of the validation split
        rows = sensitivity(ctx.dense_model(), ctx.data.val, ctx.norm, batch_size=ctx.recipe.data.eval_batch_size,
                           progress=False, model_name=ctx.recipe.model.spec, ranks=ctx.ranks)
        proposal = propose_qualities(rows, max_drop)
        ctx.state.relative = {r.layer: proposal.get(r.layer, 0.0) for r in rows}
        ctx.log("relative qualities from sensitivity (largest within "
                f"{max_drop:g} points): {_format_setting(ctx.state.relative)}")
    return ctx.state.relative


def _outcome(ctx: _Context, model: nn.Module, pruner: Pruner, label: str, start: float) -> dict[str, Any]:
    """A phase's results: accuracies, the per-layer table (logged too), totals, time."""
    acc = ctx.evaluate(model)
    rows = pruner.summary()
    ctx.log(format_table(rows))
    ctx.log(f"{label}: val {acc['val_acc']:.2f}%  test {acc['test_acc']:.2f}%")
    t = totals(rows)
    return {**acc, "layers": [r.to_dict() for r in rows], "weights": t.weights, "weights_kept": t.kept,
            "compression": t.compression_or_none(), "seconds": time.perf_counter() - start}


def _run_gradual(ctx: _Context, g: GradualConfig, model: nn.Module, pruner: Pruner) -> dict[str, Any]:
    """Gradual magnitude pruning: retrain while the masks follow the cubic schedule, then fine-tune."""
    start = time.perf_counter()
    recipe = ctx.recipe
    cfg = recipe.retrain_config(g.epochs, g.lr_fraction)
    steps = loader_batches(len(ctx.data.train), recipe.data.batch_size, ctx.ranks.world_size, train=True)
    schedule = PruningSchedule.from_recipe(recipe, pruner, steps, dense=False)
    resumed = ctx.state.resume_fit("gradual")
    schedule.advance_to(resumed["epoch"] * steps if resumed else 0)
    ctx.state.open_round = {"round": 1}
    ctx.log(f"gradual: {len(schedule.events)} mask updates every {g.every_steps} steps over "
            f"{g.ramp_epochs:g} epochs to sparsity {g.sparsity:.4f} ({g.criterion}), {g.epochs} epochs "
            f"at lr {cfg.lr:.3g}")
    ctx.fit(model, cfg, seed=recipe.seed + 1, phase="gradual", pruner=pruner, on_step=schedule.advance_to,
            choose_after=math.ceil(g.ramp_epochs))
    digests = ctx.check_masks_agree(pruner, "gradual")
    return {
        "round": 1,
        "criterion": f"gradual {g.criterion}",
        "setting": g.sparsity,
        "target": g.target,
        "pruned_layers": ["all"],
        "trained_layers": ["all"],
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        **({"mask_digests": digests} if digests else {}),
        **_outcome(ctx, model, pruner, "gradual", start),
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
        "model": recipe.model.spec,
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


def _remove_neurons(ctx: _Context, model: nn.Module, meta: dict) -> dict[str, Any]:
    """Remove dead neurons from a baked copy, check outputs are unchanged, save it."""
    if not isinstance(model, nn.Sequential):
        why = f"neuron removal needs an nn.Sequential model (a chain of layers); this one is a {type(model).__name__}"
        ctx.log(f"neurons: not removed ({why})")
        return {"skipped": why}
    x, _ = first_batch(ctx.data.val, 512, mean=ctx.norm.mean, std=ctx.norm.std)
    small, report = remove_dead_neurons(baked_copy(model).cpu(), example_input=x)
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
    done = export(ctx.folder.path / F.FINAL, ctx.folder.path / F.COMPACT, trust_factory=ctx.recipe.factories(),
                  owner=ctx.folder)
    dense_file = (ctx.folder.path / F.DENSE).stat().st_size
    ctx.log(f"compact: {F.COMPACT} {done.bytes:,} bytes, {dense_file / done.bytes:.1f}x smaller than {F.DENSE} "
            f"({dense_file:,} bytes)")
    return {"file": F.COMPACT, "bytes": done.bytes, "dense_file_bytes": dense_file,
            "ratio_to_dense_file": dense_file / done.bytes}


def _quantize(ctx: _Context, model: nn.Module, pruner: Pruner, meta: dict, compact: dict) -> dict[str, Any]:
    """Trained weight sharing: cluster a copy of the final model, retrain its centroids, write it Huffman coded.

    The final checkpoint stays the pruned model; the shared one is ``final_shared.prunet``.
    A stopped run redoes this phase from the last round (it is deterministic).
    """
    q, recipe = ctx.recipe.quantize, ctx.recipe
    shared_model = baked_copy(model)
    share(shared_model, q.bits, masks={k: v.bool() for k, v in pruner.masks.items()})
    cfg = recipe.retrain_config(q.epochs, q.lr_fraction)
    ctx.log(f"quantize: weights shared ({_format_setting(q.bits)} bits); retraining the centroids for {cfg.epochs} "
            f"epochs at lr {cfg.lr:.3g}")
    d = recipe.data
    fit(shared_model, ctx.data.train, ctx.data.val, cfg, ctx.norm, seed=recipe.seed + 1000, phase="quantize",
        on_epoch=ctx.on_epoch, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, ranks=ctx.ranks,
        workers=d.workers)
    acc = ctx.evaluate(shared_model)
    if not ctx.ranks.main:
        return acc
    shared_model.cpu()
    layers = shared_layers(shared_model)
    unshare(shared_model)
    path = write_model(ctx.folder.record(F.SHARED_COMPACT), shared_model, {**meta, "phase": "final_shared"},
                       keep={k: v.bool().cpu() for k, v in pruner.masks.items()}, shared=layers)
    size, dense_file = path.stat().st_size, compact["dense_file_bytes"]
    ctx.log(f"quantize: val {acc['val_acc']:.2f}%  test {acc['test_acc']:.2f}%; {F.SHARED_COMPACT} {size:,} bytes, "
            f"{dense_file / size:.1f}x smaller than {F.DENSE} (pruned only: {compact['ratio_to_dense_file']:.1f}x)")
    return {**acc, "file": F.SHARED_COMPACT, "bytes": size, "ratio_to_dense_file": dense_file / size,
            "bits": {name.rsplit(".", 1)[0]: layer.bits for name, layer in layers.items()}, "epochs": cfg.epochs}


def _format_setting(setting: Any) -> str:
    if isinstance(setting, dict):
        return ", ".join(f"{k} {v:.3g}" for k, v in setting.items())
    return f"{setting:.3g}"


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}
