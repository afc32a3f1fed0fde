"""Accuracy loss against parameters pruned, the paper's Figure 5.

Han et al. compare five ways to reach a given fraction of pruned connections:
L1 or L2 regularisation, with or without retraining, and L2 with iterative
prune -> retrain. Their finding (AlexNet): right after pruning L1 loses less
(it has pushed many weights to zero already), after retraining L2 is better,
and iterative pruning is best.

:func:`tradeoff_study` reproduces that experiment for any recipe:

* two dense models are trained from the same initialisation, one with L1 and
  one with L2, each once (their states are kept in memory);
* for each fraction ``p``, each dense model is pruned so that ``p`` of every
  prunable layer is gone, evaluated (``*_noretrain``), retrained at the
  recipe's pruning learning rate with the same regulariser and evaluated
  again (``*_retrain``);
* the L2 model is walked up the ladder of fractions, pruning further and
  retraining at every step (``l2_iterative``);
* for the last fraction, one-shot pruning from dense is retrained for as many
  epochs as the whole ladder used (``oneshot_equal_epochs``), so iterative and
  one-shot are compared at equal cost.

Every choice (the best retraining epoch) is made on the validation split; the
test split is only reported.

Example, minutes of training on real data (so not run as a test):
    >>> rows = tradeoff_study(load_recipe("recipes/lenet300_fashion.yaml"), dense_epochs=15)  # doctest: +SKIP
    >>> write_tradeoff_csv(rows, "runs/tradeoff/lenet300.csv")  # doctest: +SKIP
    >>> fig = plot_tradeoff(rows, "runs/tradeoff/lenet300.png", "LeNet-300-100, Fashion-MNIST")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from prunet.analysis.plots import save_figure
from prunet.analysis.tables import write_csv
from prunet.config import Recipe
from prunet.criteria import CRITERIA, criteria_names
from prunet.criteria import Criterion
from prunet.data import DatasetSplits, load_data
from prunet.devices import resolve_device
from prunet.layers import totals
from prunet.models import create_model
from prunet.pruner import Pruner
from prunet.regularize import DropoutAdjuster
from prunet.train import FitOptions, Normalization, evaluate_splits, fit

Log = Callable[[str], None]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97)

# ``l1_penalty`` is ``strength * sum |w|`` added to the *mean* cross-entropy, so
# its pull on each weight is ``strength`` per step whatever the weight's size.
# L2 weight decay 5e-4 pulls a typical LeNet weight (|w| ~ 0.02-0.05) by
# 1e-5 to 2.5e-5 per step; 2e-5 gives L1 a comparable pull on typical weights
# and, on LeNet-300-100 / Fashion-MNIST, a dense accuracy within a few tenths
# of a point of the L2 model (see docs/tradeoff.md).
DEFAULT_L1_STRENGTH = 2e-5

CURVES: tuple[str, ...] = (
    "l1_noretrain",
    "l2_noretrain",
    "l1_retrain",
    "l2_retrain",
    "l2_iterative",
    "oneshot_equal_epochs",
)
CSV_COLUMNS = [
    "network",
    "curve",
    "regularizer",
    "target_fraction",
    "fraction_pruned",
    "val_acc",
    "test_acc",
    "dense_val_acc",
    "dense_test_acc",
    "val_loss_pts",
    "test_loss_pts",
    "epochs_used",
]


@dataclass(frozen=True)
class TradeoffRow:
    """One point of Figure 5: a network pruned to a fraction by one method.

    Attributes:
        network: the model's registry name, e.g. ``"lenet_300_100"``.
        curve: one of :data:`CURVES`.
        regularizer: ``"l1"`` or ``"l2"``, used in dense training and retraining.
        target_fraction: the fraction of prunable weights asked to be pruned.
        fraction_pruned: the fraction actually pruned, measured from the masks
            (``1 - kept / weights`` over all prunable weights).
        val_acc, test_acc: accuracy (%) after this method.
        dense_val_acc, dense_test_acc: accuracy (%) of the dense model this
            point started from (the L1 or the L2 one).
        epochs_used: retraining epochs spent after dense training to reach this
            point (0 without retraining; cumulative along the iterative ladder).
    """

    network: str
    curve: str
    regularizer: str
    target_fraction: float
    fraction_pruned: float
    val_acc: float
    test_acc: float
    dense_val_acc: float
    dense_test_acc: float
    epochs_used: int

    @property
    def val_loss_pts(self) -> float:
        """Validation accuracy lost to pruning, in points (negative: pruning helped)."""
        return self.dense_val_acc - self.val_acc

    @property
    def test_loss_pts(self) -> float:
        """Test accuracy lost to pruning, in points (reported, never used to choose)."""
        return self.dense_test_acc - self.test_acc

    def to_dict(self) -> dict:
        """The row as a CSV record (:data:`CSV_COLUMNS`)."""
        return {c: getattr(self, c) for c in CSV_COLUMNS}


@dataclass
class DenseModel:
    """A dense model trained once and kept in memory.

    Attributes:
        regularizer: ``"l1"`` or ``"l2"``.
        strength: the regulariser's coefficient.
        state: a deep copy of the trained ``state_dict``.
        val_acc, test_acc: its accuracy (%).
        seconds: training time.
    """

    regularizer: str
    strength: float
    state: dict[str, torch.Tensor]
    val_acc: float
    test_acc: float
    seconds: float


def train_dense(
    recipe: Recipe,
    data: DatasetSplits,
    regularizer: str,
    strength: float,
    epochs: int | None = None,
    log: Log = print,
) -> DenseModel:
    """Train the recipe's model densely with one regulariser, from the recipe's seed.

    Both regularisers start from the same initial weights and see the same
    batch order, so the two dense models differ only by their regulariser.

    Args:
        recipe: gives the model, optimizer, learning rate and schedule, seed.
        data: the splits (:func:`prunet.data.load_data`).
        regularizer: ``"l1"`` or ``"l2"``.
        strength: its coefficient (L1: ``strength * sum|w|`` added to the loss;
            L2: weight decay).
        epochs: dense epochs; None uses ``recipe.train.epochs``.
        log: where progress lines go.

    Returns:
        The trained state (best validation epoch) and its accuracies.
    """
    cfg = dataclasses.replace(
        recipe.train,
        epochs=recipe.train.epochs if epochs is None else epochs,
        regularization=regularizer,
        reg_strength=strength,
    )
    norm = Normalization(data.mean, data.std)
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.spec, **recipe.model.arguments()).to(resolve_device(recipe.device))
    fit(model, data.train, data.val, cfg, norm, FitOptions(
        seed=recipe.seed, phase=f"dense_{regularizer}", batch_size=recipe.data.batch_size,
        eval_batch_size=recipe.data.eval_batch_size))
    acc = evaluate_splits(model, data.val, data.test, norm, recipe.data.eval_batch_size)
    val_acc, test_acc = acc["val_acc"], acc["test_acc"]
    seconds = time.perf_counter() - start
    log(f"dense {regularizer} ({strength:g}), {cfg.epochs} epochs: val {val_acc:.2f}%  test {test_acc:.2f}%  "
        f"({seconds:.0f}s)")
    return DenseModel(regularizer, strength, copy.deepcopy(model.state_dict()), val_acc, test_acc, seconds)


def prune_criterion(criterion: str, fraction: float) -> Criterion:
    """The criterion that prunes ``fraction`` of the prunable weights.

    Args:
        criterion: ``"sparsity"``: every layer loses ``fraction`` of its
            weights; ``"global"``: one magnitude cut over all layers.
        fraction: in [0, 1].
    """
    if criterion not in criteria_names(setting="sparsity"):  # they reach a fraction exactly
        raise ValueError(f"criterion: {criterion!r} is not one of {', '.join(criteria_names(setting='sparsity'))}")
    return CRITERIA[criterion](fraction)


def check_study_args(
    fractions: Sequence[float],
    retrain_epochs: int,
    dense_epochs: int | None = None,
    l1_strength: float = DEFAULT_L1_STRENGTH,
    l2_strength: float | None = None,
    criterion: str = "sparsity",
) -> list[float]:
    """Validate the study's settings before anything is trained (the CLI calls it too).

    Returns:
        The fractions as the iterative ladder: unique, ascending.

    Raises:
        ValueError: a message naming the argument and the allowed range.
    """
    ladder = sorted({float(f) for f in fractions})
    if not ladder:
        raise ValueError("fractions: give at least one fraction to prune")
    bad = [f for f in ladder if not (math.isfinite(f) and 0.0 < f < 1.0)]
    if bad:
        raise ValueError(f"fractions: each must be in (0, 1), got {', '.join(f'{f:g}' for f in bad)}")
    if retrain_epochs < 1:
        raise ValueError(f"retrain_epochs: must be >= 1, got {retrain_epochs}")
    if dense_epochs is not None and dense_epochs < 1:
        raise ValueError(f"dense_epochs: must be >= 1, got {dense_epochs}")
    if criterion not in criteria_names(setting="sparsity"):  # they reach a fraction exactly
        raise ValueError(f"criterion: {criterion!r} is not one of {', '.join(criteria_names(setting='sparsity'))}")
    for name, value in (("l1_strength", l1_strength), ("l2_strength", l2_strength)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    return ladder


def tradeoff_study(
    recipe: Recipe,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    retrain_epochs: int = 2,
    dense_epochs: int | None = None,
    l1_strength: float = DEFAULT_L1_STRENGTH,
    l2_strength: float | None = None,
    criterion: str = "sparsity",
    data: DatasetSplits | None = None,
    progress: bool = True,
    log: Log = print,
) -> list[TradeoffRow]:
    """Figure 5: accuracy loss against the fraction of parameters pruned, five ways.

    The fractions are reached with ``criterion``. The default, ``"sparsity"``,
    prunes every layer to the same fraction by magnitude. That is what the
    paper's per-layer threshold (``quality × std`` of the layer) does when one
    quality is shared by layers whose weights have the same distribution shape,
    and it keeps the comparison
    about the regulariser: both models lose the same number of weights in every
    layer, so only *which* weights go differs, and the x axis is exact.
    ``"global"`` (one cut across layers) lets the regulariser also move the
    budget between layers.

    Retraining uses the recipe's ``prune.lr_fraction`` × ``train.lr`` and
    ``prune.lr_schedule``, the same regulariser and strength as the dense model,
    all layers trainable, and keeps the best validation epoch. With
    ``prune.adjust_dropout`` the dropout ratios are scaled as in the paper.

    Args:
        recipe: the model, data, training and retraining settings, seed.
            Its ``prune.rounds`` are ignored.
        fractions: target fractions of prunable weights pruned, each in (0, 1);
            sorted ascending, they are also the iterative ladder.
        retrain_epochs: retraining epochs after each pruning (and per ladder step).
        dense_epochs: dense training epochs; None uses ``recipe.train.epochs``.
        l1_strength: L1 coefficient (``strength * sum|w|`` added to the mean loss).
        l2_strength: L2 weight decay; None uses ``recipe.train.reg_strength``.
        criterion: ``"sparsity"`` (every layer the same fraction) or ``"global"``.
        data: the splits, when already loaded; None loads the recipe's data.
        progress: show a progress bar over the pruned points.
        log: where progress lines go.

    Returns:
        Rows in this order: for each fraction, ``l1_noretrain``, ``l1_retrain``,
        ``l2_noretrain``, ``l2_retrain``; then the ``l2_iterative`` ladder; then
        one ``oneshot_equal_epochs`` row.

    Raises:
        ValueError: no fractions, a fraction outside (0, 1), ``retrain_epochs`` < 1,
            an unknown criterion, a negative strength.

    Example, minutes of training on real data (so not run as a test):
        >>> recipe = load_recipe("recipes/lenet300_fashion.yaml", {"threads": 1})  # doctest: +SKIP
        >>> rows = tradeoff_study(recipe, fractions=(0.8, 0.9, 0.95), dense_epochs=15)  # doctest: +SKIP
        >>> print(format_tradeoff_table(rows))  # doctest: +SKIP
    """
    ladder = check_study_args(fractions, retrain_epochs, dense_epochs, l1_strength, l2_strength, criterion)
    l2_strength = recipe.train.reg_strength if l2_strength is None else float(l2_strength)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    resolve_device(recipe.device)  # a device this machine lacks fails before any data is read
    if data is None:
        data = load_data(recipe.data)
    log(f"tradeoff: {recipe.model.spec} on {data.name} (train {len(data.train)}, val {len(data.val)}, "
        f"test {len(data.test)}); fractions {', '.join(f'{f:g}' for f in ladder)}; {criterion} pruning; "
        f"retrain {retrain_epochs} epochs")
    dense = {
        "l1": train_dense(recipe, data, "l1", l1_strength, dense_epochs, log),
        "l2": train_dense(recipe, data, "l2", l2_strength, dense_epochs, log),
    }
    study = _Study(recipe, data, Normalization(data.mean, data.std), dense, criterion, log)
    rows: list[TradeoffRow] = []
    steps = 2 * len(ladder) + len(ladder) + 1
    with tqdm(total=steps, desc=f"tradeoff {recipe.model.spec}", disable=None if progress else True,
              leave=False) as bar:
        # One-shot: each fraction pruned from the dense model, then retrained.
        for target in ladder:
            for reg in ("l1", "l2"):
                rows += study.one_shot(reg, target, retrain_epochs)
                bar.update()
        # Iterative: the L2 model walks up the ladder, pruning its survivors further each step.
        model, pruner, dropout = study.pruned_copy("l2", None)
        for k, target in enumerate(ladder):
            pruner.prune(prune_criterion(criterion, target))
            # The first step's seed equals the one-shot seed: both start identical there.
            study.retrain(model, pruner, dropout, "l2", retrain_epochs, seed=recipe.seed + 1 + k)
            rows.append(study.point(model, pruner, "l2_iterative", "l2", target, (k + 1) * retrain_epochs))
            bar.update()
        # One-shot to the last fraction with the ladder's whole retraining budget.
        rows += study.one_shot("l2", ladder[-1], len(ladder) * retrain_epochs, curve="oneshot_equal_epochs")
        bar.update()
    return rows


@dataclass
class _Study:
    """One trade-off study's fixed parts: the recipe, the data, the two dense models, the criterion."""

    recipe: Recipe
    data: DatasetSplits
    norm: Normalization
    dense: dict[str, DenseModel]
    criterion: str
    log: Log

    def one_shot(self, reg: str, target: float, epochs: int, curve: str | None = None) -> list[TradeoffRow]:
        """The ``reg`` dense model pruned to ``target`` and retrained ``epochs``: its rows before (unless
        ``curve`` names a single curve) and after retraining."""
        model, pruner, dropout = self.pruned_copy(reg, target)
        rows = [] if curve else [self.point(model, pruner, f"{reg}_noretrain", reg, target, 0)]
        self.retrain(model, pruner, dropout, reg, epochs, seed=self.recipe.seed + 1)
        return rows + [self.point(model, pruner, curve or f"{reg}_retrain", reg, target, epochs)]

    def point(self, model: nn.Module, pruner: Pruner, curve: str, reg: str, target: float,
              epochs: int) -> TradeoffRow:
        acc = evaluate_splits(model, self.data.val, self.data.test, self.norm, self.recipe.data.eval_batch_size)
        d = self.dense[reg]
        row = TradeoffRow(self.recipe.model.spec, curve, reg, target, pruned_fraction(pruner), acc["val_acc"],
                          acc["test_acc"], d.val_acc, d.test_acc, epochs)
        self.log(f"  {curve:<21} {100 * row.fraction_pruned:6.2f}% pruned  val {row.val_acc:6.2f}% "
                 f"(loss {row.val_loss_pts:+6.2f})  test {row.test_acc:6.2f}%  [{epochs} retrain epochs]")
        return row

    def pruned_copy(self, reg: str, fraction: float | None) -> tuple[nn.Module, Pruner, DropoutAdjuster]:
        """A fresh model holding the ``reg`` dense weights, its pruner and dropout adjuster, pruned to
        ``fraction`` (None: unpruned)."""
        recipe = self.recipe
        # A new model each time: masks, hooks and dropout ratios never leak between points.
        model = create_model(recipe.model.spec, **recipe.model.arguments()).to(resolve_device(recipe.device))
        model.load_state_dict(self.dense[reg].state)
        pruner = Pruner(model)
        dropout = DropoutAdjuster(model, [t.layer for t in pruner.targets])  # the original ratios, D_o
        if fraction is not None:
            pruner.prune(prune_criterion(self.criterion, fraction))
        return model, pruner, dropout

    def retrain(self, model: nn.Module, pruner: Pruner, dropout: DropoutAdjuster, reg: str, epochs: int,
                seed: int) -> None:
        """Retrain the survivors with the dense model's regulariser at the recipe's pruning learning rate."""
        recipe, dense = self.recipe, self.dense[reg]
        if recipe.prune.adjust_dropout:
            rows = pruner.summary()
            dropout.adjust({r.layer: r.kept for r in rows}, {r.layer: r.weights for r in rows})
        cfg = recipe.retrain_config(epochs, regularization=dense.regularizer, reg_strength=dense.strength)
        fit(model, self.data.train, self.data.val, cfg, self.norm, FitOptions(
            seed=seed, pruner=pruner, phase=f"retrain_{dense.regularizer}", batch_size=recipe.data.batch_size,
            eval_batch_size=recipe.data.eval_batch_size))


def pruned_fraction(pruner: Pruner) -> float:
    """Fraction of the pruner's prunable weights that are pruned: ``1 - kept / weights``."""
    return totals(pruner.summary()).pruned_frac


# --- tables ---------------------------------------------------------------------------------


def write_tradeoff_csv(rows: Sequence[TradeoffRow], path: str | Path) -> Path:
    """Write one line per point, raw numbers (fractions in [0, 1], accuracies in %).

    Args:
        rows: from :func:`tradeoff_study`.
        path: the CSV file; parent folders are created.

    Returns:
        The path written; columns :data:`CSV_COLUMNS`.
    """
    return write_csv(path, CSV_COLUMNS, ([r.to_dict()[c] for c in CSV_COLUMNS] for r in rows))


def read_tradeoff_csv(path: str | Path) -> list[TradeoffRow]:
    """Read a file written by :func:`write_tradeoff_csv`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column or a value of the wrong type, naming the file and line.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a tradeoff table (missing columns {', '.join(missing)})")
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(TradeoffRow(
                    rec["network"], rec["curve"], rec["regularizer"], float(rec["target_fraction"]),
                    float(rec["fraction_pruned"]), float(rec["val_acc"]), float(rec["test_acc"]),
                    float(rec["dense_val_acc"]), float(rec["dense_test_acc"]), int(rec["epochs_used"]),
                ))  # fmt: skip
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: expected numbers, got {dict(rec)}") from None
    return rows


def format_tradeoff_table(rows: Sequence[TradeoffRow], metric: str = "val") -> str:
    """A Markdown pivot: one line per target fraction, one column per curve.

    Each cell is the accuracy loss in points and, in brackets, the accuracy,
    e.g. ``0.41 (88.95)``. The one-shot-at-equal-epochs point gets its own
    line, next to the iterative ladder's last point.

    Args:
        rows: from :func:`tradeoff_study` or :func:`read_tradeoff_csv`.
        metric: ``"val"`` or ``"test"``.

    Returns:
        Markdown text (empty string for no rows).
    """
    if metric not in ("val", "test"):
        raise ValueError(f"metric: {metric!r} is not one of val, test")
    if not rows:
        return ""
    curves = [c for c in CURVES[:-1] if any(r.curve == c for r in rows)]
    at = {(r.curve, r.target_fraction): r for r in rows}
    targets = sorted({r.target_fraction for r in rows if r.curve in curves})

    def cell(r: TradeoffRow | None) -> str:
        if r is None:
            return ""
        loss, acc = (r.val_loss_pts, r.val_acc) if metric == "val" else (r.test_loss_pts, r.test_acc)
        return f"{loss:.2f} ({acc:.2f})"

    lines = [
        "| pruned | " + " | ".join(c.replace("_", " ") for c in curves) + " |",
        "|--:|" + "--:|" * len(curves),
    ]
    for t in targets:
        measured = next(r.fraction_pruned for r in rows if r.target_fraction == t)
        lines.append(f"| {100 * measured:.1f}% | " + " | ".join(cell(at.get((c, t))) for c in curves) + " |")
    lines.append("")
    for r in rows:
        if r.curve == "oneshot_equal_epochs":
            it = at.get(("l2_iterative", r.target_fraction))
            line = (f"One-shot L2 to {100 * r.fraction_pruned:.1f}% with {r.epochs_used} retraining epochs: "
                    f"loss {cell(r)}")
            if it is not None:
                line += f"; iterative ladder, same epochs: loss {cell(it)}"
            lines.append(line + ".")
    return "\n".join(lines).rstrip("\n") + "\n"


# --- plot -----------------------------------------------------------------------------------

# Paper-like styles: L1 blue, L2 red; dashed without retraining, solid with, thick for iterative.
_STYLE: Mapping[str, dict] = {
    "l1_noretrain": dict(color="tab:blue", ls="--", marker="o", label="L1 regularization w/o retrain"),
    "l2_noretrain": dict(color="tab:red", ls="--", marker="s", label="L2 regularization w/o retrain"),
    "l1_retrain": dict(color="tab:blue", ls="-", marker="o", label="L1 regularization w/ retrain"),
    "l2_retrain": dict(color="tab:red", ls="-", marker="s", label="L2 regularization w/ retrain"),
    "l2_iterative": dict(color="tab:green", ls="-", lw=2.5, marker="D", label="L2 w/ iterative prune and retrain"),
}


def plot_tradeoff(rows: Sequence[TradeoffRow], path: str | Path | None = None, title: str | None = None):
    """Figure 5: validation accuracy loss against parameters pruned away, a line per curve.

    Two panels share the x axis: all five curves on the left; on the right a
    zoom on the retrained curves, whose losses are small next to those without
    retraining. Down is worse, as in the paper. A star marks one-shot pruning
    retrained for the whole ladder's epochs.

    Args:
        rows: from :func:`tradeoff_study` or :func:`read_tradeoff_csv`.
        path: where to save it as PNG (parent folders are created); None saves nothing.
        title: figure title; default the network name.

    Returns:
        The matplotlib ``Figure``.
    """
    # Figure without pyplot: no global backend and no GUI, safe on a headless server.
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_tradeoff: no rows to plot")
    by_curve: dict[str, list[TradeoffRow]] = {}
    for r in rows:
        by_curve.setdefault(r.curve, []).append(r)
    oneshot = by_curve.pop("oneshot_equal_epochs", [])

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_all, ax_zoom = fig.subplots(1, 2, sharex=True)
    panels = ((ax_all, CURVES[:-1], "all curves"), (ax_zoom, CURVES[2:-1], "with retraining (zoom)"))
    for ax, curves, name in panels:
        for c in curves:
            pts = sorted(by_curve.get(c, []), key=lambda r: r.fraction_pruned)
            if pts:
                ax.plot([100 * r.fraction_pruned for r in pts], [-r.val_loss_pts for r in pts], ms=5, **_STYLE[c])
        for r in oneshot:
            ax.plot(100 * r.fraction_pruned, -r.val_loss_pts, marker="*", ms=14, ls="none", color="black",
                    label=f"L2 one-shot, retrained {r.epochs_used} epochs (= iterative's)")
        ax.axhline(0.0, color="gray", lw=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("parameters pruned away (%)")
        ax.grid(alpha=0.3)
    ax_all.set_ylabel("accuracy change vs. dense (validation, points; < 0 is a loss)")
    for ax in (ax_all, ax_zoom):
        ax.legend(fontsize=8, loc="lower left", handlelength=3.5)  # long enough to show dashed vs solid
    fig.suptitle(title or rows[0].network)
    if path is not None:
        save_figure(fig, path, dpi=90)
    return fig
