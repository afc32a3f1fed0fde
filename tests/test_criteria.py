"""Pruning criteria on hand-made tensors: thresholds computed by hand, ties, counts, conversions."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

from prunet import Pruner
from prunet.config import RECOMMENDED, ConfigError, recipe_from_dict, recommended_method
from prunet.criteria import (
    ERK,
    LAMP,
    TargetError,
    TargetThreshold,
    CRITERIA,
    Criterion,
    GlobalMagnitude,
    Sparsity,
    Threshold,
    compression_to_keep_fraction,
    criteria_names,
    erk_densities,
    global_sparsity_masks,
    keep_count,
    lamp_scores,
    make_criterion,
    sparsity_mask,
    threshold_mask,
)
from prunet.models import create_model


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def b(*values) -> torch.Tensor:
    return torch.tensor([bool(v) for v in values])


# --- threshold_mask: keep |w| >= quality * std(survivors) -------------------------------------


@pytest.mark.parametrize("quality", [0.25, 0.5, 0.8, 1.0, 1.5])
def test_threshold_by_hand(quality):
    values = [0.1, -2.0, 0.5, 3.0, -0.7, 1.2, 0.0, -0.05]
    std = statistics.pstdev(values)  # population std, over all (all survive)
    expected = [abs(v) >= quality * std for v in values]
    assert threshold_mask(t(*values), None, quality).tolist() == expected


def test_threshold_docstring_example():
    # std = 1.776, threshold 0.888 at quality 0.5
    assert threshold_mask(t(0.1, -2.0, 0.5, 3.0), None, 0.5).tolist() == [False, True, False, True]


def test_threshold_uses_population_std():
    # Population std is exactly 1 (sample std would be 1.069 and prune the 2s too).
    w = t(2, -2, 0, 0, 0, 0, 0, 0)
    assert threshold_mask(w, None, 2.0).tolist() == [True, True] + [False] * 6


def test_weight_exactly_at_threshold_is_kept():
    w = t(2, -2, 0, 0, 0, 0, 0, 0)  # std 1, threshold 2: the 2s sit exactly on it
    assert threshold_mask(w, None, 2.0)[:2].tolist() == [True, True]
    w = t(1, -1, 1, -1)  # std 1: every weight is on the threshold
    assert threshold_mask(w, None, 1.0).all()


def test_quality_zero_prunes_nothing():
    w = torch.randn(50, generator=torch.Generator().manual_seed(0))
    w[::7] = 0.0  # zero-valued survivors stay survivors too
    assert threshold_mask(w, None, 0.0).all()
    prev = torch.arange(50) % 3 != 0
    assert torch.equal(threshold_mask(w, prev, 0.0), prev)


def test_huge_quality_prunes_the_whole_layer_then_leaves_it():
    """Documented behaviour: nothing stops a threshold from emptying a layer."""
    w = torch.randn(20, generator=torch.Generator().manual_seed(0))
    emptied = threshold_mask(w, None, 1e6)
    assert not emptied.any()
    assert not threshold_mask(w, emptied, 0.5).any()  # an empty layer stays empty


def test_layer_with_fewer_than_two_survivors_is_left_alone():
    w = t(5.0, 0.1, 0.2)
    one = b(1, 0, 0)
    assert threshold_mask(w, one, 100.0).tolist() == [True, False, False]


def test_layer_left_whole_when_all_weights_are_large():
    w = t(1, -1, 1, -1, 1.1, -0.9)
    assert threshold_mask(w, None, 0.5).all()


def test_std_over_survivors_only_and_result_within_prev():
    w = t(10.0, 0.1, 1.0, -1.0, 1.0, -1.0)
    prev = b(0, 1, 1, 1, 1, 1)  # the 10 is already pruned
    survivors = [0.1, 1.0, -1.0, 1.0, -1.0]
    std = statistics.pstdev(survivors)  # 0.82; over all six it would be 3.9 and prune the 1s
    expected = [False] + [abs(v) >= std for v in survivors]
    mask = threshold_mask(w, prev, 1.0)
    assert mask.tolist() == expected == [False, False, True, True, True, True]
    assert not (mask & ~prev).any()


def test_threshold_never_revives_a_pruned_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    prev = torch.rand(8, 8, generator=g) > 0.5
    w[~prev] = 100.0  # large weights behind a zero mask stay pruned
    mask = threshold_mask(w, prev, 0.3)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert not (mask & ~prev).any()


def test_threshold_accepts_a_float_prev_mask():
    w = t(10.0, 0.1, 1.0, -1.0, 1.0, -1.0)
    assert torch.equal(threshold_mask(w, t(0, 1, 1, 1, 1, 1), 1.0), threshold_mask(w, b(0, 1, 1, 1, 1, 1), 1.0))


@pytest.mark.parametrize("quality", [-0.1, math.nan, math.inf])
def test_threshold_bad_quality(quality):
    with pytest.raises(ValueError, match="quality"):
        threshold_mask(t(1, 2, 3), None, quality)


def test_prev_mask_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        threshold_mask(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool), 1.0)


# --- sparsity_mask ----------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity, kept", [(0.0, 10), (0.3, 7), (0.5, 5), (0.9, 1), (1.0, 0)])
def test_sparsity_exact_counts_keep_the_largest(sparsity, kept):
    w = t(-1, 2, -3, 4, -5, 6, -7, 8, -9, 10)
    mask = sparsity_mask(w, None, sparsity)
    assert int(mask.sum()) == kept
    assert mask.tolist() == [i >= 10 - kept for i in range(10)]


def test_sparsity_ties_broken_by_position():
    assert sparsity_mask(torch.ones(6), None, 0.5).tolist() == [True, True, True, False, False, False]
    w = t(1, 2, 1, 2, 1, 2)
    assert sparsity_mask(w, None, 1 / 3).tolist() == [True, True, False, True, False, True]
    assert torch.equal(sparsity_mask(w, None, 1 / 3), sparsity_mask(w.clone(), None, 1 / 3))


def test_sparsity_counts_already_pruned_weights():
    w = t(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    prev = b(1, 1, 1, 1, 1, 1, 1, 1, 0, 0)  # the two largest are gone
    mask = sparsity_mask(w, prev, 0.5)
    assert mask.tolist() == [False, False, False, True, True, True, True, True, False, False]


def test_sparsity_layer_already_sparser_is_untouched():
    w = t(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    prev = b(1, 0, 0, 0, 0, 0, 0, 0, 0, 1)  # 80% pruned already
    assert torch.equal(sparsity_mask(w, prev, 0.5), prev)


def test_sparsity_keeps_shape():
    w = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mask = sparsity_mask(w, None, 0.75)
    assert mask.shape == w.shape and int(mask.sum()) == 12
    assert w.abs()[mask].min() >= w.abs()[~mask].max()


# --- global_sparsity_masks --------------------------------------------------------------------


def test_global_cut_across_layers_of_different_scales():
    small = torch.linspace(0.01, 0.1, 10)
    large = torch.linspace(1.0, 10.0, 10).view(2, 5)
    masks = global_sparsity_masks({"small": small, "large": large}, {}, 0.5)
    assert not masks["small"].any()
    assert masks["large"].all() and masks["large"].shape == (2, 5)


def test_global_cut_counts_and_respects_prev():
    a = t(1, 2, 3, 4)
    c = t(5, 6, 7, 8)
    prev = {"a": b(1, 1, 1, 1), "c": b(1, 1, 1, 0)}  # 8 already pruned
    masks = global_sparsity_masks({"a": a, "c": c}, prev, 0.5)
    assert masks["a"].tolist() == [False, False, False, True]
    assert masks["c"].tolist() == [True, True, True, False]


def test_global_cut_prev_none_and_missing_mean_all():
    a, c = t(1, 2), t(3, 4)
    masks = global_sparsity_masks({"a": a, "c": c}, {"a": None}, 0.5)
    assert masks["a"].tolist() == [False, False] and masks["c"].tolist() == [True, True]


# --- keep_count -------------------------------------------------------------------------------


def test_keep_count_exhaustive_small():
    grid = [i / 20 for i in range(21)]
    for n in range(0, 25):
        previous = n
        for s in grid:
            k = keep_count(n, s)
            assert 0 <= k <= n
            assert abs((n - k) - s * n) <= 0.5  # rounded to nearest
            assert k <= previous  # more sparsity never keeps more
            previous = k
        assert keep_count(n, 0.0) == n and keep_count(n, 1.0) == 0


@pytest.mark.parametrize("n, sparsity, kept", [(10, 0.25, 8), (10, 0.3, 7), (3, 0.5, 1), (1, 0.4, 1), (1, 0.6, 0)])
def test_keep_count_values(n, sparsity, kept):
    assert keep_count(n, sparsity) == kept


@pytest.mark.parametrize("sparsity", [-0.01, 1.01, math.nan])
def test_keep_count_rejects_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(10, sparsity)


# --- compression_to_keep_fraction -------------------------------------------------------------


@pytest.mark.parametrize(
    "compression, prunable, unprunable, fraction",
    [
        (1, 100, 0, 1.0),
        (2, 100, 0, 0.5),
        (10, 100, 0, 0.1),
        (2, 90, 10, (50 - 10) / 90),
        (4, 100, 20, (30 - 20) / 100),
        (6, 100, 20, 0.0),  # the unprunable 20 are exactly the budget
        (1.5, 1, 0, 1 / 1.5),
    ],
)
def test_compression_to_keep_fraction(compression, prunable, unprunable, fraction):
    got = compression_to_keep_fraction(compression, prunable, unprunable)
    assert got == pytest.approx(fraction)
    kept = got * prunable + unprunable
    assert (prunable + unprunable) / kept == pytest.approx(compression)


def test_compression_exhaustive_round_trip():
    for prunable in (1, 7, 100):
        for unprunable in (0, 1, 5):
            reachable = (prunable + unprunable) / unprunable if unprunable else math.inf
            for compression in (1, 1.1, 2, 3, 7.5, 50):
                if compression > reachable:
                    with pytest.raises(ValueError, match="out of reach"):
                        compression_to_keep_fraction(compression, prunable, unprunable)
                    continue
                f = compression_to_keep_fraction(compression, prunable, unprunable)
                assert 0.0 <= f <= 1.0
                total = prunable + unprunable
                assert total / (f * prunable + unprunable) == pytest.approx(compression)


@pytest.mark.parametrize(
    "args, match",
    [((0.5, 100, 0), "compression must be >= 1"), ((2, 0, 10), "no prunable"), ((10, 10, 10), "out of reach")],
)
def test_compression_errors(args, match):
    with pytest.raises(ValueError, match=match):
        compression_to_keep_fraction(*args)


def test_compression_out_of_reach_names_the_maximum():
    with pytest.raises(ValueError, match=r"2\.00x at most"):
        compression_to_keep_fraction(3, 10, 10)


# --- the registry ---------------------------------------------------------------------------


@dataclass
class AbsoluteFloor(Criterion):
    """A criterion a user might add: prune ``|w| < floor`` (an absolute, not a relative, threshold)."""

    quality: float
    name: ClassVar[str] = "floor"
    setting_field: ClassVar[str] = "quality"
    setting_max: ClassVar[float | None] = 1.0
    rule = staticmethod(lambda w, prev, floor: prev.bool() & (w.abs() >= floor))


def test_recipe_names_build_the_registered_criteria():
    rounds = recipe_from_dict({"prune": {"rounds": [
        {"criterion": "threshold", "quality": {"fc": 1.0}},
        {"criterion": "sparsity", "sparsity": 0.5},
        {"criterion": "global", "sparsity": 0.9},
    ]}}).prune.rounds  # fmt: skip
    assert [r.make_criterion() for r in rounds] == [Threshold({"fc": 1.0}), Sparsity(0.5), GlobalMagnitude(0.9)]
    assert make_criterion("sparsity", {"fc1": 0.2}) == Sparsity({"fc1": 0.2})
    with pytest.raises(ValueError, match="'magic' is not one of threshold, sparsity, global"):
        make_criterion("magic", 0.5)


def test_a_new_criterion_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(CRITERIA, AbsoluteFloor.name, AbsoluteFloor)
    rnd = recipe_from_dict({"prune": {"rounds": [{"criterion": "floor", "quality": 0.05}]}}).prune.rounds[0]
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    expected = {layer.param: int((layer.weight.abs() >= 0.05).sum()) for layer in Pruner(model).targets}
    rows = Pruner(model).prune(rnd.make_criterion())
    assert {r.layer + ".weight": r.kept for r in rows.values()} == expected
    # Its range is checked like the built-in ones', naming the field.
    message = r"prune\.rounds\[0\]\.quality: 2\.0 is out of range; allowed in \[0\.0, 1\.0\]"
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"prune": {"rounds": [{"criterion": "floor", "quality": 2.0}]}})


def test_check_value_names_the_setting_and_range():
    Threshold.check_value(3.0)
    with pytest.raises(ValueError, match=r"a quality must be a finite number >= 0, got -1"):
        Threshold.check_value(-1)
    with pytest.raises(ValueError, match=r"a sparsity must be in \[0, 1\], got 1\.5"):
        Sparsity.check_value(1.5)


# --- selection instead of sorting, and target compression -------------------------------------


def sorted_keep_top(scores: torch.Tensor, prev: torch.Tensor, keep: int) -> torch.Tensor:
    """The reference the selection must equal: a stable sort, pruned entries last, the first ``keep`` kept."""
    flat, p = scores.abs().flatten().double(), prev.flatten()
    if int(p.sum()) <= keep:
        return prev.clone()
    order = torch.sort(torch.where(p, flat, torch.tensor(-1.0, dtype=torch.float64)), descending=True,
                       stable=True).indices
    out = torch.zeros_like(p)
    out[order[:keep]] = True
    return out.view_as(prev)


@pytest.mark.parametrize("values", ["gaussian", "few distinct", "one value"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_sparsity_by_selection_equals_the_sorted_cut_ties_included(values, sparsity):
    g = torch.Generator().manual_seed(3)
    w = {"gaussian": torch.randn(300, 70, generator=g),
         "few distinct": torch.randint(-3, 4, (300, 70), generator=g).float() / 7,
         "one value": torch.full((300, 70), 0.25)}[values]
    prev = torch.rand(300, 70, generator=g) > 0.2
    got = sparsity_mask(w, prev, sparsity)
    assert torch.equal(got, sorted_keep_top(w, prev, keep_count(w.numel(), sparsity)))


def test_global_cut_by_selection_equals_the_sorted_cut_of_the_concatenation():
    g = torch.Generator().manual_seed(4)
    weights = {"a": torch.randint(-5, 6, (64, 40), generator=g).float(), "b": torch.randn(2000, generator=g) * 3}
    prev = {"a": torch.rand(64, 40, generator=g) > 0.5, "b": None}
    got = global_sparsity_masks(weights, prev, 0.8)
    flat = torch.cat([weights["a"].flatten(), weights["b"]])
    flat_prev = torch.cat([prev["a"].flatten(), torch.ones(2000, dtype=torch.bool)])
    want = sorted_keep_top(flat, flat_prev, keep_count(flat.numel(), 0.8))
    assert torch.equal(torch.cat([got["a"].flatten(), got["b"]]), want)


def test_threshold_compares_as_float64_would_for_float32_and_float16_weights():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float16, torch.float64):
        w = torch.randn(500, 30, generator=g).to(dtype)
        prev = torch.rand(500, 30, generator=g) > 0.3
        got = threshold_mask(w, prev, 0.8)
        survivors = w.double()[prev]
        expected = prev & (w.double().abs() >= 0.8 * survivors.std(correction=0))
        assert torch.equal(got, expected), dtype


def kept_of(pruner: Pruner) -> int:
    return sum(r.kept for r in pruner.summary())


@pytest.mark.parametrize("relative", [1.0, {"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}])
def test_a_ladder_of_targets_lands_within_one_percent_each_round(relative):
    torch.manual_seed(0)
    pruner = Pruner(create_model("lenet_300_100"))
    total = sum(r.weights for r in pruner.summary())
    for target in (2.0, 5.0, 12.0, 25.0, 50.0, 120.0):
        criterion = TargetThreshold(target, relative)
        pruner.prune(criterion)
        assert total / kept_of(pruner) == pytest.approx(target, rel=0.01)
        # The paper's rule, one factor times the relative qualities.
        if isinstance(relative, dict):
            assert criterion.qualities["fc3"] == pytest.approx(0.5 * criterion.qualities["fc1"])


def test_a_target_counts_the_layers_not_pruned_this_round():
    torch.manual_seed(1)
    pruner = Pruner(create_model("lenet_5"))
    total = sum(r.weights for r in pruner.summary())
    pruner.prune(TargetThreshold(3.0), layers=["fc"])
    fc_kept = {r.layer: r.kept for r in pruner.summary() if r.kind == "fc"}
    pruner.prune(TargetThreshold(3.3), layers=["conv"])  # the fc layers' survivors count, as they stand
    assert total / kept_of(pruner) == pytest.approx(3.3, rel=0.01)
    assert {r.layer: r.kept for r in pruner.summary() if r.kind == "fc"} == fc_kept


def test_a_target_already_reached_prunes_nothing():
    torch.manual_seed(2)
    pruner = Pruner(create_model("lenet_300_100"))
    pruner.prune(TargetThreshold(8.0))
    before = kept_of(pruner)
    criterion = TargetThreshold(4.0)
    pruner.prune(criterion)
    assert kept_of(pruner) == before and criterion.factor == 0.0


@pytest.mark.parametrize("name, target", [("alexnet", 9.0), pytest.param("vgg16", 13.0, marks=pytest.mark.slow)])
def test_target_on_random_paper_networks_within_one_percent(name, target):
    torch.manual_seed(0)
    pruner = Pruner(create_model(name))
    total = sum(r.weights for r in pruner.summary())
    pruner.prune(TargetThreshold(target))
    assert total / kept_of(pruner) == pytest.approx(target, rel=0.01)


def test_target_rejects_a_compression_below_one():
    with pytest.raises(ValueError, match="target must be a compression >= 1"):
        TargetThreshold(0.5)


def test_recipe_rounds_with_targets_and_their_errors():
    base = {"model": {"name": "lenet_300_100"}}
    ok = recipe_from_dict({**base, "prune": {"rounds": [{"target": 8}, {"criterion": "global", "target": 20}]}})
    first, second = (r.make_criterion() for r in ok.prune.rounds)
    assert isinstance(first, TargetThreshold) and first.target == 8
    assert isinstance(second, GlobalMagnitude) and second.sparsity == pytest.approx(0.95)
    for rnd, match in [({"criterion": "sparsity", "target": 8}, "target: works with criterion threshold or global"),
                       ({"target": 0.5}, "target"),
                       ({"criterion": "global", "sparsity": 0.9, "target": 8}, "not both")]:
        with pytest.raises(ConfigError, match=match):
            recipe_from_dict({**base, "prune": {"rounds": [rnd]}})


def test_target_ladder_multiplies_about_evenly_and_ends_on_the_target():
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"},
                               "prune": {"rounds": [{"quality": {"fc": 1.0, "fc3": 0.5}, "epochs": 3}]}})
    ladder = recipe.target_ladder(40)
    targets = [r.target for r in ladder.prune.rounds]
    assert targets[-1] == 40 and len(targets) == 5
    steps = [b / a for a, b in zip([1.0] + targets, targets)]
    assert max(steps) / min(steps) == pytest.approx(1.0, abs=0.01)
    assert all(r.epochs == 3 and r.quality == {"fc": 1.0, "fc3": 0.5} for r in ladder.prune.rounds)
    with pytest.raises(ConfigError, match="--target"):
        recipe.target_ladder(0.9)


def test_an_unreachable_target_is_an_error_not_an_empty_layer():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 1000))
    pruner = Pruner(model)
    with pytest.raises(TargetError, match="target 5x is out of reach.*keep 10,000 of 10,100, at most 1.01x"):
        pruner.prune(TargetThreshold(5.0), layers=["0"])
    assert [r.kept for r in pruner.summary()] == [100, 10_000]  # nothing changed


def test_float64_weights_are_ranked_in_float64():
    w = torch.tensor([1 + 1e-12, 1 + 2e-12, 0.5], dtype=torch.float64)
    assert sparsity_mask(w, None, 2 / 3).tolist() == [False, True, False]
    w = torch.tensor([1 - 1e-12, 1 - 2e-12, 0.5], dtype=torch.float64)
    assert sparsity_mask(w, None, 2 / 3).tolist() == [True, False, False]


def test_nan_weights_cannot_be_ranked():
    with pytest.raises(ValueError, match="NaN or inf"):
        global_sparsity_masks({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(4)}, {}, 0.5)


def test_target_ladder_takes_sensitivity_qualities_and_replaces_a_gradual_phase():
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"},
                               "prune": {"relative_from_sensitivity": 1.0, "gradual": {"target": 10}}})
    ladder = recipe.target_ladder(20)
    assert ladder.prune.gradual is None and all(r.quality is None for r in ladder.prune.rounds)
    sensitive = recipe_from_dict({"model": {"name": "lenet_300_100"},
                                  "prune": {"relative_from_sensitivity": 1.0, "rounds": [{"quality": 0.5}]}})
    assert all(r.quality is None for r in sensitive.target_ladder(20).prune.rounds)


# --- allocation across layers: LAMP and ERK -----------------------------------------------------


def lamp_by_hand(values: list[float], alive: list[bool]) -> list[float]:
    """The published formula, written out: rank survivors by |w| (ties by position), score w_u² / Σ_{v>=u} w_v²."""
    ranked = sorted((abs(v), i) for i, (v, a) in enumerate(zip(values, alive)) if a)
    scores = [0.0] * len(values)
    for k, (mag, i) in enumerate(ranked):
        scores[i] = mag ** 2 / sum(m ** 2 for m, _ in ranked[k:])
    return scores


def test_lamp_scores_equal_the_published_formula():
    values = [0.5, -3.0, 1.0, 2.0, -0.25, 1.0, 0.0, 4.0]
    alive = [True, True, True, False, True, True, True, True]
    scores = lamp_scores(torch.tensor(values).view(2, 4), torch.tensor(alive).view(2, 4))
    assert scores.shape == (2, 4) and scores.dtype == torch.float64
    assert scores.flatten().tolist() == pytest.approx(lamp_by_hand(values, alive), rel=1e-12)
    # By hand for three of them: 4² / 4² = 1 (the largest), 3² / (3² + 4²), 0.5² / (0.5² + 1 + 1 + 9 + 16).
    assert scores.flatten()[[7, 1, 0]].tolist() == pytest.approx([1.0, 9 / 25, 0.25 / 27.25])
    assert scores[0, 3] == 0  # pruned: no score, and not in anyone's sum


def test_lamp_is_a_global_cut_on_scores_and_never_revives():
    weights = {"a.weight": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "b.weight": torch.tensor([[10.0, 20.0, 30.0, 40.0]])}
    prev = {"a.weight": torch.tensor([[True, True, True, False]]), "b.weight": None}
    masks = LAMP(0.5).allocate(weights, {n: p if p is not None else torch.ones(1, 4, dtype=torch.bool)
                                         for n, p in prev.items()}, 4)
    scores = {n: lamp_scores(w, prev[n]) for n, w in weights.items()}
    cut = sorted(torch.cat([s.flatten() for s in scores.values()]).tolist())[-4]
    for n in weights:
        assert masks[n].tolist() == (scores[n] >= cut).tolist()
    assert not masks["a.weight"][0, 3]
    assert sum(int(m.sum()) for m in masks.values()) == 4


def test_lamp_keeps_every_layer_where_global_magnitude_empties_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 10))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # a layer of small weights: a global magnitude cut removes it all
    rows = Pruner(model).prune(LAMP(0.9))
    assert all(r.kept > 0 for r in rows.values())
    assert sum(r.kept for r in rows.values()) == keep_count(50 * 40 + 40 * 10, 0.9)


def test_erk_densities_equal_the_formula_on_hand_made_shapes():
    shapes = {"fc1": (300, 784), "fc2": (100, 300), "conv": (20, 1, 5, 5)}
    keep = 40_000
    d = erk_densities(shapes, keep)
    raw = {"fc1": (300 + 784) / (300 * 784), "fc2": 400 / 30000, "conv": (20 + 1 + 5 + 5) / (20 * 25)}
    # One ε for all three would give conv 1.64: it is held dense, and fc1 and fc2 share what is left.
    assert keep / sum(raw[n] * math.prod(s) for n, s in shapes.items()) * raw["conv"] > 1
    assert d["conv"] == 1.0
    eps = (keep - 500) / (raw["fc1"] * 300 * 784 + raw["fc2"] * 30000)
    assert d["fc1"] == pytest.approx(eps * raw["fc1"]) and d["fc2"] == pytest.approx(eps * raw["fc2"])
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(keep)


def test_erk_hits_the_global_sparsity_exactly_and_respects_previous_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Flatten(), nn.Linear(6 * 6 * 6, 64), nn.Linear(64, 10))
    pruner = Pruner(model)
    pruner.prune(Sparsity({"3": 0.95}))  # the last layer already sparser than ERK would make it
    before = {n: m.clone().bool() for n, m in pruner.masks.items()}
    total = sum(t.weight.numel() for t in pruner.targets)
    rows = pruner.prune(ERK(0.8))
    assert sum(r.kept for r in rows.values()) == keep_count(total, 0.8)
    assert rows["3"].kept == int(before["3.weight"].sum())  # held at what it has, never revived
    assert rows["0"].kept == 54  # the small conv: ERK keeps it whole
    for n, m in pruner.masks.items():
        assert not (m.bool() & ~before[n]).any()


def test_lamp_and_erk_at_a_target_compression_count_the_layers_they_do_not_prune():
    for cls in (LAMP, ERK):
        torch.manual_seed(0)
        pruner = Pruner(create_model("lenet_300_100"))
        pruner.prune(cls(target=4))
        assert pruner.compression() == pytest.approx(4, rel=1e-4)
        pruner.prune(cls(target=10), layers=["fc1", "fc2"])  # fc3 stays as it is and still counts
        assert pruner.compression() == pytest.approx(10, rel=1e-4)


def test_lamp_and_erk_are_registered_recipe_criteria_with_checked_settings():
    rounds = recipe_from_dict({"prune": {"rounds": [{"criterion": "lamp", "sparsity": 0.9},
                                                    {"criterion": "erk", "sparsity": 0.95}]}}).prune.rounds
    assert [r.make_criterion() for r in rounds] == [LAMP(0.9), ERK(0.95)]
    assert {"lamp", "erk"} <= set(criteria_names(setting="sparsity", per_layer=False))
    with pytest.raises(ConfigError, match=r"prune\.rounds\[0\]\.sparsity: criterion 'lamp' takes one number"):
        recipe_from_dict({"prune": {"rounds": [{"criterion": "lamp", "sparsity": {"fc1": 0.9}}]}})
    with pytest.raises(ValueError, match="give a sparsity or a target"):
        LAMP()
    with pytest.raises(ValueError, match=r"a sparsity must be in \[0, 1\], got 1\.5"):
        ERK(1.5)
    with pytest.raises(ValueError, match="target must be a compression >= 1"):
        ERK(target=0.5)


@pytest.mark.parametrize("name", ["lamp", "erk"])
def test_a_recipe_round_drives_lamp_and_erk_to_a_target_compression(name):
    """A round's target: was refused for lamp/erk ('works with criterion threshold or global')."""
    torch.manual_seed(0)
    rounds = recipe_from_dict({"prune": {"rounds": [{"criterion": name, "target": 8, "prune": ["fc1", "fc2"]}]}})
    pruner = Pruner(create_model("lenet_300_100"))
    pruner.prune(rounds.prune.rounds[0].make_criterion(), layers=["fc1", "fc2"])
    assert pruner.compression() == pytest.approx(8, rel=0.01)  # fc3, left alone, counted as it stands
    assert pruner.summary()[2].kept == 1000


def test_target_method_gives_gradual_and_acdc_the_ladders_epochs():
    recipe = recipe_from_dict({"prune": {"rounds": [{"criterion": "threshold", "quality": 1.0, "epochs": 3}]}})
    ladder = recipe.target_method(100, "paper")
    epochs = sum(r.epochs for r in ladder.prune.rounds)
    gradual = recipe.target_method(100, "gradual").prune
    acdc = recipe.target_method(100, "acdc").prune
    assert not gradual.rounds and gradual.gradual.epochs == epochs and gradual.gradual.criterion == "erk"
    assert gradual.gradual.target == 100 and acdc.acdc.target == 100 and acdc.acdc.epochs == epochs
    with pytest.raises(ConfigError, match="--method: one of paper, gradual, acdc"):
        recipe.target_method(100, "movement")
    short = recipe_from_dict({"prune": {"rounds": [{"criterion": "threshold", "quality": 1.0, "epochs": 1}]}})
    assert short.target_method(8, "acdc").prune.acdc.epochs == 3  # the smallest budget with a whole pair
    with pytest.raises(ConfigError, match="--method acdc: the ladder to 4x spends 2 epochs"):
        short.target_method(4, "acdc")
    with pytest.raises(ConfigError, match="--method gradual: the ladder to 8x spends 0 epochs"):
        recipe_from_dict({"prune": {"rounds": [{"quality": 1.0, "epochs": 0}]}}).target_method(8, "gradual")
    assert recipe.target_method(100, "acdc").dense_only().prune.acdc is None  # prunet train: dense alone


def test_target_without_a_method_takes_the_recommended_one_for_that_compression():
    recipe = recipe_from_dict({"prune": {"rounds": [{"criterion": "threshold", "quality": 1.0, "epochs": 3}]}})
    for method, start in RECOMMENDED:
        chosen = recipe.target_method(start * 1.5).prune
        assert chosen == recipe.target_method(start * 1.5, method).prune
    first_switch = RECOMMENDED[1][1]
    assert recipe.target_method(first_switch * 0.99).prune.rounds  # below: the ladder
    assert not recipe.target_method(first_switch).prune.rounds  # from it: one phase
    assert recipe.target_method(4).prune == recipe.target_ladder(4).prune  # the paper's recipes' range
    one_shot = recipe_from_dict({"prune": {"rounds": [{"quality": 1.0, "epochs": 0}]}})
    assert one_shot.target_method(first_switch).prune.rounds  # rounds without retraining: the ladder, not an error
    with pytest.raises(ConfigError, match="--target: a compression >= 1"):
        recommended_method(float("nan"))
