"""Per-layer tables in the form of the paper's Tables 2-5.

One :class:`LayerRow` per weight layer: its weights and FLOPs, how many weights
are kept, and how many of its output activations are non-zero. Han et al.
estimate the FLOPs left after pruning as ``Weights% x Act%`` of the layer
before: a multiply-add is skipped when either its weight or its input is zero.

Example:
    >>> from prunet.models import create_model
    >>> model = create_model("lenet_300_100")
    >>> rows = layer_table(model, torch.zeros(1, 1, 28, 28))
    >>> [(r.name, r.flops) for r in rows]
    [('fc1', 470400), ('fc2', 60000), ('fc3', 2000)]
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from prunet.pruner import DEFAULT_TYPES, layer_kind


@dataclass(frozen=True)
class LayerRow:
    """One row of a per-layer table.

    Attributes:
        name: module name from ``named_modules`` (``"conv1"``, ``"features.0"``).
        kind: ``"conv"`` or ``"fc"``.
        shape: weight shape, e.g. ``(300, 784)``.
        weights: number of weights (bias excluded, as in the paper).
        kept: weights that survive pruning.
        kept_frac: ``kept / weights`` (the paper's Weights%).
        flops: dense FLOPs for one example, a multiply-add counted as 2.
        act_frac: fraction of non-zero outputs as seen by the next weight layer
            (the paper's Act%); 1.0 for the last layer; None without data.
        flops_kept_frac: ``kept_frac`` times the previous layer's ``act_frac``
            (the paper's FLOP%); the network input counts as dense.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    weights: int
    kept: int
    kept_frac: float
    flops: int
    act_frac: float | None
    flops_kept_frac: float

    @property
    def flops_kept(self) -> float:
        """FLOPs left after pruning: ``flops * flops_kept_frac``."""
        return self.flops * self.flops_kept_frac


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv1d/2d/3d modules of ``model``, in ``named_modules`` order.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``[(name, module), ...]``; the order is taken to be the order of execution,
        which holds for the registry models and for most feed-forward networks.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEFAULT_TYPES)]


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the block; each module's own training flag restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def _hooked(handles: list) -> Iterator[None]:
    """Remove the given hook handles on exit, even when the forward pass fails."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def count_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Dense FLOPs per example of each prunable layer, from one forward pass.

    Each output element of a Linear or Conv layer is a dot product of length
    ``weight.numel() / out_channels`` (``Cin/groups * kH * kW`` for a conv), so a
    layer costs ``2 * that * output.numel()`` FLOPs; biases are not counted.

    Args:
        model: the network; run once in eval mode under ``torch.no_grad``.
        example_input: a batch (normally of 1) at the real input size, ``(B, C, H, W)``.

    Returns:
        ``{layer name: FLOPs for one example}``; 0 for a layer the pass did not run.
    """
    layers = prunable_layers(model)
    flops = {name: 0 for name, _ in layers}
    batch = example_input.shape[0]

    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            macs_per_output = module.weight.numel() // module.weight.shape[0]
            flops[name] += 2 * macs_per_output * output.numel() // batch  # += : shared layers run twice

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    with _hooked(handles), _inference(model):
        model(example_input)
    return flops


def _batches(data: torch.Tensor | Iterable) -> Iterator[torch.Tensor]:
    """One tensor is one batch; an iterable yields batches or ``(inputs, targets, ...)``."""
    if isinstance(data, torch.Tensor):
        yield data
        return
    for item in data:
        yield item[0] if isinstance(item, (tuple, list)) else item


def activation_fractions(model: nn.Module, activation_data: torch.Tensor | Iterable) -> dict[str, float | None]:
    """The paper's Act%: non-zero fraction of each prunable layer's output, as the next one sees it.

    A forward pre-hook on each prunable layer counts the non-zero entries of its
    input and credits them to the prunable layer before it. So the fraction is
    measured after whatever lies between (ReLU, pooling, dropout in eval), works
    for functional activations inside custom ``forward`` methods, and matches
    the paper's LeNet-5 numbers, where conv1's Act% is what reaches conv2.

    Args:
        model: the network; run in eval mode under ``torch.no_grad``.
        activation_data: one input tensor, or an iterable of batches (a
            DataLoader's ``(inputs, targets)`` pairs work; targets are ignored).

    Returns:
        ``{layer name: fraction}``, counted over all elements of all batches;
        1.0 for the last layer (its output is the result, not an input);
        None for a layer whose successor never ran.
    """
    layers = prunable_layers(model)
    nonzero = {name: 0 for name, _ in layers}
    total = {name: 0 for name, _ in layers}

    def pre_hook(previous: str):
        def record(module: nn.Module, args) -> None:
            x = args[0]
            nonzero[previous] += int(torch.count_nonzero(x))
            total[previous] += x.numel()

        return record

    handles = [nxt.register_forward_pre_hook(pre_hook(prev)) for (prev, _), (_, nxt) in zip(layers, layers[1:])]
    param = next(model.parameters(), None)
    with _hooked(handles), _inference(model):
        for batch in _batches(activation_data):
            model(batch if param is None else batch.to(param.device))
    fractions: dict[str, float | None] = {n: nonzero[n] / total[n] if total[n] else None for n, _ in layers}
    if layers:
        fractions[layers[-1][0]] = 1.0
    return fractions


def _kept(name: str, module: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> int:
    """Kept weights of one layer: the mask's ones, or the weight's non-zeros without masks."""
    weight = module.weight
    if masks is None:
        return int(torch.count_nonzero(weight))
    key = f"{name}.weight"
    if key not in masks:
        return weight.numel()  # a layer the masks do not mention is not pruned
    mask = masks[key]
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"masks[{key!r}] has shape {tuple(mask.shape)}, but the weight has {tuple(weight.shape)}")
    return int(torch.count_nonzero(mask))


def layer_table(
    model: nn.Module,
    example_input: torch.Tensor,
    masks: Mapping[str, torch.Tensor] | None = None,
    activation_data: torch.Tensor | Iterable | None = None,
) -> list[LayerRow]:
    """One :class:`LayerRow` per prunable layer: the paper's Tables 2-5.

    Args:
        model: the (pruned or dense) network.
        example_input: a batch of 1 at the real input size, e.g. ``(1, 3, 227, 227)``;
            it fixes the FLOPs of convolutions.
        masks: ``{"fc1.weight": 0/1 tensor, ...}``; a layer not in the mapping is
            unpruned. None: the non-zero weights are the kept ones.
        activation_data: inputs for Act% (see :func:`activation_fractions`).
            None: ``act_frac`` is None and FLOP% assumes dense activations, so it
            counts only what pruning weights saves.

    Returns:
        The rows, in :func:`prunable_layers` order.
    """
    flops = count_flops(model, example_input)
    acts = activation_fractions(model, activation_data) if activation_data is not None else {}
    rows: list[LayerRow] = []
    previous_act = 1.0  # the network input is dense
    for name, module in prunable_layers(model):
        weights = module.weight.numel()
        kept = _kept(name, module, masks)
        act = acts.get(name)
        rows.append(
            LayerRow(
                name=name,
                kind=layer_kind(module),
                shape=tuple(module.weight.shape),
                weights=weights,
                kept=kept,
                kept_frac=kept / weights,
                flops=flops[name],
                act_frac=act,
                flops_kept_frac=kept / weights * previous_act,
            )
        )
        previous_act = 1.0 if act is None else act
    return rows


def table_totals(rows: Sequence[LayerRow]) -> dict[str, float]:
    """Whole-network totals of a layer table.

    Returns:
        ``weights``, ``kept``, ``kept_frac``, ``compression`` (weights / kept;
        inf when nothing is kept), ``flops``, ``flops_kept`` and ``flops_kept_frac``.
    """
    weights = sum(r.weights for r in rows)
    kept = sum(r.kept for r in rows)
    flops = sum(r.flops for r in rows)
    flops_kept = sum(r.flops_kept for r in rows)
    return {
        "weights": weights,
        "kept": kept,
        "kept_frac": kept / weights if weights else 0.0,
        "compression": weights / kept if kept else math.inf,
        "flops": flops,
        "flops_kept": flops_kept,
        "flops_kept_frac": flops_kept / flops if flops else 0.0,
    }


_UNITS = [(10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")]


def human_count(n: float) -> str:
    """A count as the paper prints it: ``235K``, ``3.7B``, ``1.45B``.

    Three significant digits (never finer than units), trailing zeros dropped,
    rounded half up; the unit is chosen after rounding, so 999,500 is ``1M``.

    Args:
        n: a non-negative count (floats allowed, e.g. FLOPs kept).

    Returns:
        The short string; numbers under 1000 print as integers (``500``).
    """
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"human_count expects a finite non-negative number, got {n!r}")
    d = Decimal(n) if isinstance(n, int) else Decimal(repr(float(n)))
    if d == 0:
        return "0"
    quantum = Decimal(1).scaleb(max(d.adjusted() - 2, 0))  # 3 significant digits, at least units
    d = d.quantize(quantum, rounding=ROUND_HALF_UP)
    for factor, suffix in _UNITS:
        if d >= factor:
            return f"{(d / factor).normalize():f}{suffix}"
    return f"{d.normalize():f}"


def _pct(frac: float | None) -> str:
    """``84%``; one decimal below 10% so that small fractions do not print as 0%."""
    if frac is None:
        return "–"
    pct = 100 * frac
    return f"{pct:.0f}%" if pct >= 10 or pct == 0 else f"{pct:.1f}%"


def format_table_markdown(rows: Sequence[LayerRow], totals: Mapping[str, float] | None = None) -> str:
    """The table as Markdown, columns as in the paper: Layer, Weights, FLOP, Act%, Weights%, FLOP%, Kept.

    Args:
        rows: from :func:`layer_table`.
        totals: from :func:`table_totals`; computed from ``rows`` when None.

    Returns:
        Markdown text ending in a Total row whose Kept cell carries the compression, e.g. ``6.7M (9.0×)``.
    """
    totals = table_totals(rows) if totals is None else totals
    lines = [
        "| Layer | Weights | FLOP | Act% | Weights% | FLOP% | Kept |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cells = [r.name, human_count(r.weights), human_count(r.flops), _pct(r.act_frac),
                 _pct(r.kept_frac), _pct(r.flops_kept_frac), human_count(r.kept)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    compression = f"{totals['compression']:.1f}×"
    total_cells = ["Total", human_count(totals["weights"]), human_count(totals["flops"]), "",
                   _pct(totals["kept_frac"]), _pct(totals["flops_kept_frac"]),
                   f"{human_count(totals['kept'])} ({compression})"]  # fmt: skip
    lines.append("| " + " | ".join(total_cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["layer", "kind", "shape", "weights", "flops", "act_frac", "kept_frac", "flops_kept_frac", "kept"]


def write_table_csv(rows: Sequence[LayerRow], path: str | Path) -> Path:
    """Write the rows with raw numbers (fractions, not percentages) for other tools.

    Args:
        rows: from :func:`layer_table`.
        path: the CSV file; parent folders are created.

    Returns:
        The path written. Columns: :data:`CSV_COLUMNS`; shape as ``300x784``;
        an empty ``act_frac`` where none was measured.
    """
    return write_csv(path, CSV_COLUMNS, (
        [r.name, r.kind, "x".join(map(str, r.shape)), r.weights, r.flops, "" if r.act_frac is None else r.act_frac,
         r.kept_frac, r.flops_kept_frac, r.kept]
        for r in rows
    ))


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a header and rows to ``path`` (parent folders created); returns the path.

    The one CSV writer of the analysis tables, so every table file is written alike.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path
