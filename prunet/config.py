"""Typed recipes: YAML -> dataclasses, validated with one-line errors that name the field.

A recipe has four parts: ``model``, ``data``, ``train`` (the dense phase) and
``prune`` (the rounds). Every field has a default except where noted; a field
the dataclass does not know is an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from prunet.criteria import ALLOCATIONS, CRITERIA, LADDER_STEP, Criterion, TargetThreshold, ladder_targets
from prunet.data import DATASETS
from prunet.devices import check_device_spec
from prunet.factory import Trust, absolute, check_trusted, is_factory
from prunet.files import name_problem
from prunet.models import list_models
from prunet.tasks import Task, make_loss, make_metric, spec_problem

MAX_WORKERS = 256  # DataLoader processes: more is a typo that would fork without bound
MAX_THREADS = 4096  # torch intra-op threads: far beyond any machine; 100000 crashes torch
MAX_CLASSES = 1_000_000  # more would be a last layer of gigabytes: a typo, not a model
# torch takes 64-bit seeds; a run derives more by adding small offsets (seed + round, + 1000, + rank),
# so a seed stays below 2^63 and every derived one still fits.
MAX_SEED = 2**63 - 1
REGULARIZERS = ("l1", "l2", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
AMP_MODES = ("none", "bf16", "fp16")
TARGET_CRITERIA = ("threshold", "global", "lamp", "erk")  # the criteria a round's target compression can drive


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; here it is a number, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A recipe problem; its message is one line naming the field."""


@dataclass
class ModelConfig:
    name: str = "lenet_300_100"
    """Registry name (see ``prunet models``); unused with ``factory``."""
    num_classes: int = 10
    """Outputs of the last layer (registry models)."""
    dropout: Optional[float] = None
    """Dropout ratio for registry models that have dropout layers; None keeps the model's default."""
    factory: Optional[str] = None
    """Your own model: ``"mypkg.nets:resnet20"`` or ``"nets.py:resnet20"``, a function returning an
    ``nn.Module``, called with ``kwargs``. Checkpoints record it and rebuild the model through it.
    A relative ``.py`` path is made absolute when the recipe is read (from the current folder)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``factory``."""

    @property
    def spec(self) -> str:
        """What builds the model: the factory, else the registry name (``create_model``'s first argument)."""
        return self.factory or self.name

    def validate(self, where: str) -> None:
        if self.factory is not None:
            if not is_factory(self.factory):
                raise ConfigError(f"{where}.factory: {self.factory!r} is not MODULE:FUNCTION "
                                  f"(e.g. mypkg.nets:resnet20 or nets.py:resnet20)")
            self.factory = absolute(self.factory)  # the same file from any folder (reports, resumes, reloads)
            if self.dropout is not None:
                raise ConfigError(f"{where}.dropout: applies to registry models; pass it to your factory in "
                                  f"{where}.kwargs")
            return
        if self.kwargs:
            raise ConfigError(f"{where}.kwargs: applies to a model.factory; registry models take num_classes "
                              f"and dropout")
        _choice(where + ".name", self.name, list_models())
        _range(where + ".num_classes", self.num_classes, 2, MAX_CLASSES)
        if self.dropout is not None:
            _range(where + ".dropout", self.dropout, 0.0, 1.0, hi_open=True)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model(self.spec, ...)``."""
        if self.factory is not None:
            return dict(self.kwargs)
        kw: dict[str, Any] = {"num_classes": self.num_classes}
        if self.dropout is not None:
            kw["dropout"] = self.dropout
        return kw


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    """``fashion-mnist`` or ``mnist``."""
    data_dir: Optional[str] = None
    """Folder with the four IDX files; None searches PRUNET_DATA, the Debian package, the cache."""
    val_size: int = 5000
    """Training images held out for every choice the tool makes (thresholds, stopping)."""
    split_seed: int = 0
    """Seed of the train / validation split, in [0, 2^63 - 1]; separate from ``seed`` so retrained models
    share a split."""
    train_subset: Optional[int] = None
    """Use only this many training images (quick runs, tests); None uses all."""
    batch_size: int = 64
    """Mini-batch size for training."""
    eval_batch_size: int = 1000
    """Mini-batch size for evaluation."""
    factory: Optional[str] = None
    """Your own data instead of ``dataset``: ``"mypkg.data:splits"`` or ``"data.py:splits"``, a function
    called with ``kwargs`` returning ``(train, val, test)`` ``torch.utils.data.Dataset``s of ``(x, y)``
    (or a mapping with those keys and optionally ``classes``, ``mean``, ``std``); a ``val`` of None
    holds out ``val_size`` training examples (``split_seed``). Read through a ``DataLoader``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``factory``."""
    workers: int = 0
    """``DataLoader`` worker processes for a ``factory`` dataset (the IDX datasets are in memory)."""

    @property
    def source(self) -> str:
        """What the data is: the factory, else the dataset name."""
        return self.factory or self.dataset

    def validate(self, where: str) -> None:
        if self.factory is not None:
            if not is_factory(self.factory):
                raise ConfigError(f"{where}.factory: {self.factory!r} is not MODULE:FUNCTION "
                                  f"(e.g. mypkg.data:splits or data.py:splits)")
            self.factory = absolute(self.factory)
        else:
            _choice(where + ".dataset", self.dataset, DATASETS)
            if self.kwargs:
                raise ConfigError(f"{where}.kwargs: applies to a data.factory")
        _range(where + ".workers", self.workers, 0, MAX_WORKERS)
        _range(where + ".split_seed", self.split_seed, 0, MAX_SEED)
        # Every choice (best epoch, stopping) is made on the validation split: it can't be empty.
        _range(where + ".val_size", self.val_size, 1, None)
        if self.train_subset is not None:
            _range(where + ".train_subset", self.train_subset, 1, None)
        _range(where + ".batch_size", self.batch_size, 1, None)
        _range(where + ".eval_batch_size", self.eval_batch_size, 1, None)


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the training split."""
    lr: float = 0.05
    """Initial learning rate."""
    optimizer: str = "sgd"
    """``sgd`` (with momentum), ``adam`` or ``adamw``."""
    momentum: float = 0.9
    """SGD momentum."""
    regularization: str = "l2"
    """``l2`` (weight decay), ``l1`` (penalty on |w|) or ``none``."""
    reg_strength: float = 5e-4
    """Coefficient of the regularizer."""
    lr_schedule: str = "cosine"
    """``constant``, ``step`` or ``cosine`` (per epoch)."""
    lr_step_epochs: int = 5
    """With ``step``: epochs between decays."""
    lr_gamma: float = 0.1
    """With ``step``: decay factor."""
    warmup_steps: int = 0
    """Dense training only: the rate rises linearly from ``lr / warmup_steps`` to the schedule's over the first
    ``warmup_steps`` optimizer steps (a transformer trained from scratch at AdamW's usual rates needs it).
    Retraining after a prune starts at its own rate at once."""
    amp: str = "none"
    """Mixed precision: ``bf16`` (autocast), ``fp16`` (autocast and a gradient scaler) or ``none``.
    Weights, masks and optimizer state stay float32; masked weights stay exactly zero."""
    loss: str = "cross_entropy"
    """What training minimises: ``cross_entropy`` (over the outputs' last dimension: classes, or a language
    model's vocabulary) or your own ``"mypkg.tasks:loss"`` / ``"tasks.py:loss"``, a function called with
    ``loss_kwargs`` returning ``loss(outputs, targets) -> scalar tensor``. A relative ``.py`` path is made absolute."""
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``loss``."""
    metric: str = "accuracy"
    """What chooses (best epoch, stop rule, sensitivity) and what reports show: ``accuracy`` (%, higher is
    better), ``bits_per_token`` (lower is better; ``metric_kwargs: {name: bits/char}``) or your own factory
    returning a :class:`prunet.tasks.Metric`."""
    metric_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``metric``."""

    def make_task(self) -> Task:
        """The loss and metric this recipe names, built (a factory is imported and called).

        Raises:
            prunet.factory.FactoryError: one line naming ``train.loss`` or ``train.metric``.
        """
        return Task(make_loss(self.loss, self.loss_kwargs), make_metric(self.metric, self.metric_kwargs))

    def validate(self, where: str) -> None:
        for name in ("loss", "metric"):
            problem = spec_problem(getattr(self, name), getattr(self, name + "_kwargs"), f"{where}.{name}")
            if problem is not None:
                raise ConfigError(problem)
            setattr(self, name, absolute(getattr(self, name)))
        _choice(where + ".amp", self.amp, AMP_MODES)
        _range(where + ".epochs", self.epochs, 0, None)
        _range(where + ".lr", self.lr, 0.0, None, lo_open=True)
        _choice(where + ".optimizer", self.optimizer, OPTIMIZERS)
        _range(where + ".momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _choice(where + ".regularization", self.regularization, REGULARIZERS)
        _range(where + ".reg_strength", self.reg_strength, 0.0, None)
        _choice(where + ".lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _range(where + ".lr_step_epochs", self.lr_step_epochs, 1, None)
        _range(where + ".lr_gamma", self.lr_gamma, 0.0, 1.0, lo_open=True)
        _range(where + ".warmup_steps", self.warmup_steps, 0, None)


@dataclass
class RoundConfig:
    criterion: str = "threshold"
    """``threshold`` (quality × std, the paper), ``sparsity`` (per layer) or ``global``."""
    quality: Union[float, dict[str, float], None] = None
    """With ``threshold``: one value, or per layer / group (``fc``, ``conv``) / glob."""
    sparsity: Union[float, dict[str, float], None] = None
    """With ``sparsity``/``global``: fraction of the layer's (all) weights pruned after this round."""
    prune: list[str] = field(default_factory=lambda: ["all"])
    """Which layers this round prunes: names, groups (``fc``, ``conv``) or globs."""
    train: list[str] = field(default_factory=lambda: ["all"])
    """Which layers are retrained (the rest frozen): the paper retrains FC with conv frozen and vice versa."""
    epochs: int = 4
    """Retraining epochs of this round (0: prune only)."""
    lr_fraction: Optional[float] = None
    """Retraining learning rate as a fraction of ``train.lr``; None uses ``prune.lr_fraction``."""
    target: Optional[float] = None
    """The overall compression (weights / kept) after this round, instead of hand-picked settings.
    With ``threshold`` the qualities are found for it (``quality`` then gives the relative
    per-layer qualities, default 1); with ``global`` the sparsity is ``1 - 1/target``."""

    @property
    def setting_field(self) -> str:
        """The field holding this round's setting: ``quality`` or ``sparsity`` (per its criterion)."""
        return CRITERIA[self.criterion].setting_field

    @property
    def setting(self) -> Union[float, dict[str, float], None]:
        """This round's quality or sparsity, whichever its criterion reads."""
        return getattr(self, self.setting_field)

    def make_criterion(self, relative: dict[str, float] | None = None) -> Criterion:
        """The criterion object this round describes, e.g. ``Threshold({"fc": 1.0})``.

        Args:
            relative: for a threshold round with a target and no ``quality``, the
                relative per-layer qualities (from the sensitivity analysis); default 1 everywhere.
        """
        if self.target is not None and self.criterion == "threshold":
            quality = self.quality if self.quality is not None else relative if relative else 1.0
            return TargetThreshold(self.target, quality)
        if self.target is not None and self.criterion in ("lamp", "erk"):
            return CRITERIA[self.criterion](target=self.target)  # the layers a round leaves alone counted
        if self.target is not None:
            return CRITERIA[self.criterion](1.0 - 1.0 / self.target)
        return CRITERIA[self.criterion](self.setting)

    def layer_keys(self) -> dict[str, list[str]]:
        """Field name -> the layer names, groups or globs it names (checked against a model)."""
        setting = self.setting
        return {self.setting_field: list(setting) if isinstance(setting, dict) else [],
                "prune": list(self.prune), "train": list(self.train)}

    def validate(self, where: str) -> None:
        _choice(where + ".criterion", self.criterion, CRITERIA)
        cls, name = CRITERIA[self.criterion], self.setting_field
        if self.target is not None:
            if self.criterion not in TARGET_CRITERIA:
                raise ConfigError(f"{where}.target: works with criterion {' or '.join(TARGET_CRITERIA)}, "
                                  f"not '{self.criterion}'")
            if self.criterion != "threshold" and self.setting is not None:
                raise ConfigError(f"{where}: give {name} or target, not both")
            _range(where + ".target", self.target, 1.0, None)
            if self.setting is None:
                self._check_rest(where)
                return
        if self.setting is None:
            raise ConfigError(f"{where}.{name}: required with criterion '{self.criterion}' (or give a target)")
        if not cls.per_layer and isinstance(self.setting, dict):
            raise ConfigError(f"{where}.{name}: criterion '{self.criterion}' takes one number, got a mapping")
        _each(f"{where}.{name}", self.setting, cls.setting_min, cls.setting_max)
        self._check_rest(where)

    def _check_rest(self, where: str) -> None:
        _range(where + ".epochs", self.epochs, 0, None)
        if self.lr_fraction is not None:
            _range(where + ".lr_fraction", self.lr_fraction, 0.0, None, lo_open=True)
        for name in ("prune", "train"):
            if not getattr(self, name):
                raise ConfigError(f"{where}.{name}: must name at least one layer or group (e.g. all, fc, conv)")


@dataclass
class GradualConfig:
    """Gradual magnitude pruning (Zhu & Gupta 2017): sparsity rises on a cubic schedule while training.

    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3``: the masks are recomputed every
    ``every_steps`` optimizer steps from the start of the phase until ``prune_epochs`` have
    passed, then the phase fine-tunes with the masks fixed until ``epochs``.
    """

    final_sparsity: Optional[float] = None
    """Fraction of the weights pruned at the end (``s_f``); or give ``target``."""
    target: Optional[float] = None
    """The compression at the end (weights / kept): ``s_f = 1 - 1/target``."""
    initial_sparsity: float = 0.0
    """``s_i``: the sparsity of the first update."""
    epochs: int = 10
    """Epochs of the whole phase: pruning, then fine-tuning."""
    prune_epochs: Optional[float] = None
    """Epochs over which the sparsity rises; None: three quarters of ``epochs``."""
    every_steps: int = 100
    """``Δt``: optimizer steps between mask updates."""
    criterion: str = "sparsity"
    """How each step shares the sparsity among layers: ``sparsity`` (each alike, as Zhu & Gupta), ``global`` (one
    magnitude cut), ``lamp`` or ``erk`` (:data:`prunet.criteria.ALLOCATIONS`)."""
    lr_fraction: Optional[float] = None
    """Learning rate as a fraction of ``train.lr``; None uses ``prune.lr_fraction``."""

    @property
    def sparsity(self) -> float:
        """``s_f``."""
        return self.final_sparsity if self.final_sparsity is not None else 1.0 - 1.0 / self.target

    @property
    def ramp_epochs(self) -> float:
        return self.prune_epochs if self.prune_epochs is not None else 0.75 * self.epochs

    def validate(self, where: str) -> None:
        if (self.final_sparsity is None) == (self.target is None):
            raise ConfigError(f"{where}: give final_sparsity or target (one of them)")
        if self.final_sparsity is not None:
            _range(where + ".final_sparsity", self.final_sparsity, 0.0, 1.0)
        if self.target is not None:
            _range(where + ".target", self.target, 1.0, None)
        _range(where + ".initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        _range(where + ".epochs", self.epochs, 1, None)
        if self.prune_epochs is not None:
            _range(where + ".prune_epochs", self.prune_epochs, 0.0, float(self.epochs), lo_open=True)
        _range(where + ".every_steps", self.every_steps, 1, None)
        _choice(where + ".criterion", self.criterion, tuple(ALLOCATIONS))
        if self.lr_fraction is not None:
            _range(where + ".lr_fraction", self.lr_fraction, 0.0, None, lo_open=True)


TARGET_METHODS = ("paper", "gradual", "acdc")
"""How ``prunet run --target N --method M`` prunes: :meth:`Recipe.target_method`."""

RECOMMENDED = (("paper", 1.0), ("acdc", 25.0))
"""What ``prunet run --target N`` uses without ``--method``: each method from the compression on which it starts.

Chosen on validation accuracy by ``benchmarks/bench_frontier.py`` (both LeNets on Fashion-MNIST, every method
from the same dense models with the same epochs): ``python benchmarks/make_results.py`` prints the rule the
results give and says when it differs from this one. See :func:`recommended_method`."""


def recommended_method(target: float) -> str:
    """The method ``prunet run --target`` uses for ``target`` when none is named (:data:`RECOMMENDED`).

    Raises:
        ConfigError: ``target`` is not a compression (a number >= 1).
    """
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target >= 1):
        raise ConfigError(f"--target: a compression >= 1, got {target}")
    return [method for method, start in RECOMMENDED if target >= start][-1]


def recommended_rule() -> str:
    """:data:`RECOMMENDED` in words, e.g. "paper below 25x, acdc from 25x"."""
    parts = []
    for i, (method, start) in enumerate(RECOMMENDED):
        end = RECOMMENDED[i + 1][1] if i + 1 < len(RECOMMENDED) else None
        parts.append(method + (f" from {start:g}x" if start > 1 else "") + (f" below {end:g}x" if end else ""))
    return ", ".join(parts)


@dataclass
class AcdcConfig:
    """AC/DC, alternating compressed / decompressed training (Peste et al. 2021).

    After ``warmup_epochs`` dense, phases of ``phase_epochs`` alternate: compressed (the largest
    ``1/target`` of the weights kept, chosen afresh among all of them) and decompressed (every
    weight trains; the pruned ones from zero). A last compressed phase of at least
    ``final_epochs`` fine-tunes the sparse model; the best epoch is chosen within it.
    """

    target: Optional[float] = None
    """The compression at the end (weights / kept)."""
    epochs: int = 24
    """Epochs of the whole phase."""
    phase_epochs: int = 3
    """Epochs of each compressed and each decompressed phase."""
    warmup_epochs: int = 0
    """Dense epochs first (0 from a trained dense model)."""
    final_epochs: Optional[int] = None
    """The last compressed phase, at least; None: a quarter of ``epochs``, and at least two phases."""
    criterion: str = "global"
    """How each compressed phase shares the sparsity among layers: ``global`` (one magnitude cut), ``sparsity``
    (each alike), ``lamp`` or ``erk`` (:data:`prunet.criteria.ALLOCATIONS`)."""
    lr_fraction: Optional[float] = None
    """Learning rate as a fraction of ``train.lr``; None uses ``prune.lr_fraction``."""

    @property
    def sparsity(self) -> float:
        return 1.0 - 1.0 / self.target

    @property
    def final(self) -> int:
        """Epochs of the last compressed phase, at least."""
        return self.final_epochs if self.final_epochs is not None else max(2 * self.phase_epochs, self.epochs // 4)

    def validate(self, where: str) -> None:
        if self.target is None:
            raise ConfigError(f"{where}.target: required (the compression at the end)")
        _range(where + ".target", self.target, 1.0, None)
        _range(where + ".epochs", self.epochs, 1, None)
        _range(where + ".phase_epochs", self.phase_epochs, 1, None)
        _range(where + ".warmup_epochs", self.warmup_epochs, 0, None)
        if self.final_epochs is not None:
            _range(where + ".final_epochs", self.final_epochs, 1, None)
        if self.warmup_epochs + 2 * self.phase_epochs + self.final > self.epochs:
            raise ConfigError(f"{where}: {self.epochs} epochs hold no compressed and decompressed phase of "
                              f"{self.phase_epochs} epochs each besides warmup_epochs {self.warmup_epochs} and the "
                              f"last compressed phase of {self.final}: give more epochs, or shorter phase_epochs "
                              f"or final_epochs")
        _choice(where + ".criterion", self.criterion, tuple(ALLOCATIONS))
        if self.lr_fraction is not None:
            _range(where + ".lr_fraction", self.lr_fraction, 0.0, None, lo_open=True)


@dataclass
class PruneConfig:
    rounds: list[RoundConfig] = field(default_factory=list)
    """Prune -> retrain rounds, in order (iterative pruning)."""
    gradual: Optional[GradualConfig] = None
    """Instead of rounds: one phase of gradual magnitude pruning (Zhu & Gupta's cubic schedule)."""
    acdc: Optional[AcdcConfig] = None
    """Instead of rounds: one phase of AC/DC (alternating compressed and decompressed training)."""
    lr_fraction: float = 1.0
    """Retraining learning rate as a fraction of ``train.lr``. The default 1 rewinds every round to the dense
    rate (and its schedule): in RESULTS.md it beat the paper's 1/10 (LeNets; 1/100 for AlexNet) by 0.6-1.0
    points at 25-50x on both LeNets."""
    lr_schedule: str = "cosine"
    """Learning-rate schedule within each retraining round."""
    regularization: Optional[str] = None
    """Regularizer while retraining: ``l1``, ``l2``, ``none``; None keeps ``train.regularization``."""
    reg_strength: Optional[float] = None
    """Its coefficient; None keeps ``train.reg_strength``."""
    max_accuracy_drop: Optional[float] = None
    """Stop the ladder when the validation metric (``train.metric``) gets worse than dense by more than this:
    points of accuracy (e.g. 0.5), or the metric's own units (bits/char rising by 0.02, say)."""
    relative_from_sensitivity: Optional[float] = None
    """For threshold rounds with a ``target`` and no ``quality``: take the relative per-layer qualities
    from the sensitivity analysis of the dense model, per layer the largest quality that costs at
    most this much of the validation metric (points of accuracy; as the paper chose its thresholds). None: 1
    everywhere."""
    distill_alpha: float = 0.0
    """Retrain with distillation from the dense model: weight of its soft targets in the loss (0: off)."""
    distill_temperature: float = 4.0
    """Temperature of the soft targets."""
    adjust_dropout: bool = True
    """Scale dropout by sqrt(kept/original connections) while retraining (the paper, section 3.3)."""
    remove_dead_neurons: bool = True
    """At the end, remove neurons with no inputs or no outputs and report the shrunken model."""

    def validate(self, where: str) -> None:
        for i, r in enumerate(self.rounds):
            r.validate(f"{where}.rounds[{i}]")
        given = [k for k, v in (("rounds", self.rounds), ("gradual", self.gradual), ("acdc", self.acdc)) if v]
        if len(given) > 1:
            raise ConfigError(f"{where}: give one of rounds, gradual and acdc, not {' and '.join(given)}")
        if self.gradual is not None:
            self.gradual.validate(where + ".gradual")
        if self.acdc is not None:
            self.acdc.validate(where + ".acdc")
        _range(where + ".lr_fraction", self.lr_fraction, 0.0, None, lo_open=True)
        _choice(where + ".lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.regularization is not None:
            _choice(where + ".regularization", self.regularization, REGULARIZERS)
        if self.reg_strength is not None:
            _range(where + ".reg_strength", self.reg_strength, 0.0, None)
        if self.max_accuracy_drop is not None:
            _range(where + ".max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)
        if self.relative_from_sensitivity is not None:
            _range(where + ".relative_from_sensitivity", self.relative_from_sensitivity, 0.0, 100.0)
        _range(where + ".distill_alpha", self.distill_alpha, 0.0, 1.0)
        _range(where + ".distill_temperature", self.distill_temperature, 0.0, None, lo_open=True)


@dataclass
class QuantizeConfig:
    """Trained weight sharing after the last round (Han, Mao & Dally, Deep Compression, 2016).

    Each named layer's survivors are clustered (k-means) into 2^bits shared values, the
    centroids are retrained (each one's gradient is the sum of its members'), and the
    compact file stores them with Huffman-coded cluster indices and positions.
    """

    bits: Union[float, dict[str, float]] = field(default_factory=lambda: {"conv": 8.0, "fc": 5.0})
    """Bits per weight index: one number, or per layer / group / glob (the paper's AlexNet: conv 8, fc 5)."""
    init: str = "linear"
    """Centroid initialisation: ``linear`` across [min, max] of the survivors (the paper's best)."""
    epochs: int = 2
    """Epochs retraining the centroids (and biases); 0: cluster only."""
    lr_fraction: float = 0.002
    """Their learning rate as a fraction of ``train.lr``. A centroid's gradient sums thousands of
    members' gradients, so the rate is far below the dense one: 0.002 of 0.05 (1e-4) gained 0.1 point
    on the demo model, 0.2 of it (1e-2) lost 2.8 points."""

    def layer_keys(self) -> list[str]:
        return list(self.bits) if isinstance(self.bits, dict) else []

    def validate(self, where: str) -> None:
        _choice(where + ".init", self.init, ("linear",))
        _each(where + ".bits", self.bits, 1, 16)
        for value in (self.bits.values() if isinstance(self.bits, dict) else [self.bits]):
            if not float(value).is_integer():
                raise ConfigError(f"{where}.bits: a whole number of bits, got {value}")
        _range(where + ".epochs", self.epochs, 0, None)
        _range(where + ".lr_fraction", self.lr_fraction, 0.0, None, lo_open=True)


@dataclass
class Recipe:
    name: str = "run"
    """Run name; the run folder is ``<output_dir>/<name>``."""
    seed: int = 0
    """Seed for initialisation, dropout and batch order, in [0, 2^63 - 1] (the split has ``data.split_seed``)."""
    output_dir: str = "runs"
    """Where run folders are written."""
    threads: Optional[int] = None
    """torch intra-op threads; None keeps torch's default."""
    device: str = "auto"
    """Where to compute: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    Under torchrun each process takes ``cuda:LOCAL_RANK``. Checkpoints load on any device."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: Optional[QuantizeConfig] = None
    """After the last round: trained weight sharing (Deep Compression); None: off."""

    def validate(self) -> "Recipe":
        if self.name in ("", ".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError(f"name: must be a plain name (not '.' or '..', no '/' or '\\'), got {self.name!r}")
        for field_name in ("name", "output_dir"):
            problem = name_problem(getattr(self, field_name))
            if problem:
                raise ConfigError(f"{field_name}: {getattr(self, field_name)!r} {problem}; choose another")
        _range("seed", self.seed, 0, MAX_SEED)
        if self.threads is not None:
            _range("threads", self.threads, 1, MAX_THREADS)
        problem = check_device_spec(self.device, "device")
        if problem:
            raise ConfigError(problem)
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.prune.validate("prune")
        if self.quantize is not None:
            self.quantize.validate("quantize")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def factories(self) -> frozenset[str]:
        """The user's code this recipe names (model, data, loss and metric factories): what trusting the recipe
        trusts."""
        return frozenset(spec for _, spec in self._named_code())

    def _named_code(self) -> list[tuple[str, str]]:
        """``(field, spec)`` of every factory the recipe names (a built-in loss or metric is none)."""
        named = [("model.factory", self.model.factory), ("data.factory", self.data.factory),
                 ("train.loss", self.train.loss), ("train.metric", self.train.metric)]
        return [(name, spec) for name, spec in named if spec and is_factory(spec)]

    def check_trusted(self, trust: Trust, source: str | Path) -> None:
        """Refuse a recipe read from a file (a run folder's, a resume point's) whose factories are not trusted.

        Raises:
            prunet.factory.UntrustedFactoryError: before anything is imported.
        """
        for name, spec in self._named_code():
            check_trusted(spec, trust, str(source), name)

    def retrain_config(
        self,
        epochs: int,
        lr_fraction: float | None = None,
        regularization: str | None = None,
        reg_strength: float | None = None,
    ) -> TrainConfig:
        """The training settings of a retraining phase: the dense ones at a fraction of the learning rate.

        Args:
            epochs: retraining epochs.
            lr_fraction, regularization, reg_strength: override ``prune.lr_fraction``,
                ``prune.regularization`` and ``prune.reg_strength`` (each falls back to
                the dense phase's value when the recipe leaves it unset).
        """
        p, train = self.prune, self.train
        fraction = lr_fraction if lr_fraction is not None else p.lr_fraction
        strength = reg_strength if reg_strength is not None else p.reg_strength
        return dataclasses.replace(
            train,
            epochs=epochs,
            lr=train.lr * fraction,
            lr_schedule=p.lr_schedule,
            regularization=regularization or p.regularization or train.regularization,
            reg_strength=strength if strength is not None else train.reg_strength,
            warmup_steps=0,
        )

    def dense_only(self) -> "Recipe":
        """This recipe without pruning (rounds, gradual or AC/DC phase): dense training alone."""
        return dataclasses.replace(self, prune=dataclasses.replace(self.prune, rounds=[], gradual=None, acdc=None))

    def target_ladder(self, target: float, step: float = LADDER_STEP) -> "Recipe":
        """This recipe with its rounds replaced by a ladder of target rounds up to ``target``.

        Each round multiplies the compression by about ``step`` (the last lands on
        ``target``). The rounds take their criterion (``threshold`` or ``global``),
        relative qualities (unless ``prune.relative_from_sensitivity`` gives them; a
        mapping leaves the layers it does not name unpruned), epochs and learning rate
        from the recipe's first round; every round retrains all layers. A gradual
        or AC/DC phase is replaced too.

        Raises:
            ConfigError: ``target`` below 1, or a first round whose criterion cannot take a target.
        """
        if not (math.isfinite(target) and target >= 1):
            raise ConfigError(f"--target: a compression >= 1, got {target}")
        first = self.prune.rounds[0] if self.prune.rounds else RoundConfig()
        criterion = first.criterion if first.criterion in TARGET_CRITERIA else "threshold"
        # Relative qualities: the sensitivity analysis's when the recipe asks for it, else the first round's.
        keep_quality = criterion == "threshold" and self.prune.relative_from_sensitivity is None
        template = dataclasses.replace(first, criterion=criterion, sparsity=None, target=None,
                                       quality=first.quality if keep_quality else None,
                                       prune=["all"], train=["all"])
        rounds = [dataclasses.replace(template, target=t) for t in ladder_targets(target, step)]
        recipe = dataclasses.replace(self, prune=dataclasses.replace(self.prune, rounds=rounds, gradual=None,
                                                                     acdc=None))
        recipe.validate()
        return recipe

    def target_method(self, target: float, method: str | None = None) -> "Recipe":
        """This recipe pruning to ``target`` by ``method``, each with the epochs the paper's ladder would spend.

        ``None``: :func:`recommended_method` for ``target``. ``paper``: :meth:`target_ladder`. ``gradual``: one
        gradual phase (cubic over three quarters of those epochs, every 50 steps, ERK's shares among layers, as
        ``bench_frontier.py`` measured it) over those epochs. ``acdc``: one AC/DC phase over them (phases of an eighth
        of them, one global cut). The rounds, gradual or AC/DC phase the recipe had are replaced.

        Raises:
            ConfigError: ``target`` below 1, an unknown ``method``, or a first round that cannot take a target.
        """
        ladder = self.target_ladder(target)
        epochs = sum(r.epochs for r in ladder.prune.rounds)
        if method is None:  # the recommended method, or the ladder where the rounds leave it too few epochs
            method = recommended_method(target)
            method = method if epochs >= (3 if method == "acdc" else 1) else "paper"
        if method not in TARGET_METHODS:
            raise ConfigError(f"--method: one of {', '.join(TARGET_METHODS)}, got {method!r}")
        if method == "paper":
            return ladder
        if epochs < (3 if method == "acdc" else 1):
            raise ConfigError(f"--method {method}: the ladder to {target:g}x spends {epochs} epochs of retraining; "
                              f"{method} needs at least {3 if method == 'acdc' else 1} (raise the rounds' epochs)")
        lr_fraction = ladder.prune.rounds[0].lr_fraction
        gradual = GradualConfig(target=target, epochs=epochs, every_steps=50, criterion="erk", lr_fraction=lr_fraction) \
            if method == "gradual" else None
        phase = max(1, epochs // 8)
        acdc = AcdcConfig(target=target, epochs=epochs, phase_epochs=phase, lr_fraction=lr_fraction,
                          final_epochs=max(1, min(max(2 * phase, epochs // 4), epochs - 2 * phase))) \
            if method == "acdc" else None
        recipe = dataclasses.replace(self, prune=dataclasses.replace(self.prune, rounds=[], gradual=gradual, acdc=acdc))
        recipe.validate()
        return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a YAML recipe.

    Args:
        path: the YAML file.
        overrides: dotted keys to replace, e.g. ``{"train.epochs": 1}`` (from ``--set``).

    Raises:
        ConfigError: a missing or unreadable file, bad YAML, an unknown field, a wrong type or value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a recipe?") from None
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of fields, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return recipe_from_dict(data)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from plain data (parsed YAML)."""
    return _from_data(Recipe, data, "").validate()


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set takes FIELD=VALUE (e.g. train.epochs=3), got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.load(value, Loader=_Loader)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key.strip()}: {value!r} is not a valid YAML value") from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set recipe field ``key`` (``"train.epochs"``) of plain recipe data to ``value``, making sections as needed.

    Returns:
        ``data``, changed in place.

    Example:
        >>> set_dotted({"train": {"lr": 0.1}}, "train.epochs", 3)
        {'train': {'lr': 0.1, 'epochs': 3}}
    """
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a section")
    node[parts[-1]] = value
    return data


def _from_data(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {_typename(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown field; allowed: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                # A mapping that fails inside the mapping branch: report the inner field.
                if (typing.get_origin(arg) is dict or dataclasses.is_dataclass(arg)) and isinstance(value, dict):
                    raise e from None
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {_typename(value)} {value!r}")
    if tp is Any:  # a factory's own arguments: plain YAML values, passed as they are
        return value
    if dataclasses.is_dataclass(tp):
        return _from_data(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_typename(value)}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_typename(value)}")
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a number, got {_typename(value)} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_typename(value)} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_typename(value)} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_typename(value)} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {where}")


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    return " or ".join(words.get(a, "a mapping" if typing.get_origin(a) is dict or dataclasses.is_dataclass(a)
                                 else "a list") for a in args)


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _choice(where: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _range(where, value, lo, hi, lo_open=False, hi_open=False) -> None:
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        lo_s = "" if lo is None else ("(" if lo_open else "[") + str(lo)
        hi_s = "" if hi is None else str(hi) + (")" if hi_open else "]")
        allowed = f"{lo_s}, {hi_s}" if hi is not None else (f"> {lo}" if lo_open else f">= {lo}")
        if hi is not None and lo is not None:
            allowed = f"in {lo_s}, {hi_s}"
        raise ConfigError(f"{where}: {value} is out of range; allowed {allowed}")


def _each(where: str, value, lo, hi) -> None:
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for k, v in items:
        _range(where if k is None else f"{where}.{k}", v, lo, hi)
