"""Tests for prunet.analysis.tradeoff: the Figure 5 study on a tiny slice of Fashion-MNIST."""

from __future__ import annotations

import csv
import dataclasses

import pytest
from conftest import TINY_RECIPE

from prunet.analysis.tradeoff import (
    CSV_COLUMNS,
    CURVES,
    TradeoffRow,
    format_tradeoff_table,
    plot_tradeoff,
    prune_criterion,
    pruned_fraction,
    read_tradeoff_csv,
    tradeoff_study,
    train_dense,
    write_tradeoff_csv,
)
from prunet.config import recipe_from_dict
from prunet.data import Split
from prunet.models import create_model
from prunet import GlobalMagnitude, Pruner, Sparsity
from prunet.train import Normalization, evaluate

FRACTIONS = (0.5, 0.9)
L1 = 2e-5


@pytest.fixture(scope="module")
def tiny(request):
    """A one-epoch LeNet-300-100 recipe and 800 train / 300 val / 1000 test images."""
    fashion = request.getfixturevalue("fashion")
    recipe = recipe_from_dict({**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "train_subset": 800, "val_size": 300}})
    data = dataclasses.replace(
        fashion,
        train=Split(fashion.train.images[:800], fashion.train.labels[:800]),
        val=Split(fashion.val.images[:300], fashion.val.labels[:300]),
    )
    return recipe, data


@pytest.fixture(scope="module")
def study(tiny):
    recipe, data = tiny
    rows = tradeoff_study(recipe, fractions=FRACTIONS, retrain_epochs=1, dense_epochs=1, l1_strength=L1,
                          data=data, progress=False, log=lambda _: None)
    return recipe, data, rows


def test_every_curve_at_every_fraction(study):
    _, _, rows = study
    for curve in CURVES[:-1]:
        got = sorted(r.target_fraction for r in rows if r.curve == curve)
        assert got == list(FRACTIONS), curve
    (oneshot,) = [r for r in rows if r.curve == "oneshot_equal_epochs"]
    assert oneshot.target_fraction == max(FRACTIONS)
    assert len(rows) == 5 * len(FRACTIONS) + 1


def test_measured_fraction_matches_request(study):
    _, _, rows = study
    for r in rows:
        assert abs(r.fraction_pruned - r.target_fraction) < 0.01, r


def test_epochs_and_regularizers(study):
    _, _, rows = study
    for r in rows:
        assert r.regularizer == ("l1" if r.curve.startswith("l1") else "l2")
        if r.curve.endswith("noretrain"):
            assert r.epochs_used == 0
        elif r.curve.endswith("retrain"):
            assert r.epochs_used == 1
    ladder = sorted((r for r in rows if r.curve == "l2_iterative"), key=lambda r: r.target_fraction)
    assert [r.epochs_used for r in ladder] == [1, 2]
    (oneshot,) = [r for r in rows if r.curve == "oneshot_equal_epochs"]
    assert oneshot.epochs_used == ladder[-1].epochs_used  # equal cost, the point of the comparison


def test_losses_are_relative_to_the_matching_dense_model(study):
    _, _, rows = study
    for reg in ("l1", "l2"):
        dense = {(r.dense_val_acc, r.dense_test_acc) for r in rows if r.regularizer == reg}
        assert len(dense) == 1
    for r in rows:
        assert r.val_loss_pts == pytest.approx(r.dense_val_acc - r.val_acc)
        assert r.test_loss_pts == pytest.approx(r.dense_test_acc - r.test_acc)


def test_first_ladder_step_is_the_one_shot_point(study):
    # Same dense model, same pruning, same seed: the ladder's first step is the L2 one-shot point.
    _, _, rows = study
    at = {(r.curve, r.target_fraction): r for r in rows}
    first = min(FRACTIONS)
    assert at[("l2_iterative", first)].val_acc == at[("l2_retrain", first)].val_acc


def test_noretrain_accuracy_is_recomputable(study):
    recipe, data, rows = study
    norm = Normalization(data.mean, data.std)
    for reg, strength in (("l1", L1), ("l2", recipe.train.reg_strength)):
        dense = train_dense(recipe, data, reg, strength, epochs=1, log=lambda _: None)
        assert {r.dense_val_acc for r in rows if r.regularizer == reg} == {dense.val_acc}
        for p in FRACTIONS:
            model = create_model(recipe.model.name)
            model.load_state_dict(dense.state)
            pruner = Pruner(model)
            pruner.prune(Sparsity(p))
            _, acc = evaluate(model, data.val, norm)
            (row,) = [r for r in rows if r.curve == f"{reg}_noretrain" and r.target_fraction == p]
            assert acc == row.val_acc
            assert pruned_fraction(pruner) == row.fraction_pruned


def test_csv_round_trip_and_plot(study, tmp_path):
    _, _, rows = study
    path = write_tradeoff_csv(rows, tmp_path / "t" / "tradeoff.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        records = list(reader)
    assert {r["curve"] for r in records} == set(CURVES)
    back = read_tradeoff_csv(path)
    assert back == rows
    assert float(records[0]["val_loss_pts"]) == pytest.approx(rows[0].val_loss_pts)

    fig = plot_tradeoff(back, tmp_path / "t" / "tradeoff.png", "tiny")
    assert (tmp_path / "t" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_all, ax_zoom = fig.axes
    assert fig.get_suptitle() == "tiny"
    legend = {"l1_noretrain": "L1 regularization w/o retrain", "l2_noretrain": "L2 regularization w/o retrain",
              "l1_retrain": "L1 regularization w/ retrain", "l2_retrain": "L2 regularization w/ retrain",
              "l2_iterative": "L2 w/ iterative prune and retrain"}  # the paper's Figure 5 legend
    by_label = {line.get_label(): line for line in ax_all.get_lines()}
    for curve in CURVES[:-1]:  # every curve but the one-shot star has a line, its y the loss in points, down is worse
        line = by_label[legend[curve]]
        pts = sorted((r for r in rows if r.curve == curve), key=lambda r: r.fraction_pruned)
        assert list(line.get_xdata()) == pytest.approx([100 * r.fraction_pruned for r in pts])
        assert list(line.get_ydata()) == pytest.approx([-r.val_loss_pts for r in pts])
    zoomed = {line.get_label() for line in ax_zoom.get_lines()}
    assert legend["l1_noretrain"] not in zoomed and legend["l2_retrain"] in zoomed
    stars = [line for line in ax_all.get_lines() if line.get_marker() == "*"]
    assert len(stars) == sum(r.curve == "oneshot_equal_epochs" for r in rows)

    table = format_tradeoff_table(rows)
    assert table.count("\n| ") == len(FRACTIONS)  # one line per fraction after the header
    assert "One-shot L2" in table and "iterative ladder" in table


def test_read_rejects_other_tables(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("layer,kind\nfc1,fc\n")
    with pytest.raises(ValueError, match="not a tradeoff table"):
        read_tradeoff_csv(path)


def test_bad_arguments_fail_before_training(tiny):
    recipe, data = tiny
    kw = dict(data=data, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="fractions"):
        tradeoff_study(recipe, fractions=(0.5, 1.0), **kw)
    with pytest.raises(ValueError, match="fractions"):
        tradeoff_study(recipe, fractions=(), **kw)
    with pytest.raises(ValueError, match="retrain_epochs"):
        tradeoff_study(recipe, retrain_epochs=0, **kw)
    with pytest.raises(ValueError, match="criterion"):
        tradeoff_study(recipe, criterion="threshold", **kw)
    with pytest.raises(ValueError, match="l1_strength"):
        tradeoff_study(recipe, l1_strength=-1.0, **kw)


def test_prune_criterion():
    assert prune_criterion("sparsity", 0.9) == Sparsity(0.9)
    assert prune_criterion("global", 0.9) == GlobalMagnitude(0.9)


def test_row_losses_and_dict():
    r = TradeoffRow("net", "l2_retrain", "l2", 0.9, 0.9, 88.0, 87.5, 89.0, 88.0, 2)
    assert r.val_loss_pts == pytest.approx(1.0)
    assert r.test_loss_pts == pytest.approx(0.5)
    assert list(r.to_dict()) == CSV_COLUMNS


def test_table_cells():
    rows = [
        TradeoffRow("net", "l2_retrain", "l2", 0.5, 0.5, 88.0, 87.0, 89.0, 88.0, 1),
        TradeoffRow("net", "l2_iterative", "l2", 0.5, 0.5, 88.5, 87.5, 89.0, 88.0, 1),
        TradeoffRow("net", "oneshot_equal_epochs", "l2", 0.5, 0.5, 88.25, 87.0, 89.0, 88.0, 1),
    ]
    table = format_tradeoff_table(rows, metric="test")
    assert "| 50.0% | 1.00 (87.00) | 0.50 (87.50) |" in table
    assert format_tradeoff_table([]) == ""
    with pytest.raises(ValueError, match="metric"):
        format_tradeoff_table(rows, metric="train")
