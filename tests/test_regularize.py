"""Regularisers and the paper's dropout adjustment (eq. 2), checked against autograd and by hand."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunet.models import create_model
from prunet.regularize import (
    DropoutAdjuster,
    adjusted_dropout,
    decayed_parameters,
    dropout_feeds,
    l1_penalty,
    l2_penalty,
    set_dropout,
)


def weights(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 5, generator=g)
    a[0, :2] = 0.0  # the subgradient at 0 is 0
    return [a.requires_grad_(), torch.randn(3, 2, 2, generator=g).requires_grad_()]


# --- penalties --------------------------------------------------------------------------------


def test_l1_value_and_gradient():
    ws = weights()
    penalty = l1_penalty(ws, 0.01)
    assert penalty.item() == pytest.approx(0.01 * sum(w.abs().sum().item() for w in ws))
    penalty.backward()
    for w in ws:
        assert torch.equal(w.grad, 0.01 * torch.sign(w.detach()))
    assert bool((ws[0].grad[0, :2] == 0).all())


def test_l2_value_and_gradient():
    ws = weights()
    penalty = l2_penalty(ws, 0.01)
    assert penalty.item() == pytest.approx(0.5 * 0.01 * sum(w.pow(2).sum().item() for w in ws))
    penalty.backward()
    for w in ws:
        torch.testing.assert_close(w.grad, 0.01 * w.detach(), rtol=1e-6, atol=0)


def test_l2_penalty_step_equals_sgd_weight_decay():
    torch.manual_seed(0)
    a = nn.Linear(5, 3, bias=False)
    b = copy.deepcopy(a)
    start = a.weight.detach().clone()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, weight_decay=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        opt_a.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        (F.cross_entropy(b(x), y) + l2_penalty(b.parameters(), 0.05)).backward()
        opt_b.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a.weight.detach(), start)  # it did train


def test_decayed_parameters_are_trainable_weights_only():
    model = create_model("lenet_300_100")
    model.fc2.weight.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decayed_parameters(model)] == ["fc1.weight", "fc3.weight"]


# --- dropout adjustment -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "original, kept, dense, expected",
    [(0.5, 25, 100, 0.25), (0.5, 100, 100, 0.5), (0.5, 0, 100, 0.0), (0.4, 1, 4, 0.2), (0.3, 9, 16, 0.225)],
)
def test_adjusted_dropout_by_hand(original, kept, dense, expected):
    assert adjusted_dropout(original, kept, dense) == pytest.approx(expected)


@pytest.mark.parametrize("kept, dense", [(5, 0), (-1, 10), (11, 10), (0, -3)])
def test_adjusted_dropout_errors(kept, dense):
    with pytest.raises(ValueError, match=r"kept .* dense"):
        adjusted_dropout(0.5, kept, dense)


def test_dropout_feeds_alexnet():
    with torch.device("meta"):
        model = create_model("alexnet")
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert dropout_feeds(model, layers) == {"drop6": "fc7", "drop7": "fc8"}


def test_dropout_feeds_lenet_with_and_without_dropout():
    assert dropout_feeds(create_model("lenet_300_100", dropout=0.5), ["fc1", "fc2", "fc3"]) == {
        "drop1": "fc2",
        "drop2": "fc3",
    }
    assert dropout_feeds(create_model("lenet_300_100"), ["fc1", "fc2", "fc3"]) == {}


def test_dropout_feeding_an_unpruned_layer_is_not_mapped():
    with torch.device("meta"):
        model = create_model("alexnet")
    # fc7 is not pruned: drop6 feeds fc7 and must not be scaled by fc8's pruning.
    assert dropout_feeds(model, ["fc6", "fc8"]) == {"drop7": "fc8"}


def test_set_dropout_changes_the_modules():
    model = create_model("lenet_300_100", dropout=0.5)
    feeds = dropout_feeds(model, ["fc1", "fc2", "fc3"])
    used = set_dropout(
        model,
        original={"drop1": 0.5, "drop2": 0.5},
        feeds=feeds,
        kept={"fc1": 1000, "fc2": 7500, "fc3": 1000},
        dense={"fc1": 235200, "fc2": 30000, "fc3": 1000},
    )
    assert used == {"drop1": pytest.approx(0.25), "drop2": 0.5}
    assert model.drop1.p == pytest.approx(0.25) and model.drop2.p == 0.5


def test_set_dropout_uses_the_original_ratio_every_round():
    """Each round scales the dense ratio, not the previous round's (no compounding)."""
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4), drop=nn.Dropout(0.5), fc2=nn.Linear(4, 2)))
    feeds = {"drop": "fc2"}
    for kept in (4, 2, 2):
        set_dropout(model, {"drop": 0.5}, feeds, {"fc2": kept}, {"fc2": 8})
    assert model.drop.p == pytest.approx(0.5 * math.sqrt(2 / 8))


def test_dropout_adjuster_always_scales_the_original_ratio():
    """An iterative ladder adjusts the same model again and again: D_o stays the dense ratio."""
    with torch.device("meta"):  # shapes and dropout modules only: no 60M weights to initialise
        model = create_model("alexnet", dropout=0.5)
    adjuster = DropoutAdjuster(model, ["fc6", "fc7", "fc8"])
    dense = {"fc7": 16_777_216, "fc8": 4_096_000}
    adjuster.adjust({"fc7": dense["fc7"] // 4, "fc8": dense["fc8"]}, dense)
    used = adjuster.adjust({"fc7": dense["fc7"] // 4, "fc8": dense["fc8"] // 16}, dense)
    assert used == {"drop6": pytest.approx(0.25), "drop7": pytest.approx(0.125)}
    assert (model.drop6.p, model.drop7.p) == (pytest.approx(0.25), pytest.approx(0.125))
    adjuster.restore()
    assert (model.drop6.p, model.drop7.p) == (0.5, 0.5)
