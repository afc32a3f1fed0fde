"""Layer sensitivity to pruning, the paper's Figure 6.

Han et al. prune one layer at a time, without retraining, over a range of
thresholds and watch validation accuracy: convolutional layers (especially the
first) are far more sensitive than fully connected ones, and the curves tell how
hard each layer can be pruned. The paper chose its per-layer thresholds from
this analysis; :func:`propose_qualities` does the same from the table.

Everything here works on the trained model in place and gives it back exactly
as it was: only one layer's weights are changed at a time, saved before and
copied back after (bit for bit), and masks are never touched. A model that is
already pruned is pruned further from its current survivors.

Example, on a trained model and its validation split (so not run as a test):
    >>> rows = sensitivity(model, data.val, Normalization(data.mean, data.std))  # doctest: +SKIP
    >>> write_sensitivity_csv(rows, "runs/lenet/sensitivity.csv")  # doctest: +SKIP
    >>> fig = plot_sensitivity(rows, "runs/lenet/sensitivity.png")  # doctest: +SKIP
    >>> pruner.prune(Threshold(propose_qualities(rows, max_drop=0.5)))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from prunet.analysis.plots import save_figure
from prunet.analysis.tables import write_csv
from prunet.criteria import CRITERIA, criteria_names
from prunet.data import Split
from prunet.distributed import SINGLE, Ranks
from prunet.layers import find_layers, select
from prunet.tasks import Task
from prunet.train import Normalization, evaluate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSV_COLUMNS = ["layer", "kind", "criterion", "setting", "kept_frac", "pruned_frac", "val_acc", "acc_drop"]


@dataclass(frozen=True)
class SensitivityRow:
    """Validation accuracy (or the run's metric) with one layer pruned at one setting, nothing retrained.

    Attributes:
        layer: module name, e.g. ``"conv1"``.
        kind: ``"conv"`` or ``"fc"``.
        criterion: ``"threshold"`` (setting is the quality) or ``"sparsity"``.
        setting: the quality parameter or the target sparsity.
        kept_frac: fraction of the whole layer's weights kept (weights pruned
            before the analysis count as pruned).
        val_acc: validation accuracy in percent (with a ``task``: its metric).
        acc_drop: how much worse ``val_acc`` is than the unpruned model's, in points (the metric's
            units): unpruned minus pruned accuracy, or pruned minus unpruned bits/char for a
            lower-is-better metric; negative when pruning happens to help.
        higher_is_better: the metric's direction (accuracy's: True).
    """

    layer: str
    kind: str
    criterion: str
    setting: float
    kept_frac: float
    val_acc: float
    acc_drop: float
    higher_is_better: bool = True

    @property
    def pruned_frac(self) -> float:
        """Fraction of the layer's weights pruned: the x axis of Figure 6."""
        return 1.0 - self.kept_frac

    @property
    def base_acc(self) -> float:
        """Validation accuracy (metric) of the model as given (no extra pruning)."""
        return self.val_acc + self.acc_drop if self.higher_is_better else self.val_acc - self.acc_drop


def default_settings(criterion: str) -> tuple[float, ...]:
    """The settings swept when none are given (the criterion's ``sweep``): qualities 0..2 or sparsities 0..0.95."""
    _check_criterion(criterion)
    if not CRITERIA[criterion].sweep:
        raise ValueError(f"qualities: criterion {criterion!r} has no default sweep; give the settings")
    return CRITERIA[criterion].sweep


def sensitivity(
    model: nn.Module,
    val_split: Split,
    norm: Normalization,
    qualities: Sequence[float] | None = None,
    criterion: str = "threshold",
    layers: Iterable[str] | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    model_name: str | None = None,
    ranks: Ranks = SINGLE,
    task: Task | None = None,
) -> list[SensitivityRow]:
    """Prune each layer alone at each setting, without retraining, and measure validation accuracy (or metric).

    Each step prunes one layer's ``weight`` by ``criterion`` relative to its
    current survivors (its ``weight_prunet_mask`` when the model has masks, otherwise
    its non-zero weights), evaluates, and copies the saved weight back. The
    model ends bit-for-bit as it started, also when evaluation fails or is
    interrupted; its masks are never modified, and its train/eval mode is kept.

    Args:
        model: a trained network, dense or already pruned.
        val_split: the validation split (never the test split: the result
            chooses thresholds).
        norm: input normalisation.
        qualities: settings to sweep: quality parameters for ``"threshold"``,
            target sparsities of the whole layer for ``"sparsity"``; default
            :func:`default_settings`. Sorted ascending in the result.
        criterion: ``"threshold"`` (Han et al.: prune ``|w| < quality * std``)
            or ``"sparsity"``.
        layers: layer names, groups (``fc``, ``conv``, ``all``) or globs;
            default every Linear and Conv layer.
        batch_size: evaluation batch size.
        progress: show a tqdm bar over (layer, setting) pairs.
        model_name: how errors name the model (e.g. its registry name); default its class name.
        ranks: under torchrun, every rank calls this alike and each evaluates its part of the split.
        task: the loss and metric to evaluate with (a run's ``train.metric``); default accuracy. Each
            row's ``acc_drop`` is how much worse the metric got, in its direction.

    Returns:
        One row per (layer, setting), layers in forward order, settings ascending.

    Raises:
        ValueError: unknown criterion, bad setting, a ``layers`` key that names nothing.
    """
    _check_criterion(criterion)
    settings = sorted(float(s) for s in (default_settings(criterion) if qualities is None else qualities))
    if not settings:
        raise ValueError("qualities: give at least one setting")
    cls = CRITERIA[criterion]
    for s in settings:
        try:
            cls.check_value(s)
        except ValueError as e:
            raise ValueError(f"qualities: {e}") from None
    candidates = find_layers(model)
    if not candidates:
        raise ValueError("the model has no Linear or Conv layer to analyse")
    try:
        chosen = select(candidates, layers, model_name or type(model).__name__)
    except ValueError as e:
        raise ValueError(f"layers: {e}") from None

    task = task or Task()
    _, base_acc = evaluate(model, val_split, norm, batch_size, ranks=ranks, task=task)
    rows: list[SensitivityRow] = []
    bar = tqdm(
        total=len(chosen) * len(settings),
        desc="sensitivity",
        disable=None if progress else True,  # None: no bar when stderr is not a terminal
        leave=False,
    )
    with bar:
        for layer in chosen:
            weight = layer.weight
            survivors = (weight != 0) if layer.mask is None else layer.mask.to(torch.bool)
            saved = weight.detach().clone()
            try:
                for s in settings:
                    bar.set_postfix(layer=layer.layer, setting=f"{s:g}")
                    mask = cls.rule(saved, survivors, s)
                    with torch.no_grad():
                        weight.copy_(saved).mul_(mask)
                    _, acc = evaluate(model, val_split, norm, batch_size, ranks=ranks, task=task)
                    kept = int(mask.sum()) / mask.numel()
                    rows.append(SensitivityRow(layer.layer, layer.kind, criterion, s, kept, acc,
                                               task.metric.worse_by(base_acc, acc), task.metric.higher_is_better))
                    bar.update()
            finally:
                with torch.no_grad():
                    weight.copy_(saved)
    return rows


def setting_label(criterion: str) -> str:
    """What a criterion's setting is called: ``quality`` (threshold) or ``sparsity``."""
    cls = CRITERIA.get(criterion)
    return cls.setting_field if cls is not None and cls.setting_field else "setting"


def _check_criterion(criterion: str) -> None:
    if criterion not in criteria_names(per_layer=True):
        raise ValueError(f"criterion: {criterion!r} is not one of {', '.join(criteria_names(per_layer=True))}")


def _by_layer(rows: Sequence[SensitivityRow]) -> dict[str, list[SensitivityRow]]:
    """Rows grouped by layer (first-seen order), each group sorted by setting."""
    groups: dict[str, list[SensitivityRow]] = defaultdict(list)
    for r in rows:
        groups[r.layer].append(r)
    return {layer: sorted(g, key=lambda r: r.setting) for layer, g in groups.items()}


def propose_qualities(rows: Sequence[SensitivityRow], max_drop: float) -> dict[str, float]:
    """Per layer, the largest setting that costs at most ``max_drop`` points of validation accuracy (or of the
    metric the rows measured, in its direction: ``acc_drop`` is how much worse it got).

    Settings are scanned upwards and the scan stops at the first one that costs
    more than ``max_drop``: a larger setting that happens to score well again
    after a worse one is taken as noise, not as a safe choice.

    Args:
        rows: from :func:`sensitivity` (one criterion).
        max_drop: allowed accuracy drop in percentage points, e.g. ``0.5``.

    Returns:
        ``{layer: setting}`` in the rows' layer order, ready for
        ``Threshold(...)`` or ``Sparsity(...)``. A layer whose smallest setting
        already costs too much is left out, and so is left unpruned by those criteria.

    Example:
        >>> base = 90.0  # validation accuracy of the unpruned model
        >>> rows = [SensitivityRow(layer, "fc", "threshold", q, kept, acc, base - acc)
        ...         for layer, q, kept, acc in [("fc1", 0.5, 0.62, 89.9), ("fc1", 1.0, 0.32, 89.5),
        ...                                     ("fc1", 1.5, 0.13, 88.0), ("fc3", 0.5, 0.62, 89.4),
        ...                                     ("fc3", 1.0, 0.32, 85.0), ("fc3", 1.5, 0.13, 70.0)]]
        >>> propose_qualities(rows, max_drop=1.0)
        {'fc1': 1.0, 'fc3': 0.5}
    """
    if not math.isfinite(max_drop):
        raise ValueError(f"max_drop must be a finite number of points, got {max_drop}")
    criteria = {r.criterion for r in rows}
    if len(criteria) > 1:
        raise ValueError(f"rows mix criteria {sorted(criteria)}; propose settings for one at a time")
    proposal: dict[str, float] = {}
    for layer, group in _by_layer(rows).items():
        for r in group:
            if r.acc_drop > max_drop:
                break
            proposal[layer] = r.setting
    return proposal


def write_sensitivity_csv(rows: Sequence[SensitivityRow], path: str | Path) -> Path:
    """Write the rows, one per (layer, setting), with raw numbers (fractions, percent accuracy).

    Args:
        rows: from :func:`sensitivity`.
        path: the CSV file; parent folders are created.

    Returns:
        The path written; columns :data:`CSV_COLUMNS`.
    """
    return write_csv(path, CSV_COLUMNS, (
        [r.layer, r.kind, r.criterion, r.setting, r.kept_frac, r.pruned_frac, r.val_acc, r.acc_drop] for r in rows
    ))


def read_sensitivity_csv(path: str | Path) -> list[SensitivityRow]:
    """Read a file written by :func:`write_sensitivity_csv`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column or a value that is not a number, naming the file and line.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("layer", "kind", "criterion", "setting", "kept_frac", "val_acc", "acc_drop")
                   if c not in (reader.fieldnames or [])]  # fmt: skip
        if missing:
            raise ValueError(f"{path}: not a sensitivity table (missing columns {', '.join(missing)})")
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                rows.append(SensitivityRow(
                    rec["layer"], rec["kind"], rec["criterion"], float(rec["setting"]),
                    float(rec["kept_frac"]), float(rec["val_acc"]), float(rec["acc_drop"]),
                ))  # fmt: skip
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: expected numbers, got {dict(rec)}") from None
    return rows


def format_sensitivity_table(rows: Sequence[SensitivityRow]) -> str:
    """A Markdown pivot: one line per layer, one column per setting.

    Columns are headed ``q=0.5`` (threshold quality) or ``s=0.9`` (sparsity).
    Each cell is the validation accuracy and, in brackets, the fraction of the
    layer pruned, e.g. ``88.10 (60%)``; a first column gives the unpruned accuracy.

    Args:
        rows: from :func:`sensitivity` or :func:`read_sensitivity_csv`.

    Returns:
        Markdown text (empty string for no rows).
    """
    if not rows:
        return ""
    groups = _by_layer(rows)
    settings = sorted({r.setting for r in rows})
    symbol = setting_label(rows[0].criterion)[0]  # q= or s=: short headers keep the table narrow
    lines = [
        "| Layer | unpruned | " + " | ".join(f"{symbol}={s:g}" for s in settings) + " |",
        "|:--|--:|" + "--:|" * len(settings),
    ]
    for layer, group in groups.items():
        at = {r.setting: r for r in group}
        cells = [f"{at[s].val_acc:.2f} ({100 * at[s].pruned_frac:.0f}%)" if s in at else "" for s in settings]
        lines.append(f"| {layer} | {group[0].base_acc:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(rows: Sequence[SensitivityRow], path: str | Path | None = None) -> Figure:
    """Figure 6: validation accuracy against the fraction of one layer pruned, a curve per layer.

    Convolutional and fully connected layers get separate panels (one panel
    when the model has only one kind), sharing the y axis; a dashed line marks
    the unpruned accuracy.

    Args:
        rows: from :func:`sensitivity` or :func:`read_sensitivity_csv`.
        path: also write the figure to this PNG file (parent folders are created).

    Returns:
        The figure: one axes per kind of layer (``conv`` first), a line per layer
        (x: percent pruned, y: validation accuracy) and the dashed ``unpruned`` line.

    Example:
        >>> rows = [SensitivityRow("fc1", "fc", "threshold", q, kept, acc, 90.0 - acc)
        ...         for q, kept, acc in [(0.5, 0.62, 89.9), (1.0, 0.32, 89.5), (1.5, 0.13, 88.0)]]
        >>> fig = plot_sensitivity(rows, "sensitivity.png")
        >>> ax, = fig.axes
        >>> ax.get_title(), ax.get_legend_handles_labels()[1]
        ('fully connected layers: pruned alone, no retraining', ['fc1', 'unpruned'])
    """
    # Figure without pyplot: no global backend and no GUI, safe on a headless server.
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_sensitivity: no rows to plot")
    groups = _by_layer(rows)
    kinds = [k for k in ("conv", "fc") if any(g[0].kind == k for g in groups.values())]
    kinds += sorted({g[0].kind for g in groups.values()} - set(kinds))
    titles = {"conv": "convolutional layers", "fc": "fully connected layers"}
    base = rows[0].base_acc

    fig = Figure(figsize=(5.5 * len(kinds), 4.2), layout="constrained")
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        for layer, group in groups.items():
            if group[0].kind != kind:
                continue
            ax.plot([100 * r.pruned_frac for r in group], [r.val_acc for r in group], marker="o", ms=4, label=layer)
        ax.axhline(base, color="gray", ls="--", lw=1, label="unpruned")
        ax.set_title(f"{titles.get(kind, kind)}: pruned alone, no retraining", fontsize=10)
        ax.set_xlabel("parameters pruned away (% of the layer)")
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2 if len(groups) > 6 else 1)
    axes[0].set_ylabel("validation accuracy (%)")
    if path is not None:
        save_figure(fig, path, dpi=90)
    return fig
