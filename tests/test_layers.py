"""Tests for prunet.layers: finding prunable layers, naming them, one row type, its totals and table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from prunet import Pruner, Sparsity
from prunet.layers import (
    LayerNameError,
    LayerRow,
    PatternError,
    check_names,
    coverage,
    find_layers,
    format_table,
    human_count,
    resolve,
    rows_of,
    select,
    totals,
)
from prunet.models import create_model

# --- finding layers ---------------------------------------------------------------------------


def test_find_layers_finds_linear_and_conv_weights_in_order():
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Sequential(nn.Conv3d(1, 1, 1), nn.Conv2d(1, 1, 1)), nn.Linear(2, 2)
    )
    found = find_layers(model)
    assert [(layer.layer, layer.param, layer.kind) for layer in found] == [
        ("0", "0.weight", "conv"), ("2.0", "2.0.weight", "conv"),
        ("2.1", "2.1.weight", "conv"), ("3", "3.weight", "fc"),
    ]
    assert all(layer.weight is layer.module.weight for layer in found)
    assert [layer.layer for layer in find_layers(create_model("lenet_5"))] == ["conv1", "conv2", "fc1", "fc2"]


def test_find_layers_include_and_exclude_take_globs_and_groups():
    model = create_model("lenet_5")
    biases = ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"]
    assert [layer.param for layer in find_layers(model, include=["*.bias"])] == biases
    assert [layer.param for layer in find_layers(model, exclude=["conv*"])] == ["fc1.weight", "fc2.weight"]
    assert [layer.param for layer in find_layers(model, exclude=["conv"])] == ["fc1.weight", "fc2.weight"]
    assert [layer.param for layer in find_layers(model, include=["fc1", "conv2.weight"])] == ["conv2.weight", "fc1.weight"]


@pytest.mark.parametrize("pattern", [r"^fc1$", r"fc\.weight", "fc(1|2)", "fc1.weight$", ".+"])
def test_a_regular_expression_is_refused_with_a_hint(pattern):
    with pytest.raises(PatternError, match=r"looks like a regular expression; include takes globs .*groups \(fc, conv"):
        find_layers(create_model("lenet_5"), include=[pattern])


def test_a_glob_that_names_nothing_is_an_error_when_strict():
    with pytest.raises(PatternError, match="'fc9' names no parameter of Sequential"):
        find_layers(create_model("lenet_5"), exclude=["fc9"], strict=True)


def test_transformer_encoder_attention_in_projections_are_covered():
    """nn.MultiheadAttention holds its q/k/v projection as in_proj_weight: 10,240 of 16,384 weights were found."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2, enable_nested_tensor=False)
    found = find_layers(model)
    assert ("layers.0.self_attn.in_proj_weight", "attn") in [(layer.param, layer.kind) for layer in found]
    assert sum(layer.weight.numel() for layer in found) == 16_384
    cover = coverage(model, found)
    assert (cover.pruned, cover.total, cover.skipped) == (16_384, 16_384, ())
    assert cover.line == "prunes 16,384 of 16,384 matrix weights (100.0%)"
    assert [layer.param for layer in find_layers(model, include=["attn"])] == [
        "layers.0.self_attn.in_proj_weight", "layers.1.self_attn.in_proj_weight"]


def test_separate_qkv_projections_are_covered():
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert [layer.param for layer in find_layers(attn)] == [
        "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 defines it: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_hugging_face_conv1d_is_found_by_duck_type():
    model = nn.Sequential(Conv1D(12, 4), nn.ReLU(), Conv1D(3, 12))
    assert [(layer.param, layer.kind) for layer in find_layers(model)] == [("0.weight", "fc"), ("2.weight", "fc")]


def test_embeddings_are_opt_in_and_the_coverage_line_says_so():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    assert [layer.param for layer in find_layers(model)] == ["1.weight"]
    line = coverage(model, find_layers(model)).line
    assert line == "prunes 16 of 56 matrix weights (28.6%); skipped: embeddings 40 (0.weight; opt-in: include embed or all)"
    assert [layer.param for layer in find_layers(model, include=["all"])] == ["0.weight", "1.weight"]
    assert [(layer.param, layer.kind) for layer in find_layers(model, include=["embed"])] == [("0.weight", "embed")]


class PositionalModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x + self.pos[: x.shape[-2]])


def test_a_matrix_parameter_of_no_known_type_is_named_in_the_coverage_and_prunable_by_glob():
    model = PositionalModel()
    assert coverage(model, find_layers(model)).line == (
        "prunes 16 of 48 matrix weights (33.3%); skipped: not a known layer type 32 (pos; name them in include to "
        "prune them)")
    assert [(layer.param, layer.kind) for layer in find_layers(model, include=["pos", "fc"])] == [
        ("pos", "other"), ("fc.weight", "fc")]


# --- naming layers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, expected",
    [
        (None, ["conv1", "conv2", "fc1", "fc2"]),
        (["fc"], ["fc1", "fc2"]),
        (["conv"], ["conv1", "conv2"]),
        (["all"], ["conv1", "conv2", "fc1", "fc2"]),
        (["fc2", "conv1"], ["conv1", "fc2"]),  # model order, not the keys' order
        (["*2"], ["conv2", "fc2"]),
        (["fc1.weight"], ["fc1"]),
        ("conv2", ["conv2"]),  # one name, not its characters
    ],
)
def test_select_by_name_group_glob(keys, expected):
    assert [layer.layer for layer in select(find_layers(create_model("lenet_5")), keys)] == expected


def test_a_name_that_names_no_layer_is_one_clear_error():
    layers = find_layers(create_model("lenet_300_100"))
    with pytest.raises(LayerNameError) as info:
        select(layers, ["fc1", "fc9"], "lenet_300_100")
    assert str(info.value) == "'fc9' names no layer of lenet_300_100; layers: fc1, fc2, fc3 (groups: fc, conv, attn, embed, all)"
    with pytest.raises(LayerNameError, match="'conv' names no layer"):
        check_names(layers, ["conv"])  # a group with no member is a typo too
    check_names(layers, ["fc?", "all"])  # no error


def test_pruner_and_recipes_share_the_error(lenet):
    pruner = Pruner(lenet())
    with pytest.raises(LayerNameError, match=r"'fc4' names no layer of Sequential; layers: fc1, fc2, fc3"):
        pruner.prune(Sparsity({"fc4": 0.5}))
    with pytest.raises(LayerNameError, match=r"'head' names no layer"):
        pruner.select(["head"])


# --- resolving per-layer settings -------------------------------------------------------------


def targets_by_layer(model) -> dict:
    return {layer.layer: layer for layer in find_layers(model)}


def test_resolve_precedence_exact_over_group_over_glob():
    t = targets_by_layer(create_model("lenet_5"))
    # The glob comes first in the mapping and still loses to the group and the exact name.
    setting = {"fc*": 0.1, "all": 0.2, "fc": 0.3, "fc2": 0.4}
    assert resolve(setting, t["fc2"]) == 0.4
    assert resolve(setting, t["fc1"]) == 0.3
    assert resolve(setting, t["conv1"]) == 0.2
    assert resolve({"fc1.weight": 0.7, "fc": 0.3}, t["fc1"]) == 0.7
    assert resolve({"conv?": 0.5}, t["conv2"]) == 0.5


def test_resolve_scalar_none_and_unnamed():
    t = targets_by_layer(create_model("lenet_5"))
    assert resolve(0.25, t["conv1"]) == 0.25
    assert resolve(None, t["conv1"]) is None
    assert resolve({"fc": 1.0}, t["conv1"]) is None


# --- rows, totals, the table ------------------------------------------------------------------


def test_rows_count_the_mask_or_every_weight():
    model = create_model("lenet_300_100")
    assert [(r.layer, r.shape, r.weights, r.kept) for r in rows_of(find_layers(model))] == [
        ("fc1", (300, 784), 235_200, 235_200), ("fc2", (100, 300), 30_000, 30_000), ("fc3", (10, 100), 1_000, 1_000),
    ]
    pruner = Pruner(model)
    pruner.prune(Sparsity({"fc1": 0.75, "fc3": 0.5}))
    assert [r.kept for r in pruner.summary()] == [58_800, 30_000, 500]


def test_totals_and_compression():
    rows = [LayerRow("a", "fc", (10, 10), 100, 10), LayerRow("b", "fc", (5, 20), 100, 40)]
    t = totals(rows)
    assert (t.weights, t.kept) == (200, 50)
    assert t.kept_frac == 0.25 and t.pruned_frac == 0.75 and t.compression == 4.0
    assert (t.flops, t.flops_kept, t.flops_kept_frac) == (0, 0.0, 0.0)  # nothing measured
    empty = totals([LayerRow("a", "fc", (2,), 2, 0)])
    assert empty.compression == math.inf and empty.compression_or_none() is None


def test_row_to_dict_holds_only_what_was_measured():
    assert LayerRow("fc1", "fc", (3, 4), 12, 6).to_dict() == {
        "layer": "fc1", "kind": "fc", "shape": [3, 4], "weights": 12, "kept": 6,
    }
    assert LayerRow("fc1", "fc", (3, 4), 12, 6, flops=24, flops_kept_frac=0.5).flops_kept == 12.0


def test_console_table():
    rows = [LayerRow("fc1", "fc", (300, 784), 235_200, 14_343), LayerRow("fc2", "fc", (100, 300), 30_000, 1_929)]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["Layer", "Weights", "Weights%", "Kept"]
    assert lines[1].split() == ["fc1", "235,200", "6.10%", "14,343"]
    assert lines[-1].split() == ["Total", "265,200", "6.14%", "16,272", "(16.3x)"]
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned columns


def test_markdown_table_without_flops_has_no_flop_columns():
    text = format_table([LayerRow("fc1", "fc", (300, 784), 235_200, 14_343)], markdown=True)
    assert text.splitlines() == [
        "| Layer | Weights | Weights% | Kept |",
        "|:--|--:|--:|--:|",
        "| fc1 | 235K | 6.1% | 14.3K |",
        "| Total | 235K | 6.1% | 14.3K (16.4×) |",
    ]


# --- human_count ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0"),
        (1, "1"),
        (12.5, "13"),  # half up, never finer than units
        (12.4, "12"),
        (500, "500"),
        (999, "999"),
        (999.5, "1K"),  # the unit is chosen after rounding
        (1000, "1K"),
        (1499, "1.5K"),
        (1005, "1.01K"),
        (30_000, "30K"),
        (235_200, "235K"),
        (470_400, "470K"),
        (999_499, "999K"),
        (999_500, "1M"),
        (3_200_000, "3.2M"),
        (4_600_000, "4.6M"),
        (61_000_000, "61M"),
        (205_520_896, "206M"),
        (924_844_032, "925M"),
        (1_448_813_632, "1.45B"),
        (3_699_376_128, "3.7B"),
        (30_940_528_640, "30.9B"),
        (138_357_544_000, "138B"),
        (999_500_000_000, "1T"),
        (1e12, "1T"),
        (2.5e15, "2500T"),
        (470_400.0, "470K"),
    ],
)
def test_human_count(n, text):
    assert human_count(n) == text


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_human_count_rejects(bad):
    with pytest.raises(ValueError):
        human_count(bad)
