"""The reference training loop: read it top to bottom.

prunet never owns the user's loop; this one is what ``prunet train`` and
``prunet run`` use, and a template for your own. Pruning enters in two lines:
the pruner's masks are enforced after each optimizer step (``pruner.attach``)
and gradients of pruned weights are masked by the pruner's hooks.

It trains where the model is (batches follow the model's device), optionally in
mixed precision (``TrainConfig.amp``), and under several processes (``ranks``) with
``DistributedDataParallel``: each rank takes its share of every batch.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from prunet.config import ConfigError, TrainConfig
from prunet.data import DataError, loader, loader_batches
from prunet.devices import model_device
from prunet.distributed import SINGLE, Ranks, all_reduce_sum, broadcast_buffers, gather_objects
from prunet.pruner import Pruner
from prunet.regularize import decayed_parameters, l1_penalty
from prunet.schedule import lr_at
from prunet.tasks import CrossEntropy, Loss, Metric, Task


class DivergedError(ConfigError):
    """The training loss became NaN or infinite, or a classifier's blew up past guessing after it had learned
    (a learning rate too high, most often)."""


class ModelOutputError(ConfigError):
    """The model's output does not fit the targets (a tuple, the wrong shape for the loss)."""


@dataclass
class EpochRecord:
    """One line of ``metrics.jsonl``: losses and the run's metric (``train.metric``) on both splits.

    Attributes:
        train_metric, val_metric: the metric's values; ``to_dict`` names them by its ``key``
            (``train_acc``, ``val_acc`` for accuracy, the default).
        key: the metric's :attr:`prunet.tasks.Metric.key`.
    """

    phase: str
    epoch: int
    lr: float
    train_loss: float
    train_metric: float
    val_loss: float
    val_metric: float
    seconds: float
    key: str = "acc"

    @property
    def train_acc(self) -> float:
        """``train_metric``, by the name it had when the metric was always accuracy."""
        return self.train_metric

    @property
    def val_acc(self) -> float:
        """``val_metric``, by the name it had when the metric was always accuracy."""
        return self.val_metric

    def to_dict(self) -> dict:
        d = asdict(self)
        key = d.pop("key")
        names = {"train_metric": f"train_{key}", "val_metric": f"val_{key}"}
        return {names.get(k, k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict, key: str = "acc") -> "EpochRecord":
        """The record :meth:`to_dict` wrote, for a metric of ``key``."""
        names = {f"train_{key}": "train_metric", f"val_{key}": "val_metric"}
        return cls(**{names.get(k, k): v for k, v in d.items()}, key=key)


@dataclass
class Normalization:
    """Per-pixel normalisation applied to every batch."""

    mean: float
    std: float


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer a recipe asks for; L2 enters as weight decay on weights (not biases)."""
    params = list(params)
    decay = cfg.reg_strength if cfg.regularization == "l2" else 0.0
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, split: Dataset, norm: Normalization, batch_size: int = 1000, *,
             ranks: Ranks = SINGLE, workers: int = 0, task: Task | None = None) -> tuple[float, float]:
    """Mean loss and metric of ``model`` on ``split``: cross-entropy and accuracy (%) unless ``task`` says.

    The loss is the mean over every target (over examples for a classifier, over tokens for a
    language model); the metric sums its batches' ``(total, count)``. Batches go to the model's
    device. Under several ``ranks`` each evaluates its part of the split and the sums are reduced:
    every rank gets the values of the whole split.

    Returns:
        ``(loss, metric)``; ``(0.0, 0.0)`` for an empty split.
    """
    task = task or Task()
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss total and count, metric total and count
    for x, y in loader(split, batch_size, shuffle=False, mean=norm.mean, std=norm.std, device=model_device(model),
                       rank=ranks.rank, world_size=ranks.world_size, workers=workers):
        out = model(x)
        _check_output(out, y, "evaluation", task.loss)
        for i, value in enumerate((*_loss_sums(task.loss, out, y), *task.metric.batch(out, y))):
            sums[i] += value
    model.train(was_training)
    if ranks.distributed:
        sums = all_reduce_sum(sums, ranks)
    loss = sums[0] / sums[1] if sums[1] else 0.0
    return loss, task.metric.value(sums[2], sums[3])


def _loss_sums(loss: Loss, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """A batch's summed loss and its count: the loss's own ``sums``, else its mean times the batch."""
    sums = getattr(loss, "sums", None)
    if sums is not None:
        return sums(out, y)
    return float(loss(out.float(), y)) * len(y), len(y)


def evaluate_splits(model: nn.Module, val: Dataset, test: Dataset, norm: Normalization,
                    batch_size: int = 1000, *, ranks: Ranks = SINGLE, workers: int = 0,
                    task: Task | None = None) -> dict[str, float]:
    """Loss and metric on the validation split (which chooses) and the test split (only reported).

    Returns:
        ``{"val_loss", "val_<key>", "test_loss", "test_<key>"}``, the metric's key: ``val_acc`` by default.
    """
    task = task or Task()
    val_loss, val_metric = evaluate(model, val, norm, batch_size, ranks=ranks, workers=workers, task=task)
    test_loss, test_metric = evaluate(model, test, norm, batch_size, ranks=ranks, workers=workers, task=task)
    m = task.metric
    return {"val_loss": val_loss, m.field("val"): val_metric, "test_loss": test_loss, m.field("test"): test_metric}


@dataclass
class FitOptions:
    """How :func:`fit` trains, beyond the recipe's :class:`~prunet.config.TrainConfig`.

    Attributes:
        batch_size, eval_batch_size: mini-batch sizes.
        seed: seeds batch order and dropout, so a run is repeatable.
        pruner: when given, its masks are enforced after every step.
        trainable: the parameters to train; the others are frozen (``requires_grad``
            off for the duration, restored after). Default: all.
        phase: a label for the records, e.g. ``"dense"`` or ``"round2"``.
        on_epoch: called with each epoch's record (logging, metrics files).
        on_checkpoint: called after each epoch (after ``on_epoch``) with the state
            that ``resume`` takes: save it, with the model's ``state_dict``, to be able to
            continue after a crash. Its tensors are live; save them before the next step.
        resume: a state from ``on_checkpoint``, with the model already holding the
            weights saved beside it: training continues after that epoch, and ends
            bit-identical to a run that was never stopped (same seed, same thread count).
        on_step: called after every optimizer step with the steps taken so far in this
            call's epochs (from 1; a resumed fit counts the epochs before it), e.g. to prune
            on a schedule.
        choose_after: the best epoch is chosen among the epochs after this many (masks
            that change during the first epochs: their metric is not the final model's).
        task: the loss trained on and the metric that chooses the best epoch (by its direction);
            default: the ones ``cfg`` names (``cfg.make_task()``).
        teacher: distil from this model (Hinton et al.): the loss becomes
            ``(1 - alpha) CE + alpha T² KL(softmax(teacher / T) || softmax(model / T))``.
        distill_alpha, distill_temperature: ``alpha`` and ``T`` of that loss.
        ranks: this process's place in a distributed run (every rank calls ``fit`` alike):
            the model is wrapped in ``DistributedDataParallel`` and each rank takes
            ``batch_size // world_size`` of every batch of ``batch_size``.
        workers: ``DataLoader`` workers for datasets that are not in-memory ``Split``s.
    """

    batch_size: int = 64
    eval_batch_size: int = 1000
    seed: int = 0
    pruner: Pruner | None = None
    trainable: list[nn.Parameter] | None = None
    phase: str = "train"
    on_epoch: Callable[[EpochRecord], None] | None = None
    on_checkpoint: Callable[[dict], None] | None = None
    resume: dict | None = None
    on_step: Callable[[int], None] | None = None
    choose_after: int = 0
    teacher: nn.Module | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    ranks: Ranks = SINGLE
    workers: int = 0
    task: Task | None = None


def fit(model: nn.Module, train: Dataset, val: Dataset, cfg: TrainConfig, norm: Normalization,
        options: FitOptions | None = None) -> list[EpochRecord]:
    """Train ``model`` for ``cfg.epochs`` and leave it at its best validation epoch (by the task's metric).

    Args:
        model: the network, trained in place.
        train, val: the training split and the validation split (chooses the best epoch).
        cfg: optimizer, learning rate and schedule, regularisation.
        norm: input normalisation.
        options: batch sizes, seed, pruner, callbacks, resume state, distillation, ranks.

    Training runs on the model's device; ``cfg.amp`` turns on mixed precision.

    Returns:
        One record per epoch. With no epochs, nothing is trained.

    Example:
        >>> records = fit(model, data.train, data.val, TrainConfig(epochs=2), norm,
        ...               FitOptions(seed=0, pruner=pruner))  # doctest: +SKIP
    """
    o = options or FitOptions()
    if cfg.epochs == 0:
        return []
    loop = _Loop(model, train, val, cfg, norm, o)
    try:
        for epoch in range(loop.first, cfg.epochs):
            record = loop.epoch(epoch)
            loop.records.append(record)
            if o.on_epoch is not None:
                o.on_epoch(record)
            if loop.blown_up(-1) and loop.blown_up(-2):  # two in a row: it is not coming back
                raise loop.blow_up_error(-1)
            # With no validation split there is nothing to choose by: the last epoch is kept.
            if len(val) and epoch + 1 > o.choose_after and loop.metric.better(record.val_metric, loop.best):
                loop.best, loop.best_state = record.val_metric, copy.deepcopy(model.state_dict())
                loop.best_epoch = record.epoch
            if o.on_checkpoint is not None:
                o.on_checkpoint(loop.checkpoint(epoch))
    finally:
        loop.close()
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    kept = next((i for i, r in enumerate(loop.records) if r.epoch == loop.best_epoch), len(loop.records) - 1)
    if loop.records and loop.blown_up(kept):  # the epoch kept is itself a blow-up: say so, do not return it
        raise loop.blow_up_error(kept)
    return loop.records


class _Loop:
    """One call of :func:`fit`: the optimizer, the RNGs and the best epoch so far, an epoch and a step at a time."""

    def __init__(self, model: nn.Module, train: Dataset, val: Dataset, cfg: TrainConfig, norm: Normalization,
                 o: FitOptions):
        self.model, self.train, self.val, self.cfg, self.norm, self.o = model, train, val, cfg, norm, o
        self.task = o.task or cfg.make_task()
        self.metric: Metric = self.task.metric
        ranks = o.ranks
        self.device = model_device(model)
        # Dropout differs per rank (each its own part of the batch); rank 0 draws as a single process does.
        torch.manual_seed(o.seed + 1_000_003 * ranks.rank)
        self.generator = torch.Generator().manual_seed(o.seed)  # batch order: the same on every rank
        params = list(model.parameters()) if o.trainable is None else list(o.trainable)
        self.frozen = _freeze_others(model, params)
        self.optimizer = make_optimizer(params, cfg, cfg.lr)
        if o.pruner is not None:
            o.pruner.attach(self.optimizer)
        self.l1_params = decayed_parameters(model) if cfg.regularization == "l1" else []
        self.autocast, self.scaler = _mixed_precision(cfg.amp, self.device)
        # Built after freezing: DDP reduces the gradients of the parameters that train.
        self.net = model
        if ranks.distributed:
            self.net = DistributedDataParallel(model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
        self.best: float | None = None  # the best validation metric so far
        self.best_state, self.records, self.first = None, [], 0
        self.classes: int | None = None  # the built-in cross-entropy's classes, seen in the first step's outputs
        self.best_epoch: int | None = None  # the epoch of best_state
        if o.resume is not None:
            self._restore(o.resume)
        self.steps = loader_batches(len(train), o.batch_size, ranks.world_size, train=True)

    def _restore(self, resume: dict) -> None:
        ranks = self.o.ranks
        self.optimizer.load_state_dict(resume["optimizer"])
        rng = resume["rng"][ranks.rank] if ranks.distributed else resume["rng"]
        torch.set_rng_state(rng["cpu"] if isinstance(rng, dict) else rng)
        if isinstance(rng, dict) and rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.generator.set_state(resume["generator"])
        if self.scaler is not None and resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        # "best_acc": the field's name when the metric was always accuracy (whose start was -1)
        self.best, self.best_state, self.first = resume["best_acc"], resume["best_state"], resume["epoch"]
        self.records = [EpochRecord.from_dict(r, self.metric.key) for r in resume["records"]]
        if self.best_state is not None:  # older resume points lack it: the first eligible epoch at the best
            self.best_epoch = resume.get("best_epoch", next((r.epoch for r in self.records if r.val_metric == self.best
                                                              and r.epoch > self.o.choose_after), None))
        self.classes = resume.get("classes")

    def epoch(self, epoch: int) -> EpochRecord:
        """Train one epoch and evaluate on the validation split."""
        o, cfg, ranks = self.o, self.cfg, self.o.ranks
        lr = lr_at(epoch, cfg.epochs, cfg.lr, cfg.lr_schedule, cfg.lr_step_epochs, cfg.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        start = time.perf_counter()
        loss_sum, seen, total, count = 0.0, 0, 0.0, 0  # loss over examples; the metric's sums
        bar = tqdm(
            loader(self.train, o.batch_size, shuffle=True, generator=self.generator, mean=self.norm.mean,
                   std=self.norm.std, device=self.device, rank=ranks.rank, world_size=ranks.world_size, train=True,
                   workers=o.workers),
            total=self.steps,
            desc=f"{o.phase} epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if ranks.main else True,  # no bar when stderr is not a terminal (CI logs)
        )
        for batch, (x, y) in enumerate(bar):
            taken = epoch * self.steps + batch + 1  # optimizer steps of this phase so far, this one included
            if taken <= cfg.warmup_steps:  # the last warm-up step sets the epoch's own rate
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * taken / cfg.warmup_steps
            loss, out = self.step(x, y, epoch, lr)
            if o.on_step is not None:
                o.on_step(epoch * self.steps + batch + 1)
            loss_sum += loss * len(y)
            seen += len(y)
            batch_total, batch_count = self.metric.batch(out.detach(), y)
            total, count = total + batch_total, count + batch_count
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", **{self.metric.key: self.metric.format(
                self.metric.value(total, count))})
        if ranks.distributed:
            loss_sum, seen, total, count = all_reduce_sum([loss_sum, seen, total, count], ranks)
            # Each rank's last batch left its own batch-norm statistics: evaluate (and save) rank 0's on all.
            broadcast_buffers(self.model, ranks)
        val_loss, val_metric = evaluate(self.model, self.val, self.norm, o.eval_batch_size, ranks=ranks,
                                        workers=o.workers, task=self.task)
        return EpochRecord(o.phase, epoch + 1, lr, loss_sum / seen, self.metric.value(total, count), val_loss,
                           val_metric, time.perf_counter() - start, key=self.metric.key)

    def blown_up(self, index: int) -> bool:
        """Whether epoch ``records[index]`` blew up: with the built-in cross-entropy, its mean training loss is
        above ``ln(classes)``, the loss of guessing uniformly, and above twice the lowest epoch before it in this
        fit. A task that never learns stays near ``ln(classes)`` and never blows up; nor does a fit's first
        epoch (nothing before it to compare)."""
        if index < 0:
            index += len(self.records)
        if not self.classes or self.classes < 2 or index < 1 or index >= len(self.records):
            return False
        loss = self.records[index].train_loss
        return loss > math.log(self.classes) and loss > 2 * min(r.train_loss for r in self.records[:index])

    def blow_up_error(self, index: int) -> DivergedError:
        """The :class:`DivergedError` of blown-up epoch ``records[index]`` (every rank raises it; rank 0 says it)."""
        index %= len(self.records)
        record = self.records[index]
        lowest = min(self.records[:index], key=lambda r: r.train_loss)
        seen = f" (validation {self.metric.name} {self.metric.format(record.val_metric)})" if len(self.val) else ""
        error = DivergedError(
            f"train.lr: the training loss rose to {record.train_loss:.4g} in {record.phase} epoch {record.epoch} at "
            f"lr {record.lr:.3g}{seen}, above "
            f"{math.log(self.classes):.4g}, the loss of guessing uniformly among {self.classes} classes (it was "
            f"{lowest.train_loss:.4g} in epoch {lowest.epoch}); lower the learning rate, or prune less if "
            f"pruning in this phase took what the model needs")
        ranks = self.o.ranks
        error.quiet = not ranks.main if ranks.distributed else None
        return error

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, lr: float) -> tuple[float, torch.Tensor]:
        """One optimizer step; ``(this rank's loss, outputs)``. A non-finite loss stops before the step."""
        o, ranks = self.o, self.o.ranks
        with self.autocast():
            logits = self.net(x)
            _check_output(logits, y, "training", self.task.loss)
            loss = self.task.loss(logits, y)
            _check_loss(loss)
        if self.classes is None:
            self.classes = logits.shape[-1] if type(self.task.loss) is CrossEntropy else 0  # not a user's subclass
        value = own = loss.item()
        if ranks.distributed:  # every rank stops together, or none does
            value = all_reduce_sum([value], ranks)[0] / ranks.world_size
        if not math.isfinite(value):  # before the step: the weights are still the last finite ones
            error = DivergedError(f"train.lr: the training loss became {value} in {o.phase} epoch "
                                  f"{epoch + 1} at lr {lr:.3g}; lower the learning rate")
            error.quiet = not ranks.main if ranks.distributed else None  # every rank stops here: rank 0 says it
            raise error
        objective = loss
        if o.teacher is not None:
            with self.autocast():
                objective = (1 - o.distill_alpha) * loss + o.distill_alpha * distillation_loss(
                    logits, o.teacher, x, o.distill_temperature)
        if self.l1_params:
            objective = objective + l1_penalty(self.l1_params, self.cfg.reg_strength)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            objective.backward()
            self.optimizer.step()  # prunet's global step hooks enforce the masks here
        else:  # fp16: the scaler skips a step whose gradients overflowed (the weights do not move)
            self.scaler.scale(objective).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return own, logits

    def checkpoint(self, epoch: int) -> dict:
        """What ``FitOptions.resume`` takes to continue after ``epoch``."""
        ranks = self.o.ranks
        rng = _rng_state(self.device)
        return {
            "epoch": epoch + 1, "optimizer": self.optimizer.state_dict(),
            "rng": gather_objects(rng, ranks) if ranks.distributed else rng,
            "generator": self.generator.get_state(), "best_acc": self.best, "best_state": self.best_state,
            "best_epoch": self.best_epoch, "classes": self.classes, "records": [r.to_dict() for r in self.records],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def close(self) -> None:
        if self.o.pruner is not None:
            self.o.pruner.detach_optimizers()
        for p in self.frozen:
            p.requires_grad_(True)


def output_problem(out: object, n: int, targets: torch.Tensor | None = None, loss: Loss | None = None) -> str | None:
    """What is wrong with a model's output for a batch of ``n`` examples; None when it fits.

    Any loss needs one floating-point tensor of at least two dimensions, ``n`` first: ``(n, classes)``
    scores, or a language model's ``(n, T, vocabulary)``. Given the batch's ``targets``, a loss that
    says what it needs (:meth:`prunet.tasks.CrossEntropy.problem`) judges the shape too.

    Example:
        >>> output_problem(torch.zeros(2), 2)
        'shape (2,) for a batch of 2; expected (2, classes), one score per class'
        >>> output_problem(torch.zeros(2, 3, 2), 2, torch.zeros(2, dtype=torch.long), CrossEntropy())
        'shape (2, 3, 2) for a batch of 2; expected (2, classes), one score per class'
    """
    if not isinstance(out, torch.Tensor):
        return (f"a {type(out).__name__}, not a tensor; prunet trains on one (batch, classes) tensor of scores "
                f"(return only the main output)")
    if out.dim() < 2 or out.shape[0] != n:
        return f"shape {tuple(out.shape)} for a batch of {n}; expected ({n}, classes), one score per class"
    if not out.is_floating_point():
        return f"{out.dtype} scores; expected floating-point scores (logits), one per class"
    problem = getattr(loss, "problem", None)
    return problem(out, targets) if problem is not None and targets is not None else None


def _check_output(out: object, y: torch.Tensor, where: str, loss: Loss) -> None:
    """The output fits the loss, and every label names one of its classes (when the loss takes class labels)."""
    problem = output_problem(out, len(y), y, loss)
    if problem is not None:  # a registry model's output always fits: this is the user's model
        raise ModelOutputError(f"model.factory: in {where} the model returned {problem}")
    bad_label = getattr(loss, "bad_label", None)
    bad = bad_label(out, y) if bad_label is not None else None
    if bad is not None:  # a wrong one would be an IndexError, or a CUDA assert
        classes = out.shape[-1]
        raise DataError(f"data: a {where} batch has label {bad}, but the model has {classes} outputs "
                        f"(labels are class indices 0..{classes - 1}; see model.num_classes or your factory)")


def _check_loss(loss: object) -> None:
    """The loss is what ``backward`` takes: one number, a tensor that requires grad."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ModelOutputError(f"train.loss: returned {shape}; expected a scalar tensor (the batch's mean loss)")


def _mixed_precision(amp: str, device: torch.device):
    """``(autocast context factory, gradient scaler or None)`` for ``train.amp``."""
    if amp == "none":
        return nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _rng_state(device: torch.device) -> torch.Tensor | dict[str, torch.Tensor | None]:
    """The dropout RNG's state: the CPU generator's, with the CUDA device's when training there."""
    if device.type != "cuda":
        return torch.get_rng_state()
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device)}


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² KL(softmax(teacher(x) / T) || softmax(logits / T))``: the teacher's soft targets (it is not trained)."""
    with torch.no_grad():
        was_training = teacher.training
        teacher.eval()
        soft = F.log_softmax(teacher(x) / temperature, dim=-1)
        teacher.train(was_training)
    classes = logits.shape[-1]  # (N, ..., classes) -> (N·..., classes): a language model's every token counts once
    return F.kl_div(F.log_softmax(logits.reshape(-1, classes) / temperature, dim=-1), soft.reshape(-1, classes),
                    reduction="batchmean", log_target=True) * temperature**2


def _freeze_others(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    keep = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen
