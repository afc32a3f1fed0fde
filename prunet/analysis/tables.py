"""Per-layer tables in the form of the paper's Tables 2-5, measured on a model.

:func:`layer_table` gives one :class:`~prunet.layers.LayerRow` per weight layer
with what only a forward pass can tell: its FLOPs, and how many of its output
activations are non-zero. Han et al. estimate the FLOPs left after pruning as
``Weights% x Act%`` of the layer before: a multiply-add is skipped when either
its weight or its input is zero. The row type, its totals and its formatting
belong to :mod:`prunet.layers`; the CSV files of every analysis table are
written here (:func:`write_csv`).

Example:
    >>> from prunet.models import create_model
    >>> model = create_model("lenet_300_100")
    >>> rows = layer_table(model, torch.zeros(1, 1, 28, 28))
    >>> [(r.layer, r.flops) for r in rows]
    [('fc1', 470400), ('fc2', 60000), ('fc3', 2000)]
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from prunet.files import write_text
from prunet.layers import LayerRow, find_layers, is_hf_conv1d


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
    layers = find_layers(model)
    flops = {layer.layer: 0 for layer in layers}
    batch = example_input.shape[0]

    def hook(layer):
        def record(module: nn.Module, inputs, output) -> None:
            flops[layer.layer] += 2 * _macs(layer, inputs[0], output) // batch  # += : shared layers run twice

        return record

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    with _hooked(handles), _inference(model):
        model(example_input)
    return flops


def _macs(layer, x: torch.Tensor, output) -> int:
    """Multiply-adds of one call of ``layer``'s weight: a dot product per output element.

    An attention in-projection (``E*3, E``) multiplies every token of the query by its weight;
    Hugging Face's ``Conv1D`` holds its weight ``(in, out)``, so a dot product is ``in`` long.
    """
    weight = layer.weight
    if layer.kind == "attn":
        return weight.numel() * (x.numel() // x.shape[-1])  # (out, in) x tokens
    if is_hf_conv1d(layer.module):
        return weight.shape[0] * output.numel()
    return weight.numel() // weight.shape[0] * output.numel()


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
    input and credits them to the prunable layer that ran just before it (in the
    order the forward runs them, which a custom ``forward`` may choose). So the
    fraction is measured after whatever lies between (ReLU, pooling, dropout in
    eval), works for functional activations inside custom ``forward`` methods, and
    matches the paper's LeNet-5 numbers, where conv1's Act% is what reaches conv2.
    In a graph with branches (a ResNet's shortcuts) the layer that ran before is not
    always the one whose output arrives: there it is an approximation.

    Args:
        model: the network; run in eval mode under ``torch.no_grad``.
        activation_data: one input tensor, or an iterable of batches (a
            DataLoader's ``(inputs, targets)`` pairs work; targets are ignored).

    Returns:
        ``{layer name: fraction}``, counted over all elements of all batches;
        1.0 for the layer that ran last (its output is the result, not an input);
        None for a layer no other layer ran after.
    """
    layers = [(layer.layer, layer.module) for layer in find_layers(model)]
    nonzero = {name: 0 for name, _ in layers}
    total = {name: 0 for name, _ in layers}
    last: list[str | None] = [None]  # the prunable layer that ran last: its output is what the next one sees

    def pre_hook(module: nn.Module, args) -> None:
        if last[0] is not None:
            x = args[0]
            nonzero[last[0]] += int(torch.count_nonzero(x))
            total[last[0]] += x.numel()

    def ran(name: str):
        def record(module: nn.Module, args, output) -> None:
            last[0] = name

        return record

    # Credited in the order the layers run (not the order they are defined in); for a chain the two agree.
    handles, hooked = [], set()
    for name, module in layers:
        if id(module) not in hooked:  # a module with two prunable parameters is one layer that runs
            hooked.add(id(module))
            handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(ran(name))]
    param = next(model.parameters(), None)
    final = None
    with _hooked(handles), _inference(model):
        for batch in _batches(activation_data):
            last[0] = None  # a batch starts from the input, not from the previous batch's last layer
            model(batch if param is None else batch.to(param.device))
            final = last[0]
    fractions: dict[str, float | None] = {n: nonzero[n] / total[n] if total[n] else None for n, _ in layers}
    if final is not None:  # the layer that ran last gives the result, not an input
        fractions[final] = 1.0
    return fractions


def _kept(layer, masks: Mapping[str, torch.Tensor] | None) -> int:
    """Kept weights of one layer: the mask's ones, or the weight's non-zeros without masks."""
    weight = layer.weight
    if masks is None:
        return int(torch.count_nonzero(weight))
    if layer.param not in masks:
        return weight.numel()  # a layer the masks do not mention is not pruned
    mask = masks[layer.param]
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"masks[{layer.param!r}] has shape {tuple(mask.shape)}, but the weight has "
                         f"{tuple(weight.shape)}")
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
        The rows, in :func:`prunet.layers.find_layers` order.
    """
    flops = count_flops(model, example_input)
    acts = activation_fractions(model, activation_data) if activation_data is not None else {}
    rows: list[LayerRow] = []
    previous_act = 1.0  # the network input is dense
    for layer in find_layers(model):
        name = layer.layer
        weights = layer.weight.numel()
        kept = _kept(layer, masks)
        act = acts.get(name)
        rows.append(
            LayerRow(
                layer=name,
                kind=layer.kind,
                shape=tuple(layer.weight.shape),
                weights=weights,
                kept=kept,
                flops=flops[name],
                act_frac=act,
                flops_kept_frac=kept / weights * previous_act,
            )
        )
        previous_act = 1.0 if act is None else act
    return rows


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
        [r.layer, r.kind, "x".join(map(str, r.shape)), r.weights, r.flops, "" if r.act_frac is None else r.act_frac,
         r.kept_frac, r.flops_kept_frac, r.kept]
        for r in rows
    ))


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write a header and rows to ``path`` whole (parent folders created); returns the path.

    The one CSV writer of the analysis tables, so every table file is written alike.
    """
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())
