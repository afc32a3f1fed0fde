"""The model registry: exact parameter counts (the paper's tables), shapes, layer names, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from prunet.analysis.tables import layer_table
from prunet.layers import totals
from prunet.models import (
    PAPER_KEPT,
    PAPER_TOTALS,
    create_model,
    get_model_info,
    list_models,
    paper_sparsity,
    register_model,
)
from prunet.pruner import Pruner

# name -> (parameters, default outputs, prunable layers in order)
EXPECTED = {
    "lenet_300_100": (266_610, 10, ["fc1", "fc2", "fc3"]),
    "lenet_5": (431_080, 10, ["conv1", "conv2", "fc1", "fc2"]),
    "alexnet": (60_965_224, 1000, ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]),
    "vgg16": (
        138_357_544,
        1000,
        [f"conv{b}_{i}" for b, n in enumerate([2, 2, 3, 3, 3], start=1) for i in range(1, n + 1)] + ["fc6", "fc7", "fc8"],
    ),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_exactly_the_four_models_sorted():
    assert list_models() == sorted(EXPECTED)


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_and_output_shape(name):
    params, classes, _ = EXPECTED[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert n_params(model) == params
    x = torch.randn(2 if name.startswith("lenet") else 1, *get_model_info(name).input_shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (len(x), classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_num_classes(name):
    params, classes, _ = EXPECTED[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(name, num_classes=7)
        out = model(torch.empty(3, *get_model_info(name).input_shape))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert out.shape == (3, 7)
    assert n_params(model) == params - (classes - 7) * (last.in_features + 1)


@pytest.mark.parametrize("name", list_models())
def test_layer_names_follow_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    assert [t.layer for t in Pruner(model).targets] == EXPECTED[name][2]


@pytest.mark.parametrize("name", list_models())
def test_description_states_the_true_parameter_count(name):
    info = get_model_info(name)
    assert info.name == name
    assert f"({EXPECTED[name][0]:,} parameters)" in info.description


@pytest.mark.parametrize("name, dropouts", [("alexnet", 2), ("vgg16", 2), ("lenet_300_100", 0), ("lenet_5", 0)])
def test_dropout_argument(name, dropouts):
    with torch.device("meta"):
        model = create_model(name)
        custom = create_model(name, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == dropouts
    assert all(m.p == 0.3 for m in custom.modules() if isinstance(m, nn.Dropout))
    assert sum(isinstance(m, nn.Dropout) for m in custom.modules()) >= 1


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*alexnet, lenet_300_100, lenet_5, vgg16"):
        create_model("resnet")


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("lenet_5", (1, 28, 28), "again")(lambda: nn.Linear(1, 1))
    assert list_models() == sorted(EXPECTED)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        create_model("lenet_5", width=3)


# --- the paper's per-layer rates (Tables 4 and 5) -------------------------------------------------


@pytest.mark.parametrize("name", ["alexnet", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_the_papers_per_layer_rates_keep_the_papers_totals(name):
    torch.manual_seed(0)
    model = create_model(name)
    pruner = Pruner(model)
    pruner.prune(paper_sparsity(name))
    rows = layer_table(model, torch.zeros(1, *get_model_info(name).input_shape), pruner.masks)
    weights, kept = PAPER_TOTALS[name]
    total = totals(rows)
    # The paper's percentages are rounded to whole percent, its totals to 0.1M.
    assert total.weights == pytest.approx(weights, rel=0.03)
    assert total.kept == pytest.approx(kept, rel=0.03)
    assert {r.layer for r in rows} == set(PAPER_KEPT[name])
    for r in rows:
        assert r.kept_frac == pytest.approx(PAPER_KEPT[name][r.layer], abs=1 / r.weights + 1e-9)
        assert r.flops > 0 and r.flops_kept_frac == pytest.approx(r.kept_frac)  # dense activations assumed
    # Most of the FLOPs are in the convolutions, which the paper prunes far less than fc6/fc7:
    # the FLOPs left are a larger fraction than the weights left.
    flops_left = sum(r.flops * r.flops_kept_frac for r in rows) / sum(r.flops for r in rows)
    assert flops_left > total.kept / total.weights


def test_paper_rates_exist_only_for_the_papers_tables():
    with pytest.raises(ValueError, match="per-layer rates for alexnet, vgg16"):
        paper_sparsity("lenet_5")
