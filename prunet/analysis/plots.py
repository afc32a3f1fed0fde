"""Figures made from weights, like the paper's Figure 7."""

from __future__ import annotations

from pathlib import Path

import torch

from prunet.files import atomic_path


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure to ``path`` as a whole file (parent folders created); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return Path(path)


def plot_weight_histogram(
    before: torch.Tensor, after: torch.Tensor, path: str | Path, layer_name: str, bins: int = 100
) -> Path:
    """Two histograms of one layer's weights: before pruning, and after pruning and retraining.

    The second panel shows only the non-zero (kept) weights, so the gap that
    magnitude pruning cuts around zero is visible, as in the paper's Figure 7.
    Both panels share the x axis so that the two distributions compare directly.

    Args:
        before: the layer's weights before pruning, any shape.
        after: the same layer's weights after pruning and retraining, any shape.
        path: the PNG file to write; parent folders are created.
        layer_name: used in the titles, e.g. ``"conv2"``.
        bins: histogram bins per panel.

    Returns:
        The path written.

    Example:
        >>> plot_weight_histogram(w0, model.fc1.weight, "runs/fc1_hist.png", "fc1")
    """
    # Figure without pyplot: no global backend switch and no GUI, so this is safe
    # to call from a notebook or a headless server alike.
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    return save_figure(fig, path, dpi=100)
