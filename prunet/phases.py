"""The phases of a run, each a function of a :class:`RunContext`: dense, round, gradual, acdc, final, neurons,
compact, quantize, report.

A phase does its work and returns a :class:`PhaseResult`; it knows nothing of resume points,
ranks or the stop rule. :func:`phases_for` lists a recipe's phases; the one driver that runs
them (skipping finished ones on resume, saving resume points, applying the stop rule, making
the ranks agree) is :func:`prunet.pipeline.drive`.

Example:
    >>> [p.name for p in phases_for(recipe_from_dict({"prune": {"rounds": [{"quality": 1.0}] * 2}}))]
    ['dense', 'round1', 'round2', 'final', 'neurons', 'compact', 'report']
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from prunet import runfolder as F
from prunet.analysis.report import write_report
from prunet.analysis.sensitivity import propose_qualities, sensitivity
from prunet.checkpoint import CheckpointError, model_from_state, read_checkpoint
from prunet.checks import split_identity
from prunet.config import AcdcConfig, ConfigError, GradualConfig, Recipe, RoundConfig, recipe_from_dict
from prunet.data import DatasetSplits, first_batch, loader_batches
from prunet.devices import model_device
from prunet.distributed import Ranks, broadcast_object, gather_objects, mask_digest
from prunet.factory import Trust
from prunet.layers import format_table, totals
from prunet.masks import baked_copy
from prunet.neurons import remove_dead_neurons
from prunet.pruner import Pruner
from prunet.regularize import DropoutAdjuster
from prunet.schedule import PruningSchedule
from prunet.share import share, shared_layers, unshare
from prunet.sparse import export
from prunet.sparse.export import save_compact
from prunet.tasks import Task
from prunet.train import DivergedError, EpochRecord, FitOptions, Normalization, evaluate, evaluate_splits, fit

Log = Callable[[str], None]
RESUME_FORMAT = 2  # 2: phases by name (``finished``)


class RunState:
    """Everything a run needs to go on from where it is: saved at each resume point, restored by ``resume``.

    Attributes:
        recipe, model, pruner: the run's recipe, its model (masks included) and pruner
            (None until the first round, or for a dense checkpoint).
        finished: the names of the phases done (a resumed run skips them).
        dense: the dense model's losses and metric values (``val_acc``, ...), once the dense phase is done.
        rounds: the results of the finished rounds.
        stopped: why the ladder stopped early, if it did.
        accepted: the model state of the last accepted round (what a failing round falls back to).
        open_round: the round being retrained: ``{"round", "val_<key>_pruned", "dropout", "setting"}``.
        fit: :func:`prunet.train.fit`'s state after its last finished epoch, in the phase ``fit_phase``.
    """

    def __init__(self, recipe: Recipe, model: nn.Module, pruner: Pruner | None, from_checkpoint: str | None):
        self.recipe, self.model, self.pruner, self.from_checkpoint = recipe, model, pruner, from_checkpoint
        self.finished: list[str] = []
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
        self.input_dtype: str | None = "float32"  # its element type (int64 for token ids; None: not one of meta's)
        self.world_size = 1

    @property
    def meta(self) -> dict[str, Any]:
        """What every checkpoint of the run records about it."""
        r = self.recipe
        meta = {"model": r.model.spec, "model_kwargs": r.model.arguments(), "recipe": r.name,
                "split": split_identity(r)}
        if self.input_shape is not None:
            meta["input_shape"] = self.input_shape
            if self.input_dtype is not None:
                meta["input_dtype"] = self.input_dtype
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

    def save(self, folder: F.Folder, fit: dict[str, Any] | None = None, phase: str | None = None) -> None:
        """Write a resume point: this state, with ``fit`` the training phase in progress (if any)."""
        self.fit, self.fit_phase = fit, phase
        folder.save_progress({
            "resume_format": RESUME_FORMAT,
            "recipe": self.recipe.to_dict(),
            "from_checkpoint": self.from_checkpoint,
            "model_state": self.model.state_dict(),
            "dropout": {n: m.p for n, m in self.model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)},
            "pruned": self.pruner is not None, "finished": self.finished,
            "dense": self.dense, "rounds": self.rounds, "stopped": self.stopped, "accepted": self.accepted,
            "open_round": self.open_round, "fit": fit, "fit_phase": phase, "relative": self.relative,
            "input_shape": self.input_shape, "input_dtype": self.input_dtype, "world_size": self.world_size,
        })

    @classmethod
    def restore(cls, saved: dict[str, Any], path: Path, trust: Trust) -> "RunState":
        """The state :meth:`save` wrote; the model rebuilt from the recipe and the saved weights and masks.

        The recipe's factories, if any, are built only when ``trust`` allows them (the file names them).
        """
        try:
            if saved.get("resume_format") != RESUME_FORMAT:
                raise ConfigError(f"it was saved by another version of prunet (resume format "
                                  f"{saved.get('resume_format', 1)}, this one reads {RESUME_FORMAT})")
            recipe = recipe_from_dict(saved["recipe"])
            recipe.check_trusted(trust, path.parent)
            model, pruner = build(recipe, saved["model_state"], path)
        except (KeyError, ConfigError, CheckpointError) as e:
            raise F.RunError(f"{path} does not hold a run prunet can continue ({e}); start it again with "
                             f"--overwrite") from None
        state = cls(recipe, model, pruner if saved["pruned"] else None, saved["from_checkpoint"])
        for name in ("finished", "dense", "rounds", "stopped", "accepted", "open_round", "fit", "fit_phase",
                     "dropout", "relative", "input_shape"):
            setattr(state, name, saved[name])
        state.input_dtype = saved.get("input_dtype", "float32")  # absent from resume points of earlier versions
        return state


def build(recipe: Recipe, state: dict[str, torch.Tensor], path: Path) -> tuple[nn.Module, Pruner | None]:
    """The recipe's model (registry or factory) with the weights and masks of ``state``."""
    return model_from_state(recipe.model.spec, recipe.model.arguments(), state, path)


@dataclass
class PhaseResult:
    """What a phase hands the driver.

    Attributes:
        round: a pruning phase's results: a row of ``summary.json``'s ``rounds``, a ``metrics.jsonl`` line.
        summary: entries for ``summary.json`` (``{"neurons": ...}``).
    """

    round: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """One step of a run.

    Attributes:
        name: its key among the finished phases of a resume point (``dense``, ``round2``, ``final``...).
        run: the work, ``run(ctx) -> PhaseResult``.
        resumable: a resume point is saved after it and a resumed run skips it. The phases after the
            last round are not: a run stopped among them redoes them from there (they are deterministic).
        prunes: a pruning round (``what``: its number, criterion and setting): the stop rule judges it,
            and once the ladder stopped the rounds left are skipped.
        main_only: it reads and writes files and computes on rank 0 alone; the other ranks wait for it.
    """

    name: str
    run: Callable[["RunContext"], PhaseResult]
    resumable: bool = False
    prunes: bool = False
    main_only: bool = False
    what: dict[str, Any] = field(default_factory=dict)


def phases_for(recipe: Recipe) -> list[Phase]:
    """A recipe's run as a list of phases, in order."""
    phases = [Phase("dense", dense, resumable=True)]
    p = recipe.prune
    if not p.rounds and p.gradual is None and p.acdc is None:
        return phases + [Phase("summary", dense_summary, main_only=True)]
    if p.gradual is not None:
        phases.append(Phase("gradual", functools.partial(gradual, g=p.gradual), resumable=True, prunes=True,
                            what={"round": 1, "criterion": "gradual", "setting": p.gradual.sparsity}))
    if p.acdc is not None:
        phases.append(Phase("acdc", functools.partial(acdc, a=p.acdc), resumable=True, prunes=True,
                            what={"round": 1, "criterion": "acdc", "setting": p.acdc.sparsity}))
    for i, rnd in enumerate(p.rounds, start=1):
        phases.append(Phase(f"round{i}", functools.partial(prune_round, i=i, rnd=rnd), resumable=True, prunes=True,
                            what={"round": i, "criterion": rnd.criterion, "setting": rnd.setting}))
    phases.append(Phase("final", final))
    if p.remove_dead_neurons:
        phases.append(Phase("neurons", neurons, main_only=True))
    phases.append(Phase("compact", compact, main_only=True))
    if recipe.quantize is not None:
        phases += [Phase("quantize", quantize), Phase("shared_file", shared_file, main_only=True)]
    return phases + [Phase("report", report, main_only=True)]


class RunContext:
    """What every phase of a run shares: the recipe, the data, the run folder, the log, the run's state.

    Attributes:
        summary: ``summary.json`` as the phases after the rounds build it.
        task, metric: the recipe's loss and metric (``train.loss``, ``train.metric``): every value a phase
            logs or records, and every choice, goes through the metric.
    """

    def __init__(self, state: RunState, data: DatasetSplits, folder: F.Folder, log: Log, ranks: Ranks,
                 started: float, task: Task | None = None):
        self.recipe, self.state, self.data, self.folder, self.log = state.recipe, state, data, folder, log
        self.ranks, self.started = ranks, started
        self.task = task or state.recipe.train.make_task()
        self.metric = self.task.metric
        self.model = state.model
        self.norm = Normalization(data.mean, data.std)
        self.device = model_device(state.model)
        self.summary: dict[str, Any] = {}
        self.shared_model: nn.Module | None = None  # the quantize phase's model, for the shared file
        self._teacher: nn.Module | None = None
        self._dropout: DropoutAdjuster | None = None
        self._dense_weights: dict[str, int] = {}

    def pruning(self) -> tuple[Pruner, DropoutAdjuster]:
        """The run's pruner and dropout adjuster, made when the first round needs them (or restored)."""
        if self._dropout is None:
            pruner = self.state.pruner = self.state.pruner or Pruner(self.model)
            # Made from the model's own (original) ratios, then given a resumed run's adjusted ones.
            self._dropout = DropoutAdjuster(self.model, [t.layer for t in pruner.targets])
            modules = dict(self.model.named_modules())
            for name, ratio in self.state.dropout.items():
                modules[name].p = ratio
            self.state.dropout = {}
            self._dense_weights = {r.layer: r.weights for r in pruner.summary()}
            self.log(f"pruner: {pruner.coverage()}")
        return self.state.pruner, self._dropout

    def on_epoch(self, rec: EpochRecord) -> None:
        self.folder.log_metrics("epoch", **rec.to_dict())
        m = self.metric
        self.log(
            f"  {rec.phase} epoch {rec.epoch}: lr {rec.lr:.4g}  train loss {rec.train_loss:.4f} "
            f"{m.key} {m.format(rec.train_metric)}  val {m.format(rec.val_metric)}  ({rec.seconds:.1f}s)"
        )

    def values(self, where: dict[str, Any]) -> str:
        """``val 89.12%  test 88.90%``: a result's validation and test metric, for the log."""
        m = self.metric
        return f"val {m.format(where[m.field('val')])}  test {m.format(where[m.field('test')])}"

    def fit(self, model: nn.Module, cfg, *, seed: int, phase: str, **options) -> None:
        """Train one phase, saving a resume point after each epoch; continue it if the run stopped inside it.
        ``options`` are more :class:`prunet.train.FitOptions` fields."""
        prune = self.recipe.prune
        if phase != "dense" and prune.distill_alpha > 0:
            options.update(teacher=self.teacher(), distill_alpha=prune.distill_alpha,
                           distill_temperature=prune.distill_temperature)
        fit(model, self.data.train, self.data.val, cfg, self.norm, self.fit_options(seed=seed, phase=phase, **options))

    def fit_options(self, *, seed: int, phase: str, resumable: bool = True, **options) -> FitOptions:
        """The run's :class:`~prunet.train.FitOptions` for a phase: its data settings, ranks and metrics; a
        ``resumable`` phase saves a resume point after each epoch and continues where the run stopped inside it."""
        d = self.recipe.data
        resume = self.state.resume_fit(phase) if resumable else None
        if resume is not None:
            self.log(f"  {phase}: continuing after epoch {resume['epoch']}")
        save = (lambda s: self.state.save(self.folder, s, phase)) if resumable else None
        return FitOptions(batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, seed=seed, phase=phase,
                          on_epoch=self.on_epoch, on_checkpoint=save, resume=resume, ranks=self.ranks,
                          workers=d.workers, task=self.task, **options)

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
        return build(self.recipe, state, path)[0].to(self.device)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss and metric on the validation and test splits (``val_loss``, ``val_acc``, ...)."""
        return evaluate_splits(model, self.data.val, self.data.test, self.norm, self.recipe.data.eval_batch_size,
                               ranks=self.ranks, workers=self.recipe.data.workers, task=self.task)

    def evaluate_val(self, model: nn.Module) -> float:
        """The metric on the validation split."""
        return evaluate(model, self.data.val, self.norm, self.recipe.data.eval_batch_size, ranks=self.ranks,
                        workers=self.recipe.data.workers, task=self.task)[1]

    def check_masks_agree(self, pruner: Pruner, where: str) -> list[str] | None:
        """Under several ranks: every rank's masks, as digests; an error if they differ (they are computed alike)."""
        if not self.ranks.distributed:
            return None
        digests = gather_objects(mask_digest(pruner.masks), self.ranks)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{where}: the masks differ between ranks ({', '.join(d[:12] for d in digests)})")
        return digests


# --- the phases ---------------------------------------------------------------------------------------


def dense(ctx: RunContext) -> PhaseResult:
    """Dense training (or the given dense checkpoint), saved as ``dense.safetensors`` and evaluated."""
    recipe, state = ctx.recipe, ctx.state
    if state.from_checkpoint:
        ctx.log(f"dense: loaded {state.from_checkpoint}")
    else:
        ctx.log(f"dense: training {recipe.model.spec} for {recipe.train.epochs} epochs")
        ctx.fit(ctx.model, recipe.train, seed=recipe.seed, phase="dense")
    ctx.folder.save_checkpoint(F.DENSE, ctx.model, {**state.meta, "phase": "dense"})
    state.dense = ctx.evaluate(ctx.model)
    ctx.folder.log_metrics("dense", **state.dense)
    ctx.log(f"dense: {ctx.values(state.dense)}")
    return PhaseResult()


def dense_summary(ctx: RunContext) -> PhaseResult:
    """A recipe without rounds (``prunet train``): the dense model's summary."""
    summary = {"recipe": ctx.recipe.name, "model": ctx.recipe.model.spec, "dataset": ctx.data.name,
               **_metric_entry(ctx), "dense": ctx.state.dense, "parameters": _parameters(ctx.model),
               "seconds": time.perf_counter() - ctx.started}
    ctx.folder.write_json(F.SUMMARY, summary)
    ctx.folder.forget(F.PROGRESS)
    return PhaseResult(summary=summary)


def prune_round(ctx: RunContext, i: int, rnd: RoundConfig) -> PhaseResult:
    """One round: prune the named layers, adjust dropout, retrain the named layers."""
    start = time.perf_counter()
    recipe, state, model = ctx.recipe, ctx.state, ctx.model
    pruned_field = ctx.metric.field("val") + "_pruned"
    pruner, dropout = ctx.pruning()
    opened = state.open_round if state.open_round and state.open_round["round"] == i else None
    if opened is None:
        wants_relative = rnd.target and rnd.criterion == "threshold" and rnd.quality is None
        criterion = rnd.make_criterion(_relative_qualities(ctx) if wants_relative else None)
        pruner.prune(criterion, layers=rnd.prune)
        # A target round's setting is what it found: the quality (or sparsity) each layer was pruned with.
        setting = getattr(criterion, "qualities", None) or criterion.setting
        pruned_val = ctx.evaluate_val(model)
        kept = {r.layer: r.kept for r in pruner.summary()}
        ratios = dropout.adjust(kept, ctx._dense_weights) if recipe.prune.adjust_dropout else {}
        state.open_round = {"round": i, pruned_field: pruned_val, "dropout": ratios, "setting": setting}
    else:  # resumed inside this round: pruned and adjusted already
        pruned_val, ratios, setting = opened[pruned_field], opened["dropout"], opened["setting"]
    trainable = None
    if not any(k in ("all", "*") for k in rnd.train):
        modules = {id(t.module): t.module for t in pruner.select(rnd.train)}
        trainable = [p for m in modules.values() for p in m.parameters()]
    cfg = recipe.retrain_config(rnd.epochs, rnd.lr_fraction)
    found = f", target {rnd.target:g}x: {format_setting(setting)}" if rnd.target else ""
    ctx.log(f"round {i}: pruned {', '.join(rnd.prune)} ({rnd.criterion}{found}); val before retraining "
            f"{ctx.metric.format(pruned_val)}; retraining {', '.join(rnd.train)} for {cfg.epochs} epochs at lr {cfg.lr:.3g}"
            + (f"; dropout {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}" if ratios else ""))
    ctx.fit(model, cfg, seed=recipe.seed + i, phase=f"round{i}", pruner=pruner, trainable=trainable)
    return PhaseResult(round={
        "round": i, "criterion": rnd.criterion, "setting": setting, "target": rnd.target,
        "pruned_layers": rnd.prune, "trained_layers": rnd.train, "epochs": cfg.epochs, "lr": cfg.lr,
        pruned_field: pruned_val, "dropout": ratios, **_outcome(ctx, pruner, f"round {i}", start),
    })


def gradual(ctx: RunContext, g: GradualConfig) -> PhaseResult:
    """Gradual magnitude pruning: retrain while the masks follow the cubic schedule, then fine-tune."""
    return _scheduled(ctx, "gradual", g, lambda schedule, steps: (
        f"{len(schedule.events)} mask updates every {g.every_steps} steps over {g.ramp_epochs:g} epochs to "
        f"sparsity {g.sparsity:.4f} ({g.criterion}), {g.epochs} epochs", math.ceil(g.ramp_epochs)))


def acdc(ctx: RunContext, a: AcdcConfig) -> PhaseResult:
    """AC/DC: compressed and decompressed phases in turn, then the last compressed one, whose best epoch is kept."""
    def describe(schedule: PruningSchedule, steps: int) -> tuple[str, int]:
        last = schedule.events[-1].step // steps
        return (f"{a.warmup_epochs} dense epochs, then compressed / decompressed phases of {a.phase_epochs} epochs, "
                f"compressed from epoch {last + 1} of {a.epochs}, to sparsity {a.sparsity:.4f} ({a.criterion})", last)
    return _scheduled(ctx, "acdc", a, describe)


def _scheduled(ctx: RunContext, name: str, phase: GradualConfig | AcdcConfig,
               describe: Callable[[PruningSchedule, int], tuple[str, int]]) -> PhaseResult:
    """One retraining phase whose masks follow the recipe's schedule (gradual or AC/DC) step by step.

    ``describe(schedule, steps_per_epoch)`` gives the log line and the epochs after which the best epoch is
    chosen (once the masks are final). A resumed phase counts the schedule's changes up to its checkpoint as
    made, without making them again: the checkpoint holds their masks, and an AC/DC prune replayed on a
    decompressed phase's weights would not give them back.
    """
    start = time.perf_counter()
    recipe = ctx.recipe
    pruner, _ = ctx.pruning()
    steps = loader_batches(len(ctx.data.train), recipe.data.batch_size, ctx.ranks.world_size, train=True)
    resumed = ctx.state.resume_fit(name)
    # The rate a retry after a divergence had reached (a resume point records it from the retry's start on).
    scales = SLOWER[SLOWER.index((ctx.state.open_round or {}).get("lr_scale", 1.0)):]
    for scale in scales:
        cfg = recipe.retrain_config(phase.epochs, phase.lr_fraction)
        cfg = dataclasses.replace(cfg, lr=cfg.lr * scale)
        schedule = PruningSchedule.from_recipe(recipe, pruner, steps, dense=False)
        if resumed:
            schedule.skip_to(resumed["epoch"] * steps)
        else:
            schedule.advance_to(0)  # the first change before the first step
        ctx.state.open_round = {"round": 1, "lr_scale": scale}
        what, choose_after = describe(schedule, steps)
        ctx.log(f"{name}: {what}, at lr {cfg.lr:.3g}")
        try:
            ctx.fit(ctx.model, cfg, seed=recipe.seed + 1, phase=name, pruner=pruner, on_step=schedule.advance_to,
                    choose_after=choose_after)
            break
        except DivergedError as e:
            if scale == scales[-1]:
                raise
            # The phase again from its start (the dense model, every mask open) at a lower rate: a pruning
            # step at a rate the dense model took can still blow the loss up (LeNet-5 at 50x, lr 0.05).
            lower = SLOWER[SLOWER.index(scale) + 1]
            ctx.log(f"{name}: {e}; the phase again from its start at {lower:g} of the rate")
            ctx.folder.log_metrics("retry", phase=name, error=str(e), lr_scale=lower)
            ctx.model.load_state_dict(ctx.state.accepted)
            ctx.state.open_round, resumed = {"round": 1, "lr_scale": lower}, None
            ctx.state.save(ctx.folder)  # a stop from here resumes the retry, at its rate, from the phase's start
    return PhaseResult(round={
        "round": 1, "criterion": f"{name} {phase.criterion}", "setting": phase.sparsity, "target": phase.target,
        "pruned_layers": ["all"], "trained_layers": ["all"], "epochs": cfg.epochs, "lr": cfg.lr,
        **_outcome(ctx, pruner, name, start),
    })


SLOWER = (1.0, 0.5, 0.25)
"""A gradual or AC/DC phase whose loss diverges starts again from the phase's start at the next of these
fractions of its learning rate (as ``benchmarks/bench_frontier.py`` trains the methods it compares)."""


def _relative_qualities(ctx: RunContext) -> dict[str, float] | None:
    """The relative per-layer qualities of target rounds, from the dense model's sensitivity (once per run)."""
    max_drop = ctx.recipe.prune.relative_from_sensitivity
    if max_drop is None:
        return None
    if ctx.state.relative is None:  # every rank sweeps its part of the validation split
        rows = sensitivity(ctx.dense_model(), ctx.data.val, ctx.norm, batch_size=ctx.recipe.data.eval_batch_size,
                           progress=False, model_name=ctx.recipe.model.spec, ranks=ctx.ranks, task=ctx.task)
        proposal = propose_qualities(rows, max_drop)
        ctx.state.relative = {r.layer: proposal.get(r.layer, 0.0) for r in rows}
        ctx.log("relative qualities from sensitivity (largest within "
                f"{max_drop:g} {ctx.metric.points}): {format_setting(ctx.state.relative)}")
    return ctx.state.relative


def _outcome(ctx: RunContext, pruner: Pruner, label: str, start: float) -> dict[str, Any]:
    """A round's results: losses and metric, the per-layer table (logged too), totals, time, the ranks' mask
    digests."""
    digests = ctx.check_masks_agree(pruner, label)
    acc = ctx.evaluate(ctx.model)
    rows = pruner.summary()
    ctx.log(format_table(rows))
    ctx.log(f"{label}: {ctx.values(acc)}")
    t = totals(rows)
    return {**({"mask_digests": digests} if digests else {}), **acc, "layers": [r.to_dict() for r in rows],
            "weights": t.weights, "weights_kept": t.kept, "compression": t.compression_or_none(),
            "seconds": time.perf_counter() - start}


def final(ctx: RunContext) -> PhaseResult:
    """The final model: original dropout ratios, ``final.safetensors``, evaluated; the summary's body."""
    pruner, dropout = ctx.pruning()
    dropout.restore()  # a checkpoint's model is rebuilt with the original ratios
    ctx.folder.save_checkpoint(F.FINAL, ctx.model, {**ctx.state.meta, "phase": "final"})
    acc = ctx.evaluate(ctx.model)
    summary = _summary(ctx, pruner, acc)
    summary["seconds"] = time.perf_counter() - ctx.started  # pruning time: neuron removal and the report excluded
    return PhaseResult(summary=summary)


def _summary(ctx: RunContext, pruner: Pruner, final_acc: dict[str, float]) -> dict[str, Any]:
    """``summary.json``: the metric before and after, compression of weights and of all parameters, rounds.

    A change is after minus before (``accuracy_change_test``): positive is better for accuracy, worse for a
    lower-is-better metric (``summary["metric"]`` says which, and is there only when it is not accuracy).
    """
    state, rows, m = ctx.state, pruner.summary(), ctx.metric
    t = totals(rows)
    params_dense = _parameters(ctx.model)
    params_kept = params_dense - (t.weights - t.kept)
    return {
        "recipe": ctx.recipe.name, "model": ctx.recipe.model.spec, "dataset": ctx.data.name, **_metric_entry(ctx),
        "dense": state.dense, "final": final_acc,
        m.change_field("test"): final_acc[m.field("test")] - state.dense[m.field("test")],
        m.change_field("val"): final_acc[m.field("val")] - state.dense[m.field("val")],
        "weights": t.weights, "weights_kept": t.kept, "compression": t.compression_or_none(),
        "parameters": params_dense, "parameters_kept": params_kept,
        "parameter_compression": params_dense / params_kept if params_kept else None,
        "layers": [r.to_dict() for r in rows], "rounds": state.rounds, "stopped": state.stopped,
    }


def _metric_entry(ctx: RunContext) -> dict[str, Any]:
    """``summary.json``'s ``metric`` (name, key, direction, unit): only for a metric other than accuracy, so a
    classifier's summary stays as it always was (a summary without one is read as accuracy)."""
    return {} if ctx.metric.key == "acc" else {"metric": ctx.metric.describe()}


def neurons(ctx: RunContext) -> PhaseResult:
    """Remove dead neurons from a baked copy, check outputs are unchanged, save it."""
    model = ctx.model
    if not isinstance(model, nn.Sequential):
        why = f"neuron removal needs an nn.Sequential model (a chain of layers); this one is a {type(model).__name__}"
        ctx.log(f"neurons: not removed ({why})")
        return PhaseResult(summary={"neurons": {"skipped": why}})
    x, _ = first_batch(ctx.data.val, 512, mean=ctx.norm.mean, std=ctx.norm.std)
    small, removal = remove_dead_neurons(baked_copy(model).cpu(), example_input=x)
    ctx.folder.save_checkpoint(F.SHRUNK, small, {**ctx.state.meta, "phase": "final_shrunk"})
    nonzero = sum(int((p != 0).sum()) for p in small.parameters())
    ctx.log("neurons: dead neurons removed\n" + removal.table())
    if removal.max_abs_diff is not None and removal.max_abs_diff > 1e-5:
        ctx.log(f"WARNING: the shrunken model's outputs differ by {removal.max_abs_diff:.2e} (> 1e-5)")
    ctx.log(f"neurons: shrunken model has {removal.params_after:,} parameters ({nonzero:,} non-zero); "
            f"largest output difference {removal.max_abs_diff:.2e}")
    return PhaseResult(summary={"neurons": {
        "params_before": removal.params_before, "params_after": removal.params_after,
        "params_nonzero_after": nonzero, "max_abs_diff": removal.max_abs_diff, "iterations": removal.iterations,
        "boundaries": removal.boundaries, "layers": removal.rows(),
    }})


def compact(ctx: RunContext) -> PhaseResult:
    """The final model as a compact file (survivors and relative indices), sized against the dense checkpoint."""
    done = export(ctx.folder.path / F.FINAL, ctx.folder.path / F.COMPACT, trust_factory=ctx.recipe.factories(),
                  owner=ctx.folder)
    dense_file = (ctx.folder.path / F.DENSE).stat().st_size
    ctx.log(f"compact: {F.COMPACT} {done.bytes:,} bytes, {dense_file / done.bytes:.1f}x smaller than {F.DENSE} "
            f"({dense_file:,} bytes)")
    return PhaseResult(summary={"compact": {"file": F.COMPACT, "bytes": done.bytes, "dense_file_bytes": dense_file,
                                            "ratio_to_dense_file": dense_file / done.bytes}})


def quantize(ctx: RunContext) -> PhaseResult:
    """Trained weight sharing on every rank: cluster a copy of the final model, retrain its centroids.

    The final checkpoint stays the pruned model; :func:`shared_file` writes the shared one.
    A stopped run redoes this phase from the last round (it is deterministic).
    """
    q, recipe = ctx.recipe.quantize, ctx.recipe
    pruner, _ = ctx.pruning()
    cfg = recipe.retrain_config(q.epochs, q.lr_fraction)
    ctx.log(f"quantize: weights shared ({format_setting(q.bits)} bits); retraining the centroids for {cfg.epochs} "
            f"epochs at lr {cfg.lr:.3g}")
    ctx.shared_model = retrain_shared(ctx.model, pruner.masks, q.bits, cfg, ctx.data, ctx.norm,
                                      ctx.fit_options(seed=recipe.seed + 1000, phase="quantize", resumable=False))
    return PhaseResult(summary={"quantize": {**ctx.evaluate(ctx.shared_model), "epochs": cfg.epochs}})


def retrain_shared(model: nn.Module, masks: dict[str, torch.Tensor], bits, cfg, data: DatasetSplits,
                   norm: Normalization, options: FitOptions) -> nn.Module:
    """Deep Compression's trained weight sharing: a baked copy of ``model`` whose survivors (``masks``) share
    2^bits values per layer (k-means), the shared values retrained by :func:`prunet.train.fit`."""
    shared_model = baked_copy(model)
    share(shared_model, bits, masks={k: v.bool() for k, v in masks.items()})
    fit(shared_model, data.train, data.val, cfg, norm, options)
    return shared_model


def write_shared(path: str | Path, shared_model: nn.Module, meta: dict[str, Any], masks: dict[str, torch.Tensor]):
    """A model from :func:`retrain_shared` as a compact file, its codebooks and indices Huffman coded.

    Returns:
        ``(path, layers)``: the file and the shared layers it holds (their ``bits``).
    """
    shared_model = shared_model.cpu()
    layers = shared_layers(shared_model)
    unshare(shared_model)
    path = save_compact(path, shared_model, meta, keep={k: v.bool().cpu() for k, v in masks.items()}, shared=layers)
    return path, layers


def shared_file(ctx: RunContext) -> PhaseResult:
    """The shared model of :func:`quantize`, Huffman coded, as ``final_shared.prunet``."""
    pruner, _ = ctx.pruning()
    path, layers = write_shared(ctx.folder.record(F.SHARED_COMPACT), ctx.shared_model,
                                {**ctx.state.meta, "phase": "final_shared"}, pruner.masks)
    acc, compact_file = ctx.summary["quantize"], ctx.summary["compact"]
    size, dense_file = path.stat().st_size, compact_file["dense_file_bytes"]
    ctx.log(f"quantize: {ctx.values(acc)}; {F.SHARED_COMPACT} {size:,} bytes, "
            f"{dense_file / size:.1f}x smaller than {F.DENSE} "
            f"(pruned only: {compact_file['ratio_to_dense_file']:.1f}x)")
    return PhaseResult(summary={"quantize": {
        **{k: v for k, v in acc.items() if k != "epochs"}, "file": F.SHARED_COMPACT, "bytes": size,
        "ratio_to_dense_file": dense_file / size,
        "bits": {name.rsplit(".", 1)[0]: layer.bits for name, layer in layers.items()}, "epochs": acc["epochs"],
    }})


def report(ctx: RunContext) -> PhaseResult:
    """``summary.json`` and the report; the resume point goes (nothing is left to resume)."""
    if ctx.ranks.distributed:
        ctx.summary["world_size"] = ctx.ranks.world_size
    ctx.folder.write_json(F.SUMMARY, ctx.summary)
    _, html = write_report(F.Run(ctx.folder.path, trust_factory=ctx.recipe.factories()), data=ctx.data,
                           progress=False)
    ctx.folder.forget(F.PROGRESS)
    ctx.log(f"report: {html}")
    return PhaseResult()


def format_setting(setting: Any) -> str:
    """A round's setting for the log: ``0.9`` or ``fc1 1.2, fc2 0.8``."""
    if isinstance(setting, dict):
        return ", ".join(f"{k} {v:.3g}" for k, v in setting.items())
    return f"{setting:.3g}"


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
