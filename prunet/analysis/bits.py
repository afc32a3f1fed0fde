"""Accuracy against bits per weight (Deep Compression, Figure 6): the conv layers shared, or the FC layers.

Each point shares one group's survivors (k-means, :func:`prunet.share.share`)
at one bit width, the other layers left as they are, and measures validation
accuracy, without retraining the centroids (the paper's figure retrains; these
curves are therefore a lower bound of what retraining reaches).

Example, on a pruned model and its validation split (so not run as a test):
    >>> norm = Normalization(data.mean, data.std)  # doctest: +SKIP
    >>> rows = bits_sweep(model, data.val, norm, bits=(2, 3, 4, 5, 6, 8))  # doctest: +SKIP
    >>> write_bits_csv(rows, "runs/x/bits.csv")  # doctest: +SKIP
    >>> fig = plot_bits(rows, "runs/x/bits.png")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch.nn as nn

from prunet.analysis.plots import save_figure
from prunet.analysis.tables import write_csv
from prunet.data import Split
from prunet.layers import find_layers
from prunet.masks import baked_copy
from prunet.share import share
from prunet.tasks import Task
from prunet.train import Normalization, evaluate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class BitsRow:
    """One point: ``group`` (``conv`` or ``fc``) shared at ``bits``; ``base_acc`` is the unshared model's."""

    group: str
    bits: int
    val_acc: float
    base_acc: float


def bits_sweep(model: nn.Module, val: Split, norm: Normalization, bits: Sequence[int] = DEFAULT_BITS,
               batch_size: int = 1000, task: Task | None = None) -> list[BitsRow]:
    """The validation metric with the conv layers, then the FC layers, then the attention in-projections
    shared at each bit width (no retraining).

    The model is not changed (each point works on a baked copy). ``task``: the metric (accuracy
    unless given; ``val_acc`` holds whichever metric it is).
    """
    if not bits or any(not (1 <= b <= 16) or int(b) != b for b in bits):
        raise ValueError(f"bits: whole numbers in 1..16, got {list(bits)}")
    base = evaluate(model, val, norm, batch_size, task=task)[1]
    kinds = [k for k in ("conv", "fc", "attn") if any(layer.kind == k for layer in find_layers(model))]
    rows = []
    for kind in kinds:
        for b in sorted(int(b) for b in bits):
            copy = baked_copy(model)
            share(copy, {kind: b})
            rows.append(BitsRow(kind, b, evaluate(copy, val, norm, batch_size, task=task)[1], base))
    return rows


def write_bits_csv(rows: Sequence[BitsRow], path: str | Path) -> Path:
    """Write the rows (columns ``group, bits, val_acc, base_acc``); returns the path."""
    return write_csv(path, ["group", "bits", "val_acc", "base_acc"],
                     ([r.group, r.bits, f"{r.val_acc:.4f}", f"{r.base_acc:.4f}"] for r in rows))


def plot_bits(rows: Sequence[BitsRow], path: str | Path | None = None,
              ylabel: str = "validation accuracy (%)") -> Figure:
    """Validation accuracy against bits per weight, a curve per group, the unshared accuracy dashed.

    Args:
        rows: from :func:`bits_sweep`.
        path: also write the figure to this PNG file (parent folders are created).
        ylabel: what the rows measured (another task's metric, e.g. ``validation bits/char``).

    Returns:
        The figure: one axes, a line per group in the rows' order, then the ``not shared`` line.

    Example:
        >>> rows = [BitsRow("fc", b, acc, 89.6) for b, acc in [(2, 71.3), (4, 88.9), (6, 89.5)]]
        >>> fig = plot_bits(rows, "bits.png")
        >>> ax, = fig.axes
        >>> [line.get_label() for line in ax.lines]
        ['fully connected layers shared', 'not shared']
        >>> ax.get_xlabel(), ax.get_ylabel()
        ('bits per weight index', 'validation accuracy (%)')
    """
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("plot_bits: no rows to plot")
    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.subplots()
    names = {"conv": "conv layers shared", "fc": "fully connected layers shared",
             "attn": "attention in-projections shared"}
    for group in dict.fromkeys(r.group for r in rows):
        points = [r for r in rows if r.group == group]
        ax.plot([r.bits for r in points], [r.val_acc for r in points], marker="o", label=names.get(group, group))
    ax.axhline(rows[0].base_acc, linestyle="--", color="gray", label="not shared")
    ax.set_xticks(sorted({r.bits for r in rows}))
    ax.set_xlabel("bits per weight index")
    ax.set_ylabel(ylabel)
    ax.set_title("Accuracy against bits (no retraining)")
    ax.legend()
    if path is not None:
        save_figure(fig, path)
    return fig
