"""What a run learns and how it is judged: the loss it trains on and the metric that chooses.

A recipe names them in ``train.loss`` and ``train.metric``: a built-in name (``cross_entropy``;
``accuracy``, ``bits_per_token``) or the user's own factory (``"mypkg.tasks:loss"``,
``"tasks.py:perplexity"``, called with ``train.loss_kwargs`` / ``train.metric_kwargs``).

* A **loss** is a callable ``loss(outputs, targets) -> scalar tensor``, the mean over the batch.
  It may also have ``sums(outputs, targets) -> (total, count)`` for evaluation (the default is
  ``loss * len(targets)`` over ``len(targets)``).
* A **metric** is a :class:`Metric`: a name, a direction (``higher_is_better``) and ``batch``,
  which gives one batch's ``(total, count)``; the metric of a split is the sum of the totals over
  the sum of the counts, so it adds up over batches and over ranks.

Every choice a run makes (the best epoch, the stop rule, the sensitivity budget) goes through
:meth:`Metric.better` and :meth:`Metric.worse_by`, so a lower-is-better metric is judged as one.

Example, a character-level language model (outputs ``(B, T, V)`` logits, targets ``(B, T)`` ids):
    >>> task = Task(make_loss("cross_entropy"), make_metric("bits_per_token", {"name": "bits/char"}))
    >>> logits, targets = torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    >>> total, count = task.metric.batch(logits, targets)  # 10 tokens, 2 bits each: 4 equally likely ids
    >>> round(task.loss(logits, targets).item(), 4), round(total, 4), count
    (1.3863, 20.0, 10)
    >>> task.metric.format(2.0), task.metric.better(1.5, 2.0), task.metric.worse_by(1.5, 2.0)
    ('2.0000 bits/char', True, 0.5)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.nn.functional as F

from prunet.factory import FactoryError, call_factory, is_factory

__all__ = ["LOSSES", "METRICS", "CrossEntropy", "Loss", "Metric", "Task", "accuracy", "bits_per_token",
           "cross_entropy", "make_loss", "make_metric", "spec_problem"]

Sums = tuple[float, float]
"""One batch's ``(total, count)``: the value of a split is the sum of the totals over the sum of the counts."""


class Loss(Protocol):
    """``loss(outputs, targets)``: a scalar tensor, the batch's mean loss, that training minimises."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class CrossEntropy:
    """Cross-entropy over the last dimension of the outputs: ``(N, classes)`` scores for ``(N,)`` labels, or
    ``(N, ..., classes)`` for ``(N, ...)`` (a language model's ``(B, T, V)`` for ``(B, T)`` token ids)."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == 2:
            return F.cross_entropy(outputs, targets)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        """The summed loss of every target (in float32) and their number."""
        flat = outputs.float().reshape(-1, outputs.shape[-1])
        return F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item(), targets.numel()

    def problem(self, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        """What keeps these outputs from scoring these targets; None when one score per class per target.

        Example:
            >>> CrossEntropy().problem(torch.zeros(2, 3, 2), torch.zeros(2, dtype=torch.long))
            'shape (2, 3, 2) for a batch of 2; expected (2, classes), one score per class'
        """
        if tuple(outputs.shape[:-1]) == tuple(targets.shape) and outputs.dim() >= 2:
            return None
        wanted = ", ".join(str(d) for d in targets.shape)
        return (f"shape {tuple(outputs.shape)} for a batch of {len(targets)}"
                f"{'' if targets.dim() == 1 else f' of targets {tuple(targets.shape)}'}; "
                f"expected ({wanted}, classes), one score per class")

    def bad_label(self, outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
        """A target that names no output (a class index below 0 or past the last class), or None."""
        classes = outputs.shape[-1]
        wrong = (targets < 0) | (targets >= classes)
        return int(targets[wrong][0]) if bool(wrong.any()) else None


@dataclass(frozen=True)
class Metric:
    """How a run judges a model: the metric of a split, its name and its direction.

    Attributes:
        name: how logs and reports call it: ``"accuracy"``, ``"bits/char"``.
        batch: ``batch(outputs, targets) -> (total, count)`` of one batch (None in a metric only described,
            as the report reads it from ``summary.json``).
        higher_is_better: accuracy is; a loss-like metric (bits per character, perplexity) is not.
        key: its part of the record fields: ``val_<key>``, ``test_<key>``, ``train_<key>`` (``acc``: ``val_acc``).
        unit: written after a value: ``"%"``, or a word (``"bits/char"``) after a space; empty for none.
        digits: decimals shown.
    """

    name: str
    batch: Callable[[torch.Tensor, torch.Tensor], Sums] | None = None
    higher_is_better: bool = True
    key: str = "metric"
    unit: str = ""
    digits: int = 4

    def value(self, total: float, count: float) -> float:
        """The metric of a split from its summed ``(total, count)``; 0 for an empty split."""
        return total / count if count else 0.0

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` is strictly better than ``than`` (anything is better than None)."""
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than

    def worse_by(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference``, in the metric's units (negative: better)."""
        return reference - value if self.higher_is_better else value - reference

    def format(self, value: Any) -> str:
        """A value for the log and the report: ``89.12%``, ``1.2345 bits/char``; ``–`` for none."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "–"
        sep = "" if self.unit in ("", "%") else " "
        return f"{value:.{self.digits}f}{sep}{self.unit}"

    @property
    def points(self) -> str:
        """What a difference of values is counted in: ``points`` (of a percentage) or the unit."""
        return "points" if self.unit == "%" else (self.unit or "units")

    def field(self, prefix: str) -> str:
        """A record field of this metric: ``field("val")`` is ``val_acc`` for accuracy."""
        return f"{prefix}_{self.key}"

    def change_field(self, split: str) -> str:
        """``summary.json``'s field of the change on ``split``: ``accuracy_change_test`` (the name 0.1 wrote)."""
        return f"accuracy_change_{split}" if self.key == "acc" else f"{self.key}_change_{split}"

    def describe(self) -> dict[str, Any]:
        """What ``summary.json`` records of the metric (all but ``batch``): :meth:`described` reads it back."""
        return {"name": self.name, "key": self.key, "higher_is_better": self.higher_is_better, "unit": self.unit,
                "digits": self.digits}

    @classmethod
    def described(cls, description: Mapping[str, Any] | None) -> "Metric":
        """The metric a summary describes (accuracy when it describes none, as in every summary before 0.2)."""
        if not isinstance(description, Mapping):
            return accuracy()
        fields = {k: description[k] for k in ("name", "key", "higher_is_better", "unit", "digits")
                  if k in description}
        return cls(**{**accuracy().describe(), **fields})


def _accuracy_batch(outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
    correct = (outputs.argmax(-1) == targets).sum().item()
    return 100.0 * correct, targets.numel()


def _bits_batch(outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
    nats, count = CrossEntropy().sums(outputs, targets)
    return nats / math.log(2), count


def cross_entropy() -> CrossEntropy:
    """The default loss: cross-entropy over the outputs' last dimension (classes, or a vocabulary)."""
    return CrossEntropy()


def accuracy() -> Metric:
    """The default metric: percent of targets whose highest score is theirs (higher is better)."""
    return Metric("accuracy", _accuracy_batch, higher_is_better=True, key="acc", unit="%", digits=2)


def bits_per_token(name: str = "bits/token", key: str = "bits") -> Metric:
    """Mean cross-entropy in bits over every target token (lower is better): a language model's bits/char.

    Args:
        name: how reports call it, e.g. ``"bits/char"`` for a character-level model.
        key: its record fields (``val_bits``, ``test_bits``).
    """
    return Metric(name, _bits_batch, higher_is_better=False, key=key, unit=name, digits=4)


LOSSES: dict[str, Callable[..., Loss]] = {"cross_entropy": cross_entropy}
"""Built-in losses, by the name a recipe's ``train.loss`` gives."""
METRICS: dict[str, Callable[..., Metric]] = {"accuracy": accuracy, "bits_per_token": bits_per_token}
"""Built-in metrics, by the name a recipe's ``train.metric`` gives."""


def spec_problem(spec: str, kwargs: Mapping[str, Any], field: str) -> str | None:
    """What is wrong with a ``train.loss`` / ``train.metric`` spec, in one line naming ``field``; None if nothing.

    A factory (``module:function``) is not imported here: that happens when the run builds it.

    Example:
        >>> spec_problem("accuracy", {"digits": 3}, "train.metric")
        "train.metric: accuracy takes no argument 'digits' (it takes none)"
    """
    builtins = LOSSES if field.endswith("loss") else METRICS
    if is_factory(spec):
        return None
    if spec not in builtins:
        return (f"{field}: {spec!r} is neither a built-in ({', '.join(builtins)}) nor MODULE:FUNCTION "
                f"(e.g. mypkg.tasks:{field.rsplit('.', 1)[-1]} or tasks.py:{field.rsplit('.', 1)[-1]})")
    params = inspect.signature(builtins[spec]).parameters
    for key in kwargs:
        if key not in params:
            takes = ", ".join(params) or "none"
            return f"{field}: {spec} takes no argument {key!r} (it takes {takes})"
    return None


def make_loss(spec: str = "cross_entropy", kwargs: Mapping[str, Any] | None = None) -> Loss:
    """The loss ``spec`` names: a built-in (:data:`LOSSES`) or the user's factory, called with ``kwargs``.

    Raises:
        prunet.factory.FactoryError: one line naming ``train.loss``: a bad spec, a factory that fails,
            or one that returns no callable.
    """
    loss = _build(spec, kwargs or {}, "train.loss", LOSSES)
    if not callable(loss):
        raise FactoryError(f"train.loss: {spec} returned a {type(loss).__name__}, not a loss(outputs, targets)")
    return loss


def make_metric(spec: str = "accuracy", kwargs: Mapping[str, Any] | None = None) -> Metric:
    """The metric ``spec`` names: a built-in (:data:`METRICS`) or the user's factory, called with ``kwargs``.

    Raises:
        prunet.factory.FactoryError: one line naming ``train.metric``: a bad spec, a factory that fails, or
            one that returns no :class:`Metric` with a ``batch``.
    """
    metric = _build(spec, kwargs or {}, "train.metric", METRICS)
    if not isinstance(metric, Metric) or not callable(metric.batch):
        raise FactoryError(f"train.metric: {spec} returned a {type(metric).__name__}, not a prunet.tasks.Metric "
                           f"(name, batch(outputs, targets) -> (total, count), higher_is_better)")
    return metric


def _build(spec: str, kwargs: Mapping[str, Any], field: str, builtins: Mapping[str, Callable[..., Any]]) -> Any:
    problem = spec_problem(spec, kwargs, field)
    if problem is not None:
        raise FactoryError(problem)
    if is_factory(spec):
        return call_factory(spec, dict(kwargs), field)
    return builtins[spec](**kwargs)


@dataclass(frozen=True)
class Task:
    """A run's loss and metric; the default is classification: cross-entropy, judged by accuracy."""

    loss: Loss = field(default_factory=cross_entropy)
    metric: Metric = field(default_factory=accuracy)
