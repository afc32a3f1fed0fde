"""Figures made from weights, like the paper's Figure 7.

The plot functions of :mod:`prunet.analysis` (:func:`plot_weight_histogram`,
``plot_sensitivity``, ``plot_bits``, ``plot_rounds``) return their matplotlib
``Figure`` and, given a path, also write it there as a PNG (:func:`save_figure`).
The figures are made without pyplot: no global backend, no GUI and nothing
registered to close, so they are safe to make from a notebook or a headless
server alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunet.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure to ``path`` as a whole file (parent folders created); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def plot_weight_histogram(
    before: torch.Tensor, after: torch.Tensor, layer_name: str, path: str | Path | None = None, *, bins: int = 100
) -> Figure:
    """Two histograms of one layer's weights: before pruning, and after pruning and retraining.

    The second panel shows only the non-zero (kept) weights, so the gap that
    magnitude pruning cuts around zero is visible, as in the paper's Figure 7.
    Both panels share the x axis so that the two distributions compare directly.

    Args:
        before: the layer's weights before pruning, any shape.
        after: the same layer's weights after pruning and retraining, any shape.
        layer_name: used in the titles, e.g. ``"conv2"``.
        path: also write the figure to this PNG file (parent folders are created).
        bins: histogram bins per panel.

    Returns:
        The figure: two axes, before and after.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> before = torch.randn(300, 784) * 0.05
        >>> after = before * (before.abs() > 0.05)  # what survives a cut at one std
        >>> fig = plot_weight_histogram(before, after, "fc1", "fc1_hist.png")
        >>> [ax.get_title() for ax in fig.axes]
        ['fc1: before pruning (235,200 weights)', 'fc1: after pruning + retraining (74,692 non-zero)']
    """
    from matplotlib.figure import Figure

    w_before = before.detach().flatten().float().cpu().numpy()
    w_after = after.detach().flatten().float().cpu()
    w_after = w_after[w_after != 0].numpy()  # pruned weights are exactly zero

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_before, ax_after = fig.subplots(1, 2, sharex=True)
    ax_before.hist(w_before, bins=bins, color="tab:blue")
    ax_before.set_title(f"{layer_name}: before pruning ({w_before.size:,} weights)")
    if w_after.size:
        ax_after.hist(w_after, bins=bins, color="tab:orange")
    else:
        ax_after.text(0.5, 0.5, "no weights kept", ha="center", va="center", transform=ax_after.transAxes)
    ax_after.set_title(f"{layer_name}: after pruning + retraining ({w_after.size:,} non-zero)")
    for ax in (ax_before, ax_after):
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    if path is not None:
        save_figure(fig, path, dpi=100)
    return fig
