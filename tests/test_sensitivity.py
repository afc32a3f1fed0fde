"""Tests for prunet.analysis.sensitivity: the per-layer sweep of Figure 6, proposals, CSV, plot."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunet.analysis.sensitivity as sens
from prunet import Pruner, Threshold
from prunet.analysis.sensitivity import (
    SensitivityRow,
    format_sensitivity_table,
    plot_sensitivity,
    propose_qualities,
    read_sensitivity_csv,
    sensitivity,
    write_sensitivity_csv,
)
from prunet.data import Split, batches
from prunet.train import Normalization

NORM = Normalization(0.5, 0.5)
QUALITIES = (0.0, 0.5, 1.0, 1.5, 2.0)


def _synthetic(n: int, seed: int) -> Split:
    """Four classes, each a bright 10x10 quadrant on noise: separable, so a tiny net learns it."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for k, (r, c) in enumerate([(2, 2), (2, 16), (16, 2), (16, 16)]):
        images[labels == k, r : r + 10, c : c + 10] = 220
    return Split(images, labels)


def _model() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 5)),  # 28 -> 24
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(4)),  # 24 -> 6
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4 * 6 * 6, 16)),
        ("relu2", nn.ReLU()),
        ("fc2", nn.Linear(16, 4)),
    ]))  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, Split]:
    """A small conv net trained to high accuracy on the synthetic task, and its validation split."""
    torch.manual_seed(0)
    model, train, val = _model(), _synthetic(512, 0), _synthetic(256, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        for x, y in batches(train, 64, shuffle=True, generator=torch.Generator().manual_seed(0), mean=0.5, std=0.5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model, val


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


# ------------------------------------------------------------------ the sweep


def test_table_has_one_row_per_layer_and_setting(trained):
    model, val = trained
    rows = sensitivity(model, val, NORM, qualities=QUALITIES, progress=False)
    assert len(rows) == 3 * len(QUALITIES)
    assert [r.layer for r in rows] == [n for n in ("conv1", "fc1", "fc2") for _ in QUALITIES]
    assert [r.setting for r in rows[: len(QUALITIES)]] == list(QUALITIES)
    assert {r.layer: r.kind for r in rows} == {"conv1": "conv", "fc1": "fc", "fc2": "fc"}
    assert all(r.criterion == "threshold" for r in rows)
    base = rows[0].base_acc
    assert base > 90  # the fixture really learned the task, so drops mean something
    for r in rows:
        assert r.acc_drop == pytest.approx(base - r.val_acc)
        assert r.pruned_frac == pytest.approx(1 - r.kept_frac)
        if r.setting == 0:  # quality 0 prunes nothing
            assert r.kept_frac == 1.0 and r.acc_drop == 0.0


def test_default_settings_and_unsorted_input(trained):
    model, val = trained
    rows = sensitivity(model, val, NORM, layers=["fc2"], progress=False)
    assert [r.setting for r in rows] == list(Threshold.sweep)
    rows = sensitivity(model, val, NORM, qualities=[1.0, 0.0, 0.5], layers=["fc2"], progress=False)
    assert [r.setting for r in rows] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("criterion", ["threshold", "sparsity"])
def test_pruning_grows_with_the_setting(trained, criterion):
    model, val = trained
    settings = QUALITIES if criterion == "threshold" else (0.0, 0.3, 0.6, 0.9)
    rows = sensitivity(model, val, NORM, qualities=settings, criterion=criterion, progress=False)
    for layer in ("conv1", "fc1", "fc2"):
        kept = [r.kept_frac for r in rows if r.layer == layer]
        assert all(a >= b for a, b in zip(kept, kept[1:])), (layer, kept)
        assert kept[-1] < kept[0]
    if criterion == "sparsity":
        for r in rows:
            assert r.kept_frac == pytest.approx(1 - r.setting, abs=0.01)
    # Pruning nearly everything of the last layer must cost accuracy: the sweep really prunes.
    assert max(r.acc_drop for r in rows if r.layer == "fc2") > 10


def test_model_restored_bit_exactly(trained):
    model, val = trained
    model = copy.deepcopy(model)
    model.train()  # the mode must survive evaluation too
    before = _state(model)
    params = [id(p) for p in model.parameters()]
    sensitivity(model, val, NORM, qualities=QUALITIES, progress=False)
    _assert_same_state(model, before)
    assert [id(p) for p in model.parameters()] == params
    assert all(m.training for m in model.modules())


def test_model_restored_when_evaluation_fails(trained, monkeypatch):
    model, val = trained
    model = copy.deepcopy(model)
    before = _state(model)
    calls = {"n": 0}
    real = sens.evaluate

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-sweep, with a layer pruned
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sens, "evaluate", failing)
    with pytest.raises(KeyboardInterrupt):
        sensitivity(model, val, NORM, qualities=QUALITIES, progress=False)
    _assert_same_state(model, before)


def test_premasked_model_keeps_its_masks_and_prunes_from_survivors(trained):
    model, val = trained
    model = copy.deepcopy(model)
    pruner = Pruner(model)
    pruner.prune(Threshold(0.8))
    current = {s.layer: s.kept_frac for s in pruner.summary()}
    assert all(f < 1 for f in current.values())
    before = _state(model)
    mask_objects = {k: id(v) for k, v in pruner.masks.items()}

    rows = sensitivity(model, val, NORM, qualities=QUALITIES, progress=False)
    _assert_same_state(model, before)  # weights and *_mask buffers
    assert {k: id(v) for k, v in pruner.masks.items()} == mask_objects
    for r in rows:
        # Setting 0 leaves the current survivors; more only removes from them.
        assert r.kept_frac <= current[r.layer] + 1e-12
        if r.setting == 0:
            assert r.kept_frac == pytest.approx(current[r.layer]) and r.acc_drop == 0
    # The masks are still enforced by the pruner after the sweep.
    pruner.enforce()
    _assert_same_state(model, before)


def test_layer_selection(trained):
    model, val = trained
    rows = sensitivity(model, val, NORM, qualities=(0.0, 1.0), layers=["fc"], progress=False)
    assert sorted({r.layer for r in rows}) == ["fc1", "fc2"]
    rows = sensitivity(model, val, NORM, qualities=(1.0,), layers="conv*", progress=False)
    assert [r.layer for r in rows] == ["conv1"]
    with pytest.raises(ValueError, match="fc9"):
        sensitivity(model, val, NORM, layers=["fc9"], progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"criterion": "global"}, "criterion"),
        ({"qualities": [-0.5]}, "quality"),
        ({"qualities": [float("nan")]}, "quality"),
        ({"criterion": "sparsity", "qualities": [1.5]}, "sparsity"),
        ({"qualities": []}, "at least one"),
    ],
)
def test_bad_arguments(trained, kwargs, message):
    model, val = trained
    with pytest.raises(ValueError, match=message):
        sensitivity(model, val, NORM, progress=False, **kwargs)


# ------------------------------------------------------------------ proposals, files, plot


def _row(layer: str, setting: float, drop: float, kind: str = "fc", criterion: str = "threshold") -> SensitivityRow:
    return SensitivityRow(layer, kind, criterion, setting, max(0.0, 1 - setting / 2), 90.0 - drop, drop)


HAND_ROWS = [
    # conv1 is sensitive: only a light cut stays within half a point.
    _row("conv1", 0.0, 0.0, "conv"), _row("conv1", 0.5, 0.3, "conv"), _row("conv1", 1.0, 2.0, "conv"),
    # fc1: 1.5 recovers after 1.0 failed: noise, not a safe choice.
    _row("fc1", 0.0, 0.0), _row("fc1", 0.5, -0.1), _row("fc1", 1.0, 0.8), _row("fc1", 1.5, 0.2),
    # fc2: robust everywhere; rows given out of order.
    _row("fc2", 1.5, 0.4), _row("fc2", 0.0, 0.0), _row("fc2", 1.0, 0.1),
    # fc3: even the lightest setting costs too much: left unpruned.
    _row("fc3", 0.5, 3.0), _row("fc3", 1.0, 5.0),
]  # fmt: skip


def test_propose_qualities_on_hand_rows():
    assert propose_qualities(HAND_ROWS, 0.5) == {"conv1": 0.5, "fc1": 0.5, "fc2": 1.5}
    assert propose_qualities(HAND_ROWS, 1.0) == {"conv1": 0.5, "fc1": 1.5, "fc2": 1.5}
    assert propose_qualities(HAND_ROWS, 0.0) == {"conv1": 0.0, "fc1": 0.5, "fc2": 0.0}
    assert propose_qualities([], 1.0) == {}
    assert list(propose_qualities(HAND_ROWS, 10.0)) == ["conv1", "fc1", "fc2", "fc3"]


def test_propose_qualities_refuses_mixed_criteria():
    with pytest.raises(ValueError, match="criteria"):
        propose_qualities([_row("fc1", 0.5, 0.0), _row("fc1", 0.5, 0.0, criterion="sparsity")], 1.0)


def test_propose_feeds_the_pruner(trained):
    model, val = trained
    model = copy.deepcopy(model)
    rows = sensitivity(model, val, NORM, qualities=QUALITIES, progress=False)
    proposal = propose_qualities(rows, max_drop=1.0)
    pruner = Pruner(model)
    pruner.prune(Threshold(proposal))
    kept = {s.layer: s.kept_frac for s in pruner.summary()}
    for r in rows:
        if proposal.get(r.layer) == r.setting:
            assert kept[r.layer] == pytest.approx(r.kept_frac)  # the same cut the sweep measured


def test_csv_round_trip(tmp_path):
    path = write_sensitivity_csv(HAND_ROWS, tmp_path / "sub" / "sensitivity.csv")
    header = path.read_text().splitlines()[0]
    assert header == ",".join(sens.CSV_COLUMNS)
    assert read_sensitivity_csv(path) == HAND_ROWS


def test_read_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,kind\nfc1,fc\n")
    with pytest.raises(ValueError, match="not a sensitivity table"):
        read_sensitivity_csv(bad)
    bad.write_text(",".join(sens.CSV_COLUMNS) + "\nfc1,fc,threshold,x,1,0,90,0\n")
    with pytest.raises(ValueError, match="line 2"):
        read_sensitivity_csv(bad)
    with pytest.raises(FileNotFoundError):
        read_sensitivity_csv(tmp_path / "none.csv")


def test_format_table():
    text = format_sensitivity_table(HAND_ROWS)
    lines = text.strip().splitlines()
    assert lines[0] == "| Layer | unpruned | q=0 | q=0.5 | q=1 | q=1.5 |"
    assert len(lines) == 2 + 4
    assert "| fc2 | 90.00 | 90.00 (0%) |  | 89.90 (50%) | 89.60 (75%) |" in lines
    assert format_sensitivity_table([]) == ""



def test_plot_has_a_panel_per_kind_and_a_curve_per_layer(figures, tmp_path):
    fig = figures(plot_sensitivity(HAND_ROWS, tmp_path / "figs" / "sensitivity.png"))
    assert (tmp_path / "figs" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conv, fc = fig.axes
    assert conv.get_title() == "convolutional layers: pruned alone, no retraining"
    assert fc.get_title() == "fully connected layers: pruned alone, no retraining"
    assert conv.get_ylabel() == "validation accuracy (%)" and fc.get_ylabel() == ""  # the y axis is shared
    assert conv.get_shared_y_axes().joined(conv, fc)
    for ax, layers in ((conv, ["conv1"]), (fc, ["fc1", "fc2", "fc3"])):
        assert ax.get_xlabel() == "parameters pruned away (% of the layer)" and ax.get_xlim() == (0, 100)
        assert [line.get_label() for line in ax.lines] == layers + ["unpruned"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == layers + ["unpruned"]
        *curves, unpruned = ax.lines
        for line, layer in zip(curves, layers):
            # The table's numbers, settings ascending (fc2's rows come out of order).
            rows = sorted((r for r in HAND_ROWS if r.layer == layer), key=lambda r: r.setting)
            assert list(line.get_xdata()) == pytest.approx([100 * r.pruned_frac for r in rows])
            assert list(line.get_ydata()) == [r.val_acc for r in rows]
        assert list(unpruned.get_ydata()) == [90.0, 90.0] and unpruned.get_linestyle() == "--"


def test_plot_of_one_kind_has_one_panel(figures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = figures(plot_sensitivity([r for r in HAND_ROWS if r.kind == "fc"]))
    (ax,) = fig.axes
    assert ax.get_title().startswith("fully connected layers")
    assert [line.get_label() for line in ax.lines] == ["fc1", "fc2", "fc3", "unpruned"]
    assert list(tmp_path.iterdir()) == []  # no path: nothing written
    with pytest.raises(ValueError, match="no rows"):
        plot_sensitivity([])
