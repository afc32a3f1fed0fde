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
from prunet.checkpoint import CheckpointError, read_checkpoint
from prunet.checks import check_checkpoint_fits, check_model_fits_data, check_ranks, check_rounds
from prunet.config import ConfigError, Recipe
from prunet.criteria import TargetError
from prunet.data import DatasetSplits, first_batch, load_data
from prunet.devices import resolve_device
from prunet.distributed import RankFailed, Ranks, agree, broadcast_object, from_env, init_process_group, shutdown
from prunet.factory import Trust
from prunet.meta import INPUT_DTYPES
from prunet.devices import model_device
from prunet.files import name_problem
from prunet.layers import find_layers, totals
from prunet.models import create_model
from prunet.phases import Log, Phase, PhaseResult, RunContext, RunState, build, phases_for
from prunet.pruner import Pruner
from prunet.tasks import Metric, Task
from prunet.train import DivergedError, output_problem


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
            if run_dir is not None and (problem := name_problem(str(run_dir))):
                raise ConfigError(f"--run-dir: {str(run_dir)!r} {problem}; choose another folder")
            device = _device(recipe, ranks)
            check_ranks(recipe, ranks.world_size)
            data = load_data(recipe.data)
            model, pruner = _starting_model(recipe, from_checkpoint)
            task = recipe.train.make_task()
            check_task_fits(recipe, model, data, task)
            check_model_fits_data(recipe, model, data)
            check_rounds(recipe, pruner.targets if pruner else find_layers(model))
            model.to(device)
            folder = F.RunFolder.create(path, overwrite=overwrite) if ranks.main else F.RankFolder(path)
        except BaseException as e:
            error = e
        _agree(ranks, error, folder)
        state = RunState(recipe, model, pruner, from_checkpoint=str(from_checkpoint) if from_checkpoint else None)
        state.input_shape, state.input_dtype = _example(data)
        ctx = RunContext(state, data, folder, log, ranks, started, task)
        return _guarded(folder, log, lambda: drive(ctx, phases_for(recipe), resumed=False))


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
            state = RunState.restore(saved, folder.path / F.PROGRESS, trust_factory)
            state.model.to(_device(state.recipe, ranks))
            if state.recipe.threads:
                torch.set_num_threads(state.recipe.threads)
            data = load_data(state.recipe.data)
            task = state.recipe.train.make_task()
            check_task_fits(state.recipe, state.model, data, task)  # factories edited since the run started
            check_model_fits_data(state.recipe, state.model, data)
        except BaseException as e:
            error = e
        _agree(ranks, error, folder)
        folder.rewind(saved)  # only now that the run goes on: a refused resume leaves the folder as it was
        log(f"resume: {folder.path} from {state.where()}")
        ctx = RunContext(state, data, folder, log, ranks, started, task)
        return _guarded(folder, log, lambda: drive(ctx, phases_for(state.recipe), resumed=True))


def _device(recipe: Recipe, ranks: Ranks) -> torch.device:
    """The recipe's device on this machine (this process's GPU under torchrun), checked usable for its precision."""
    device = resolve_device(recipe.device, local_rank=ranks.local_rank if ranks.distributed else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cuDNN's fastest convolution algorithms sum in a varying order: a resumed run would not end
        # bit-identical to one never stopped (nor one run to the next).
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
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

    def __exit__(self, exc_type, error, tb) -> None:
        if self.joined:  # every rank meets a clean end, or an error the ranks agreed on (it carries `quiet`)
            shutdown(together=error is None or hasattr(error, "quiet") or isinstance(error, RankFailed))


def _agree(ranks: Ranks, error: BaseException | None, folder) -> None:
    """Every rank checked its inputs: go on only if all of them passed (else the folder is put back)."""
    try:
        agree(ranks, error)
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise


def _example(data: DatasetSplits) -> tuple[list[int], str | None]:
    """One example's shape and element type, as the model sees it (for exports of the model without its data)."""
    x, _ = first_batch(data.val if len(data.val) else data.test, 1, mean=data.mean, std=data.std)
    name = str(x.dtype).removeprefix("torch.")
    return list(x.shape[1:]), name if name in INPUT_DTYPES else None  # another type: unrecorded, as before


def _guarded(folder: F.Folder, log: Log, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
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


def drive(ctx: RunContext, phases: list[Phase], resumed: bool) -> dict[str, Any]:
    """Run ``phases`` in order: the one place that knows about resume points, ranks and the stop rule.

    A phase the resume point lists as finished is skipped; after a resumable phase a resume point is
    saved; a pruning round is judged (:func:`_judge`); a phase for rank 0 alone runs there while the
    other ranks wait to hear whether it worked.

    Returns:
        The run's summary, the same on every rank.
    """
    state = ctx.state
    _start(ctx, resumed)
    for phase in phases:
        if phase.name in state.finished or (phase.prunes and state.stopped is not None):
            continue
        if phase.prunes and state.accepted is None:  # (again after a resume from the dense phase: the same bits)
            ctx.pruning()
            state.accepted = _copy_state(ctx.model)  # what a failing first round falls back to
        if phase.prunes:
            _judge(ctx, phase)
        else:
            ctx.summary.update(_on_ranks(ctx, phase).summary)
        if phase.resumable:
            state.finished.append(phase.name)
            state.save(ctx.folder)
    summary = broadcast_object(ctx.summary, ctx.ranks)
    if "final" in summary:  # a pruned run's last line
        ctx.log(_closing_line(summary, ctx.metric))
    return summary


def _start(ctx: RunContext, resumed: bool) -> None:
    """The run's first lines: its recipe and first resume point (a fresh run), what it trains on and where."""
    state, data, ranks = ctx.state, ctx.data, ctx.ranks
    state.world_size = ranks.world_size
    if not resumed:
        ctx.folder.write_yaml(F.CONFIG, ctx.recipe.to_dict())
        state.save(ctx.folder)  # the start: a kill before the first epoch ends resumes from here
    where = "" if str(data.source) == data.name else f" from {data.source}"
    ctx.log(f"data: {data.name}{where} (train {len(data.train)}, val {len(data.val)}, test {len(data.test)})")
    if ctx.device.type != "cpu" or ranks.distributed:
        ctx.log(f"device: {ctx.device}" + (f", {ranks.world_size} processes (rank 0 writes)"
                                           if ranks.distributed else ""))
    if state.dense is not None:  # resumed after the dense phase
        ctx.log(f"dense: {ctx.values(state.dense)}")


def _on_ranks(ctx: RunContext, phase: Phase) -> PhaseResult:
    """``phase.run(ctx)`` on every rank, or on rank 0 alone for a ``main_only`` phase: the others learn whether
    it worked (and all stop if it did not) instead of waiting at the next collective."""
    if not phase.main_only:
        return phase.run(ctx)
    result, error = PhaseResult(), None
    if ctx.ranks.main:
        try:
            result = phase.run(ctx)
        except BaseException as e:
            error = e
    agree(ctx.ranks, error)
    return result


def _judge(ctx: RunContext, phase: Phase) -> None:
    """Run a pruning round and apply the stop rule.

    A round that fails (training diverged, a target out of reach) or whose validation metric is worse
    than dense by more than ``prune.max_accuracy_drop`` (:meth:`prunet.tasks.Metric.worse_by`: lower
    accuracy, or higher bits/char) stops the ladder, and the model goes back to the last accepted
    round; an accepted round is saved as ``round<i>.safetensors``.
    """
    state, i = ctx.state, phase.what["round"]
    try:
        record = phase.run(ctx).round
    except (DivergedError, TargetError) as e:  # keep the last good round, say why the ladder stopped
        record, stop = {**phase.what, "error": str(e)}, f"round {i}: {e}"
    else:
        stop = _stop_rule(ctx.metric, state.dense, record, ctx.recipe.prune.max_accuracy_drop)
        stop = stop and f"round {i}: {stop}"
    record["accepted"] = stop is None
    state.rounds.append(record)
    state.open_round = None
    ctx.folder.log_metrics("round", **record)
    if stop is not None:
        state.stopped = stop
        ctx.log(f"stop: {stop}; keeping {f'round {i - 1}' if i > 1 else 'the dense model'}")
        ctx.model.load_state_dict(state.accepted)
        return
    state.accepted = _copy_state(ctx.model)
    ctx.folder.save_checkpoint(F.round_checkpoint(i), ctx.model, {**state.meta, "phase": f"round{i}"})


def _stop_rule(metric: Metric, dense: dict[str, float], record: dict[str, Any], limit: float | None) -> str | None:
    """Why a round's validation metric stops the ladder (worse than dense by more than ``limit``), or None.

    Example:
        >>> from prunet.tasks import bits_per_token
        >>> bits = bits_per_token("bits/char")
        >>> _stop_rule(bits, {"val_bits": 2.0}, {"val_bits": 2.3}, 0.1)
        'validation bits/char rose 0.3000 above dense (> 0.1)'
        >>> _stop_rule(bits, {"val_bits": 2.0}, {"val_bits": 1.5}, 0.1) is None  # lower is better: no stop
        True
    """
    key = metric.field("val")
    drop = metric.worse_by(dense[key], record[key])
    if limit is None or drop <= limit:
        return None
    if metric.unit == "%":
        return f"validation {metric.name} fell {drop:.2f} points below dense (> {limit})"
    moved = "fell" if metric.higher_is_better else "rose"
    where = "below" if metric.higher_is_better else "above"
    return f"validation {metric.name} {moved} {drop:.{metric.digits}f} {where} dense (> {limit})"


def _closing_line(summary: dict[str, Any], metric: Metric) -> str:
    compression, final, dense = summary["compression"], summary["final"], summary["dense"]
    test, change = metric.field("test"), summary[metric.change_field("test")]
    return (f"final: {f'{compression:.1f}x fewer weights' if compression else 'every weight pruned'} "
            f"({summary['weights_kept']:,} of {summary['weights']:,}); test {metric.format(final[test])} "
            f"(dense {metric.format(dense[test])}, change {change:+.{metric.digits}f})")


def check_task_fits(recipe: Recipe, model: nn.Module, data: DatasetSplits, task: Task) -> None:
    """The recipe's loss and metric take what the model returns for the data's targets: two examples go
    through the model, then through ``train.loss`` and ``train.metric``, before anything is trained or written.

    A model that does not take the inputs at all, or labels past its classes, are left to
    :func:`prunet.checks.check_model_fits_data`, which says so in the same words as ever.

    Raises:
        ConfigError: one line naming the field at fault (``model.factory``, ``train.loss``, ``train.metric``).
    """
    split = data.val if len(data.val) else data.test
    x, y = first_batch(split, 2, mean=data.mean, std=data.std, device=model_device(model))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception:  # the model's own code: check_model_fits_data tells what it raised
        return
    factory = recipe.model.factory is not None
    problem = output_problem(out, len(x), y, task.loss)
    if problem is not None:
        field, subject = ("model.factory", "") if factory else ("model.name", f"{recipe.model.spec} ")
        raise ConfigError(f"{field}: {subject}returned {problem}")
    bad_label = getattr(task.loss, "bad_label", None)
    if bad_label is not None and bad_label(out, y) is not None:  # check_model_fits_data names model.num_classes
        return
    t = recipe.train
    shapes = f"outputs {tuple(out.shape)} and targets {tuple(y.shape) if hasattr(y, 'shape') else type(y).__name__}"
    for field, spec, call in (("train.loss", t.loss, lambda: task.loss(out.float(), y)),
                              ("train.metric", t.metric, lambda: task.metric.batch(out, y))):
        try:
            value = call()
        except Exception as e:  # the user's loss or metric, or a built-in one given what it cannot take
            detail = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"{field}: {spec} on {shapes} raised {type(e).__name__}"
                              f"{f': {detail}' if detail else ''}") from None
        if field == "train.loss" and not (isinstance(value, torch.Tensor) and value.numel() == 1):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"train.loss: {spec} returned {got} on {shapes}; expected a scalar tensor "
                              f"(the batch's mean loss)")
        if field == "train.metric" and not (isinstance(value, tuple) and len(value) == 2):
            raise ConfigError(f"train.metric: {spec}'s batch returned {type(value).__name__}; expected "
                              f"(total, count), the batch's sum and its number of targets")


def _starting_model(recipe: Recipe, from_checkpoint: str | Path | None) -> tuple[nn.Module, Pruner | None]:
    """The model to start from: a dense checkpoint (checked against the recipe) or a fresh, seeded one.

    A pruned checkpoint is refused: its accuracy is not the dense baseline every round is measured against.
    """
    if from_checkpoint:
        state, ckpt_meta = read_checkpoint(from_checkpoint)
        check_checkpoint_fits(recipe, ckpt_meta, from_checkpoint)  # before anything is built: the recipe's model
        bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # its weights could not be ranked: a NaN std would prune a whole layer
            raise CheckpointError(f"--from {from_checkpoint} holds NaN or inf values ({', '.join(bad[:3])}); "
                                  f"it is no dense model to prune")
        model, pruner = build(recipe, state, Path(from_checkpoint))
        if pruner is not None and totals(pruner.summary()).kept < totals(pruner.summary()).weights:
            phase = ckpt_meta.get("phase")
            raise CheckpointError(
                f"--from {from_checkpoint} holds a pruned model{f' ({phase})' if phase else ''}, not a dense one: "
                f"start from the run's {F.DENSE}, or continue a stopped run with 'prunet run --resume RUN_DIR'")
        return model, pruner
    torch.manual_seed(recipe.seed)
    return create_model(recipe.model.spec, **recipe.model.arguments()), None


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}
