"""Tests for prunet.analysis: FLOPs against the paper, Act%, kept, energy, the table CSV, plots."""

from __future__ import annotations

import csv
import functools
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunet.analysis import (
    EnergyCosts,
    activation_fractions,
    estimate_energy,
    layer_table,
    plot_weight_histogram,
    write_table_csv,
)
from prunet.analysis.bits import BitsRow, plot_bits
from prunet.layers import LayerRow, find_layers, format_table, totals
from prunet.models import create_model, get_model_info

# ---------------------------------------------------------------- paper values

# FLOPs per layer as printed in Han et al. (2015), Tables 1-5; fc1/fc2/fc3 of
# AlexNet are our fc6/fc7/fc8.
PAPER_FLOPS = {
    "lenet_300_100": {"fc1": "470K", "fc2": "60K", "fc3": "2K"},
    "lenet_5": {"conv1": "576K", "conv2": "3200K", "fc1": "800K", "fc2": "10K"},
    "alexnet": {
        "conv1": "211M", "conv2": "448M", "conv3": "299M", "conv4": "224M", "conv5": "150M",
        "fc6": "75M", "fc7": "34M", "fc8": "8M",
    },
    "vgg16": {
        "conv1_1": "0.2B", "conv1_2": "3.7B", "conv2_1": "1.8B", "conv2_2": "3.7B",
        "conv3_1": "1.8B", "conv3_2": "3.7B", "conv3_3": "3.7B",
        "conv4_1": "1.8B", "conv4_2": "3.7B", "conv4_3": "3.7B",
        "conv5_1": "925M", "conv5_2": "925M", "conv5_3": "925M",
        "fc6": "206M", "fc7": "34M", "fc8": "8M",
    },
}  # fmt: skip
PAPER_TOTAL_FLOPS = {"vgg16": "30.9B"}  # AlexNet: see test_alexnet_total_flops

_UNIT = {"K": 10**3, "M": 10**6, "B": 10**9}


def matches_paper(value: int, printed: str) -> bool:
    """Whether ``value`` prints as ``printed`` at the paper's precision.

    ``"3.7B"`` means: divide by 1e9, round half up to one decimal, get 3.7.
    The unit and the number of decimals are both taken from the printed string.
    """
    number, unit = printed[:-1], printed[-1]
    decimals = Decimal(number).as_tuple().exponent  # "3.7" -> -1, "470" -> 0
    scaled = Decimal(value) / _UNIT[unit]
    return scaled.quantize(Decimal(1).scaleb(decimals), rounding=ROUND_HALF_UP) == Decimal(number)


@pytest.mark.parametrize(
    "value, printed, expected",
    [
        (470_400, "470K", True),
        (470_499, "470K", True),
        (470_500, "470K", False),  # rounds half up to 471K
        (469_499, "470K", False),
        (173_408_256, "0.2B", True),
        (150_000_000, "0.2B", True),
        (149_999_999, "0.2B", False),
        (250_000_000, "0.2B", False),
        (3_200_000, "3200K", True),
        (3_201_000, "3200K", False),
        (30_940_528_640, "30.9B", True),
        (30_950_000_000, "30.9B", False),
        (924_844_032, "925M", True),
        (924_844_032, "0.9B", True),
        (924_844_032, "1B", True),
        (924_844_032, "924M", False),
    ],
)
def test_matches_paper_can_fail(value, printed, expected):
    assert matches_paper(value, printed) is expected


def _example(name: str) -> torch.Tensor:
    return torch.zeros(1, *get_model_info(name).input_shape)


@functools.lru_cache(maxsize=None)
def _dense_rows(name: str) -> tuple[LayerRow, ...]:
    # A real batch-1 forward of the real model: FLOPs come from the same hooks a user runs.
    torch.manual_seed(0)
    return tuple(layer_table(create_model(name), _example(name)))


@pytest.mark.parametrize("name", sorted(PAPER_FLOPS))
def test_flops_match_paper(name):
    rows = _dense_rows(name)
    assert [r.layer for r in rows] == list(PAPER_FLOPS[name])
    paper = PAPER_FLOPS[name]
    mismatches = {r.layer: (r.flops, paper[r.layer]) for r in rows if not matches_paper(r.flops, paper[r.layer])}
    assert not mismatches
    if name in PAPER_TOTAL_FLOPS:
        assert matches_paper(totals(rows).flops, PAPER_TOTAL_FLOPS[name])


def test_exact_flops_by_hand():
    rows = {r.layer: r for r in _dense_rows("alexnet")}
    assert rows["conv1"].flops == 2 * (3 * 11 * 11) * 96 * 55 * 55
    assert rows["conv2"].flops == 2 * (48 * 5 * 5) * 256 * 27 * 27  # groups=2 halves Cin per filter
    assert rows["fc6"].flops == 2 * 9216 * 4096
    assert rows["conv2"].shape == (256, 48, 5, 5) and rows["conv2"].kind == "conv"
    assert rows["fc6"].kind == "fc" and rows["fc6"].weights == 9216 * 4096


def test_alexnet_total_flops():
    # The paper prints 1.5B, but its own rows add up to 1449M (211+448+299+224+150+75+34+8)
    # and the exact total is 1,448,813,632 = 1.4B at that precision; 1.5B looks like
    # double rounding (1.449 -> 1.45 -> 1.5). We test the arithmetic, not the typo.
    total = totals(_dense_rows("alexnet")).flops
    assert total == 1_448_813_632
    assert matches_paper(total, "1449M") and matches_paper(total, "1.4B")
    assert sum(int(v[:-1]) for v in PAPER_FLOPS["alexnet"].values()) == 1449


def test_flops_count_each_example_once():
    model = create_model("lenet_5")
    one = layer_table(model, torch.zeros(1, 1, 28, 28))
    four = layer_table(model, torch.zeros(4, 1, 28, 28))
    assert [r.flops for r in one] == [r.flops for r in four]


# ---------------------------------------------------------------- layers and kept


def test_kept_from_masks_equals_kept_from_zeros():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    masks = {}
    with torch.no_grad():
        for name, module in ((layer.layer, layer.module) for layer in find_layers(model)):
            mask = torch.rand_like(module.weight) > 0.7
            module.weight.mul_(mask)  # prunet's convention: pruned weights are exactly zero
            masks[f"{name}.weight"] = mask
    x = torch.zeros(1, 1, 28, 28)
    with_masks = layer_table(model, x, masks=masks)
    with_zeros = layer_table(model, x)
    assert [(r.kept, r.kept_frac) for r in with_masks] == [(r.kept, r.kept_frac) for r in with_zeros]
    assert [r.kept for r in with_masks] == [int(m.sum()) for m in masks.values()]
    assert 0.25 < with_masks[0].kept_frac < 0.35


def test_layer_missing_from_masks_is_unpruned_and_bad_shape_raises():
    model = create_model("lenet_300_100")
    x = torch.zeros(1, 1, 28, 28)
    rows = layer_table(model, x, masks={"fc1.weight": torch.zeros(300, 784, dtype=torch.bool)})
    assert [r.kept for r in rows] == [0, 300 * 100, 100 * 10]
    with pytest.raises(ValueError, match="fc2.weight"):
        layer_table(model, x, masks={"fc2.weight": torch.ones(3, 3)})


# ---------------------------------------------------------------- Act% on a hand case


class Tiny(nn.Module):
    """2 -> 3 -> 4 -> 1 with functional ReLUs: pre-hooks must not need ReLU modules."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.fc2 = nn.Linear(3, 4, bias=False)
        self.fc3 = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
            self.fc2.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
            self.fc3.weight.fill_(1.0)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


TINY_X = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
# By hand: relu(fc1 x) = [1, 2, 0] and [0, 3, 0] -> 3 of 6 non-zero = 0.5
#          relu(fc2 h) = [1, 2, 0, 3] and [0, 3, 0, 3] -> 5 of 8 non-zero = 0.625
TINY_ACT = {"fc1": 0.5, "fc2": 0.625, "fc3": 1.0}


def test_act_frac_by_hand():
    assert activation_fractions(Tiny(), TINY_X) == TINY_ACT


def test_act_frac_counts_elements_over_all_batches():
    # Two batches of one, and DataLoader-style (inputs, targets) pairs, give the same fractions.
    batches = [(TINY_X[:1], torch.tensor([0])), (TINY_X[1:], torch.tensor([1]))]
    assert activation_fractions(Tiny(), batches) == TINY_ACT
    assert activation_fractions(Tiny(), [TINY_X[:1], TINY_X[1:]]) == TINY_ACT


def test_act_frac_is_measured_after_pooling():
    # conv1 output: channel 0 is 2x2 positive -> maxpool -> one non-zero of 1; channel 1 is
    # all zero. What conv2 sees is 1 of 2 non-zero, whereas conv1's own output is 4 of 8.
    conv1 = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
    model = nn.Sequential(conv1, nn.MaxPool2d(2), nn.Conv2d(2, 1, 1))
    fractions = activation_fractions(model, torch.ones(1, 1, 2, 2))
    assert fractions == {"0": 0.5, "2": 1.0}


def test_model_modes_restored_after_measuring():
    model = create_model("lenet_300_100", dropout=0.5)
    model.train()
    model.fc2.eval()
    layer_table(model, torch.zeros(1, 1, 28, 28), activation_data=torch.randn(2, 1, 28, 28))
    assert model.training and model.fc1.training and not model.fc2.training


def test_flops_kept_frac_is_weights_times_previous_act():
    masks = {
        "fc1.weight": torch.tensor([[1, 1], [1, 0], [0, 1]]),  # 4 of 6
        "fc2.weight": torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]]),  # 6 of 12
        "fc3.weight": torch.tensor([[1, 0, 0, 0]]),  # 1 of 4
    }
    rows = layer_table(Tiny(), TINY_X[:1], masks=masks, activation_data=TINY_X)
    assert [r.flops for r in rows] == [2 * 2 * 3, 2 * 3 * 4, 2 * 4 * 1]
    assert [r.kept for r in rows] == [4, 6, 1]
    assert [r.act_frac for r in rows] == [0.5, 0.625, 1.0]
    assert [r.flops_kept_frac for r in rows] == pytest.approx([4 / 6, 0.5 * 0.5, 0.25 * 0.625])
    # Without activation data: Act% unknown, FLOP% counts only the pruned weights.
    rows = layer_table(Tiny(), TINY_X[:1], masks=masks)
    assert [r.act_frac for r in rows] == [None, None, None]
    assert [r.flops_kept_frac for r in rows] == pytest.approx([4 / 6, 0.5, 0.25])


def test_table_totals():
    rows = layer_table(Tiny(), TINY_X[:1], masks={"fc1.weight": torch.tensor([[1, 1], [1, 0], [0, 0]])})
    t = totals(rows)
    assert t.weights == 6 + 12 + 4 and t.kept == 3 + 12 + 4
    assert t.kept_frac == pytest.approx(19 / 22)
    assert t.compression == pytest.approx(22 / 19)
    assert t.flops == 12 + 24 + 8
    assert t.flops_kept == pytest.approx(12 * 0.5 + 24 + 8)
    assert t.flops_kept_frac == pytest.approx(38 / 44)


def _pruned_lenet_rows():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    masks = {layer.param: torch.rand_like(layer.weight) > 0.9 for layer in find_layers(model)}
    return layer_table(model, torch.zeros(1, 1, 28, 28), masks=masks, activation_data=torch.randn(8, 1, 28, 28))


def test_markdown_table():
    rows = _pruned_lenet_rows()
    t = totals(rows)
    text = format_table(rows, markdown=True)
    lines = text.strip().splitlines()
    assert lines[0] == "| Layer | Weights | FLOP | Act% | Weights% | FLOP% | Kept |"
    assert len(lines) == 2 + len(rows) + 1
    assert lines[2].startswith("| fc1 | 235K | 470K | ")
    assert lines[-1].startswith("| Total | 266K | 532K | ")
    assert lines[-1].endswith(f"({t.compression:.1f}×) |")
    assert 9.0 < t.compression < 11.0


def test_csv_has_raw_numbers(tmp_path):
    rows = _pruned_lenet_rows()
    path = write_table_csv(rows, tmp_path / "sub" / "table.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["layer"] for r in read] == ["fc1", "fc2", "fc3"]
    assert read[0]["shape"] == "300x784" and int(read[0]["weights"]) == 235_200 and int(read[0]["flops"]) == 470_400
    assert [int(r["kept"]) for r in read] == [r.kept for r in rows]
    assert float(read[1]["flops_kept_frac"]) == pytest.approx(rows[1].flops_kept_frac)
    assert float(read[2]["act_frac"]) == 1.0


# ---------------------------------------------------------------- energy


def _row(name, weights, kept, flops, flops_kept_frac):
    return LayerRow(name, "fc", (weights,), weights, kept, flops, None, flops_kept_frac)


# 150 weights, 35 kept; 2400 dense FLOPs, 300 after pruning.
TINY_ROWS = [_row("a", 100, 10, 2000, 0.1), _row("b", 50, 25, 400, 0.25)]


def test_energy_by_hand():
    est = estimate_energy(TINY_ROWS, sram_bytes=1000)
    d, p = est.dense, est.pruned
    assert d.macs == 1200 and d.arithmetic_pj == pytest.approx(1200 * (0.9 + 3.7))
    assert d.weight_words == 150 and d.weight_bytes == 600 and d.in_sram
    assert d.memory_pj == pytest.approx(150 * 5.0)
    assert d.total_pj == pytest.approx(5520 + 750)
    assert p.macs == pytest.approx(150) and p.arithmetic_pj == pytest.approx(150 * 4.6)
    assert p.weight_words == pytest.approx(35 + 35 * 4 / 32)  # 4-bit indices, 8 to a word
    assert p.weight_bytes == pytest.approx(157.5) and p.in_sram
    assert p.memory_pj == pytest.approx(39.375 * 5.0)
    assert p.total_pj == pytest.approx(690 + 196.875)
    assert est.ratio == pytest.approx(6270 / 886.875)


def test_energy_sram_dram_switch():
    # 600 B dense does not fit 500 B; 157.5 B pruned does: pruning moves the weights on chip.
    est = estimate_energy(TINY_ROWS, sram_bytes=500)
    assert not est.dense.in_sram and est.pruned.in_sram
    assert est.dense.memory_pj == pytest.approx(150 * 640.0)
    assert est.pruned.memory_pj == pytest.approx(39.375 * 5.0)
    assert estimate_energy(TINY_ROWS, sram_bytes=600).dense.in_sram  # exactly full still fits
    tiny_sram = estimate_energy(TINY_ROWS, sram_bytes=100)
    assert not tiny_sram.pruned.in_sram and tiny_sram.pruned.memory_pj == pytest.approx(39.375 * 640.0)


def test_energy_options_and_description():
    no_index = estimate_energy(TINY_ROWS, sram_bytes=1000, index_bits=0)
    assert no_index.pruned.weight_words == 35
    costs = EnergyCosts(add_pj=1.0, mult_pj=2.0, sram_read_pj=3.0, dram_read_pj=4.0)
    est = estimate_energy(TINY_ROWS, sram_bytes=0, costs=costs, index_bits=8)
    assert est.dense.total_pj == pytest.approx(1200 * 3.0 + 150 * 4.0)
    assert est.pruned.total_pj == pytest.approx(150 * 3.0 + (35 + 35 * 8 / 32) * 4.0)
    text = est.describe()
    for needle in ("Horowitz", "DRAM read 4 pJ", "8-bit", "DRAM", f"{est.ratio:.1f}x"):
        assert needle in text
    with pytest.raises(ValueError, match="index_bits"):
        estimate_energy(TINY_ROWS, index_bits=-1)


# ---------------------------------------------------------------- plots


PNG = b"\x89PNG\r\n\x1a\n"



def test_weight_histogram_shows_all_weights_then_the_survivors(figures, tmp_path):
    torch.manual_seed(0)
    before = torch.randn(50, 40) * 0.05
    after = before * (before.abs() > 0.05)  # a third survive, none with |w| <= 0.05
    kept = int((after != 0).sum())
    fig = figures(plot_weight_histogram(before, after, "fc1", tmp_path / "figs" / "fc1.png", bins=30))
    assert (tmp_path / "figs" / "fc1.png").read_bytes()[:8] == PNG

    ax_before, ax_after = fig.axes
    assert ax_before.get_title() == "fc1: before pruning (2,000 weights)"
    assert ax_after.get_title() == f"fc1: after pruning + retraining ({kept:,} non-zero)"
    for ax in fig.axes:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("weight value", "count")
    assert ax_before.get_shared_x_axes().joined(ax_before, ax_after)
    # Each panel is one histogram of the given weights: 30 bars whose counts add up to the weights shown.
    heights = {ax: np.array([bar.get_height() for bar in ax.patches]) for ax in fig.axes}
    assert len(heights[ax_before]) == len(heights[ax_after]) == 30
    assert heights[ax_before].sum() == before.numel()
    assert heights[ax_after].sum() == kept
    assert np.array_equal(heights[ax_before], np.histogram(before.numpy().ravel(), bins=30)[0])
    # The second panel has the gap magnitude pruning cuts: no bar inside (-0.05, 0.05) counts anything.
    gap = [bar.get_height() for bar in ax_after.patches if -0.05 < bar.get_x() < bar.get_x() + bar.get_width() < 0.05]
    assert len(gap) >= 5 and set(gap) == {0}


def test_weight_histogram_with_no_survivors_says_so(figures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = figures(plot_weight_histogram(torch.randn(50, 40), torch.zeros(50, 40), "fc3"))
    ax_before, ax_after = fig.axes
    assert len(ax_before.patches) == 100 and len(ax_after.patches) == 0
    assert [t.get_text() for t in ax_after.texts] == ["no weights kept"]
    assert ax_after.get_title() == "fc3: after pruning + retraining (0 non-zero)"
    assert list(tmp_path.iterdir()) == []  # no path: nothing written


BITS_ROWS = [BitsRow("conv", b, acc, 99.1) for b, acc in [(2, 41.0), (4, 97.5), (8, 99.0)]] + [
    BitsRow("fc", b, acc, 99.1) for b, acc in [(2, 95.2), (4, 99.0), (8, 99.1)]
]


def test_bits_plot_draws_a_curve_per_group_from_the_rows(figures, tmp_path):
    fig = figures(plot_bits(BITS_ROWS, tmp_path / "bits.png"))
    assert (tmp_path / "bits.png").read_bytes()[:8] == PNG
    (ax,) = fig.axes
    assert ax.get_title() == "Accuracy against bits (no retraining)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("bits per weight index", "validation accuracy (%)")
    conv, fc, base = ax.lines
    assert [line.get_label() for line in ax.lines] == [
        "conv layers shared", "fully connected layers shared", "not shared"
    ]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.lines]
    for line, group in ((conv, "conv"), (fc, "fc")):
        rows = [r for r in BITS_ROWS if r.group == group]
        assert list(line.get_xdata()) == [r.bits for r in rows]
        assert list(line.get_ydata()) == [r.val_acc for r in rows]
    assert list(base.get_ydata()) == [99.1, 99.1] and base.get_linestyle() == "--"
    assert list(ax.get_xticks()) == [2, 4, 8]


def test_bits_plot_of_one_group_and_of_nothing(figures):
    fig = figures(plot_bits([r for r in BITS_ROWS if r.group == "fc"]))
    assert [line.get_label() for line in fig.axes[0].lines] == ["fully connected layers shared", "not shared"]
    with pytest.raises(ValueError, match="no rows"):
        plot_bits([])


def test_act_is_credited_in_the_order_the_forward_runs_the_layers():
    """A custom forward may run its layers in another order than it defines them."""

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)  # defined first, runs last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = Reordered()
    x = torch.randn(64, 4)
    with torch.no_grad():
        expected = float((torch.relu(model.body(x)) != 0).float().mean())
    fractions = activation_fractions(model, [x[:32], x[32:]])
    assert fractions["body"] == pytest.approx(expected)
    assert fractions["head"] == 1.0  # it gives the result
