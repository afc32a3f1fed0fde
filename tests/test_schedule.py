"""Schedules in the user's own loop: the paper's ladder and gradual magnitude pruning, step by step."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REAL_FASHION, TINY_RECIPE

import prunet.phases as phases
from prunet import Pruner
from prunet.config import ConfigError, recipe_from_dict
from prunet.criteria import keep_count
from prunet.models import create_model
from prunet.pipeline import resume, run
from prunet.schedule import PruningSchedule, allocation, cubic_sparsity, lr_at
from prunet.train import DivergedError


def test_cubic_sparsity_at_each_step_is_zhu_and_guptas_formula():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 40, 10, 7
    for t in range(0, 150):
        if t <= t0:
            expected = s_i
        elif t >= t0 + n * dt:
            expected = s_f
        else:
            expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, s_i, s_f, t0, t0 + n * dt) == pytest.approx(expected, abs=1e-12), t
    # It rises fast, then slowly: more than half the way in the first quarter of the ramp.
    assert cubic_sparsity(t0 + 18, s_i, s_f, t0, t0 + 70) > (s_i + s_f) / 2


def user_loop(model, schedule, optimizer, steps, seed=0):
    """A plain training loop on random data; the schedule is called once per step, before the forward pass."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(steps, 8, 1, 28, 28, generator=g), torch.randint(0, 10, (steps, 8), generator=g)
    seen = []
    for i in range(steps):
        fired = schedule.step(optimizer)
        seen.append((i, [e.label for e in fired], optimizer.param_groups[0]["lr"]))
        loss = F.cross_entropy(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return seen


def test_gradual_schedule_in_a_user_loop_follows_the_cubic_curve():
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"}, "train": {"epochs": 1, "lr": 0.1},
                               "prune": {"lr_fraction": 0.5, "lr_schedule": "constant",
                                         "gradual": {"final_sparsity": 0.9, "epochs": 4, "prune_epochs": 3,
                                                     "every_steps": 3}}})
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = PruningSchedule.from_recipe(recipe, pruner, steps_per_epoch=10, lr=True)
    assert schedule.total_steps == 50 and schedule.epochs == 5
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        fired = schedule.step(optimizer)
        # Dense epoch at the recipe's lr, then the gradual phase at half of it.
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 if step < 10 else 0.05)
        expected_updates = step >= 10 and ((step - 10) % 3 == 0 or step == 40) and step <= 40
        assert bool(fired) == expected_updates, step
        if fired:
            s = cubic_sparsity(step, 0.0, 0.9, 10, 40)
            for row in pruner.summary():
                assert row.kept == keep_count(row.weights, s), (step, row.layer)
        loss = F.cross_entropy(model(torch.randn(8, 1, 28, 28, generator=g)), torch.randint(0, 10, (8,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, mask in pruner.masks.items():
            assert not bool((dict(model.named_parameters())[name][mask == 0] != 0).any())
    assert [r.kept for r in pruner.summary()] == [keep_count(r.weights, 0.9) for r in pruner.summary()]


def test_the_papers_ladder_in_a_user_loop_prunes_at_each_round_and_sets_its_lr():
    recipe = recipe_from_dict({
        "model": {"name": "lenet_300_100"}, "train": {"epochs": 2, "lr": 0.1, "lr_schedule": "constant"},
        "prune": {"lr_fraction": 0.1, "lr_schedule": "cosine",
                  "rounds": [{"quality": 1.0, "epochs": 2}, {"target": 20, "epochs": 3}]}})
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = PruningSchedule.from_recipe(recipe, pruner, steps_per_epoch=4, lr=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = user_loop(model, schedule, optimizer, schedule.total_steps)
    assert [(i, labels) for i, labels, _ in seen if labels] == [(8, ["round 1"]), (16, ["round 2"])]
    lrs = [lr for _, _, lr in seen]
    assert lrs[:8] == [0.1] * 8
    assert lrs[8:16] == [pytest.approx(lr_at(e, 2, 0.01, "cosine")) for e in (0, 0, 0, 0, 1, 1, 1, 1)]
    assert lrs[16] == pytest.approx(0.01) and lrs[-1] == pytest.approx(lr_at(2, 3, 0.01, "cosine"))
    assert pruner.compression() == pytest.approx(20, rel=0.01)


def test_the_users_optimizer_and_lr_scheduler_keep_their_learning_rate():
    """AdamW at 1e-3 under CosineAnnealingLR: the schedule prunes on time and never sets the rate."""
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"}, "train": {"epochs": 1, "lr": 0.05},
                               "prune": {"rounds": [{"quality": 1.0, "epochs": 2}]}})
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = PruningSchedule.from_recipe(recipe, pruner, steps_per_epoch=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.total_steps)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3),
                                                           T_max=schedule.total_steps)
    fired = []
    for step in range(schedule.total_steps):
        fired += [(step, e.label) for e in schedule.step(optimizer)]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0]), step
        optimizer.step()
        cosine.step()
        reference.optimizer.step()
        reference.step()
    assert fired == [(4, "round 1")] and pruner.compression() > 1


def test_a_schedule_resumes_from_its_state_dict():
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"}, "train": {"epochs": 1},
                               "prune": {"gradual": {"target": 10, "epochs": 2, "every_steps": 2}}})
    torch.manual_seed(0)
    a = Pruner(create_model("lenet_300_100"))
    whole = PruningSchedule.from_recipe(recipe, a, steps_per_epoch=5)
    for _ in range(whole.total_steps):
        whole.step()
    torch.manual_seed(0)
    b = Pruner(create_model("lenet_300_100"))
    first = PruningSchedule.from_recipe(recipe, b, steps_per_epoch=5)
    for _ in range(9):
        first.step()
    again = PruningSchedule.from_recipe(recipe, b, steps_per_epoch=5)
    again.load_state_dict(first.state_dict())
    while again.steps < again.total_steps:
        again.step()
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("gradual, match", [
    ({"epochs": 2}, "final_sparsity or target"),
    ({"final_sparsity": 0.9, "target": 10}, "final_sparsity or target"),
    ({"final_sparsity": 0.9, "initial_sparsity": 0.95}, "initial_sparsity"),
    ({"target": 10, "epochs": 4, "prune_epochs": 5}, "prune_epochs"),
    ({"target": 10, "criterion": "threshold"}, "criterion"),
    ({"target": 10, "phase": 2}, r"prune.gradual.phase: unknown field"),
    ({"target": 10, "every_steps": 1.5}, r"prune.gradual.every_steps: expected an integer"),
    ({"target": float("nan")}, r"prune.gradual.target: expected a number"),
    ({"target": "10x"}, r"prune.gradual.target: expected a number"),
    ([1, 2], r"prune.gradual: expected a mapping, got a list"),
])
def test_gradual_recipe_errors_name_the_field(gradual, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict({"prune": {"gradual": gradual}})
    with pytest.raises(ConfigError, match="one of rounds, gradual and acdc"):
        recipe_from_dict({"prune": {"gradual": {"target": 10}, "rounds": [{"quality": 1.0}]}})


GRADUAL = copy.deepcopy(TINY_RECIPE)
GRADUAL["threads"] = 1
GRADUAL["prune"] = {"lr_fraction": 0.1, "gradual": {"target": 12, "epochs": 3, "prune_epochs": 2, "every_steps": 5}}


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.slow
def test_a_gradual_run_lands_on_its_target_and_resumes_to_the_same_bits(fast_data, tmp_path, monkeypatch):
    whole = run(recipe_from_dict(copy.deepcopy(GRADUAL)), run_dir=tmp_path / "whole", log=lambda line: None)
    assert whole["compression"] == pytest.approx(12, rel=0.01)
    assert whole["rounds"][0]["criterion"] == "gradual sparsity"

    assert_resumes_to_the_same_bits(GRADUAL, whole, tmp_path, monkeypatch, dies_at=6)  # after its first epoch


def assert_resumes_to_the_same_bits(recipe: dict, whole: dict, tmp_path, monkeypatch, dies_at: int) -> None:
    """A run of ``recipe`` killed while saving its ``dies_at``-th resume point (3 for the dense phase, then one an
    epoch), resumed, ends as ``whole`` (the uninterrupted run in ``tmp_path / "whole"``) did: the same weights kept
    and the same last line of ``metrics.jsonl``."""
    real, calls = torch.save, {"n": 0}

    def dying(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == dies_at:
            raise KeyboardInterrupt
        return real(obj, f, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", dying)
        with pytest.raises(KeyboardInterrupt):
            run(recipe_from_dict(copy.deepcopy(recipe)), run_dir=tmp_path / "stopped", log=lambda line: None)
    resumed = resume(tmp_path / "stopped", log=lambda line: None)
    assert resumed["weights_kept"] == whole["weights_kept"]
    a = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[-1])
    b = json.loads((tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_a_gradual_phase_that_diverges_keeps_the_dense_model(fast_data, tmp_path):
    recipe = copy.deepcopy(GRADUAL)
    recipe["prune"]["lr_fraction"] = 1e5  # the loss becomes NaN within the phase
    summary = run(recipe_from_dict(recipe), run_dir=tmp_path / "nan", log=lambda line: None)
    assert "training loss became" in summary["stopped"] and summary["rounds"][0]["accepted"] is False
    assert summary["weights_kept"] == summary["weights"]  # the dense model, kept
    assert summary["final"]["val_acc"] == summary["dense"]["val_acc"]


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_a_gradual_phase_that_diverges_runs_again_from_its_start_at_half_the_rate(fast_data, tmp_path, monkeypatch):
    real, calls = phases.fit, []

    def diverging_once(model, train, val, cfg, norm, options):
        if options.phase != "gradual":
            return real(model, train, val, cfg, norm, options)
        masks = [m.clone() for n, m in model.named_buffers() if n.endswith("_mask")]
        calls.append({"lr": cfg.lr, "weights": [p.detach().clone() for p in model.parameters()],
                      "kept": sum(int(m.sum()) for m in masks)})
        if len(calls) == 1:  # half-way through a blow-up: weights NaN, masks cut
            real(model, train, val, dataclasses.replace(cfg, epochs=1), norm, options)
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            raise DivergedError("train.lr: the training loss became nan in gradual epoch 1")
        return real(model, train, val, cfg, norm, options)

    monkeypatch.setattr(phases, "fit", diverging_once)
    lines = []
    summary = run(recipe_from_dict(copy.deepcopy(GRADUAL)), run_dir=tmp_path / "again", log=lines.append)
    assert [c["lr"] for c in calls] == [pytest.approx(GRADUAL["train"]["lr"] * 0.1),
                                        pytest.approx(GRADUAL["train"]["lr"] * 0.05)]
    # The second try starts where the first did: the dense weights (not the NaN), the same masks.
    assert all(torch.equal(a, b) for a, b in zip(calls[0]["weights"], calls[1]["weights"]))
    assert calls[0]["kept"] == calls[1]["kept"]
    assert summary["stopped"] is None and summary["rounds"][0]["accepted"]
    assert summary["compression"] == pytest.approx(12, rel=0.01)
    assert summary["rounds"][0]["lr"] == pytest.approx(calls[1]["lr"])
    assert any("the phase again from its start at 0.5 of the rate" in line for line in lines)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_a_run_stopped_in_the_retry_of_a_diverged_phase_resumes_it_at_the_lower_rate(fast_data, tmp_path, monkeypatch):
    real, rates = phases.fit, []

    def diverges_then_stops(model, train, val, cfg, norm, options):
        if options.phase != "gradual":
            return real(model, train, val, cfg, norm, options)
        rates.append(cfg.lr)
        if len(rates) == 1:
            raise DivergedError("train.lr: the training loss became nan in gradual epoch 1")
        raise KeyboardInterrupt  # Ctrl-C before the retry's first epoch ends

    with monkeypatch.context() as mp:
        mp.setattr(phases, "fit", diverges_then_stops)
        with pytest.raises(KeyboardInterrupt):
            run(recipe_from_dict(copy.deepcopy(GRADUAL)), run_dir=tmp_path / "stopped", log=lambda line: None)
    recorded = []
    monkeypatch.setattr(phases, "fit", lambda *a: recorded.append(a[3].lr) or real(*a))
    summary = resume(tmp_path / "stopped", log=lambda line: None)
    assert rates == [pytest.approx(0.005), pytest.approx(0.0025)]
    assert recorded == [pytest.approx(0.0025)]  # the retry's rate, not the one that diverged
    assert summary["rounds"][0]["lr"] == pytest.approx(0.0025) and summary["rounds"][0]["accepted"]
    events = [json.loads(line)["event"] for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("retry") == 1


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_a_round_whose_target_is_out_of_reach_stops_the_ladder_there(fast_data, tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["prune"]["rounds"] = [{"target": 3, "epochs": 0}, {"target": 40, "prune": ["fc3"], "epochs": 0}]
    summary = run(recipe_from_dict(recipe), run_dir=tmp_path / "far", log=lambda line: None)
    assert "round 2: target 40x is out of reach" in summary["stopped"]
    assert summary["compression"] == pytest.approx(3, rel=0.01)  # round 1's model


def test_gradual_and_ladder_schedules_without_a_recipe_reach_their_target_in_a_users_loop():
    for make, target in ((lambda p: PruningSchedule.gradual(p, target=10, start=2, end=12, every=3), 10),
                         (lambda p: PruningSchedule.ladder(p, target=8, steps_per_round=4), 8)):
        torch.manual_seed(0)
        model = create_model("lenet_300_100")
        pruner = Pruner(model)
        schedule = make(pruner)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        user_loop(model, schedule, optimizer, schedule.total_steps)
        assert optimizer.param_groups[0]["lr"] == 1e-3  # untouched
        assert pruner.compression() == pytest.approx(target, rel=0.02)
        for name, mask in pruner.masks.items():
            assert not bool((dict(model.named_parameters())[name][mask == 0] != 0).any())
    with pytest.raises(ValueError, match="target: a compression >= 1"):
        PruningSchedule.gradual(Pruner(create_model("lenet_300_100")), target=0.5, start=0, end=10)


@pytest.mark.parametrize("gradual, steps_per_epoch", [
    ({"target": 10, "epochs": 2, "prune_epochs": 2, "every_steps": 2}, 5),  # the ramp as long as the phase
    ({"target": 10, "epochs": 1}, 2),  # the default ramp (3/4 of it) rounds up to the whole phase
])
def test_a_gradual_recipe_in_a_users_loop_reaches_its_target_within_its_steps(gradual, steps_per_epoch):
    recipe = recipe_from_dict({"model": {"name": "lenet_300_100"}, "prune": {"gradual": gradual}})
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = PruningSchedule.from_recipe(recipe, pruner, steps_per_epoch=steps_per_epoch, dense=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    user_loop(model, schedule, optimizer, schedule.epochs * steps_per_epoch)
    assert pruner.compression() == pytest.approx(10, rel=0.01)


def test_gradual_refuses_a_start_sparser_than_its_target():
    pruner = Pruner(create_model("lenet_300_100"))
    for initial in (0.99, 1.5, -0.1):
        with pytest.raises(ValueError, match="initial"):
            PruningSchedule.gradual(pruner, target=2, start=0, end=10, every=5, initial=initial)
    assert PruningSchedule.gradual(pruner, target=2, start=0, end=10, every=5, initial=0.5).events


def test_acdc_alternates_sparse_and_dense_phases_and_ends_at_its_target():
    """AC/DC in a user's loop: a compressed phase chooses afresh among every weight (a weight pruned in one
    compressed phase can be kept in the next), a decompressed phase trains every weight, the end is sparse."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = PruningSchedule.acdc(pruner, target=10, steps=40, phase=8)  # C 0-8, D 8-16, C 16-24, D 24-32, C 32-
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fc1 = model.fc1.weight
    masks, compressions, regrown = {}, {}, 0
    for i in range(schedule.total_steps):
        schedule.step(optimizer)
        compressions[i] = pruner.compression()
        if i in (0, 16, 32):
            masks[i] = model.fc1.weight_prunet_mask.clone()
        if i == 15:  # the end of the first decompressed phase: weights pruned at step 0 have moved
            regrown = int(torch.count_nonzero(fc1.detach()[masks[0] == 0]))
            pruned_at_0 = (masks[0] == 0).nonzero()[0].tolist()
            with torch.no_grad():
                fc1[tuple(pruned_at_0)] = 10.0  # as if training had made it large
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert compressions[0] == pytest.approx(10, rel=0.02) and compressions[8] == compressions[15] == 1.0
    assert compressions[39] == pytest.approx(10, rel=0.02) and regrown > 0
    assert masks[16][tuple(pruned_at_0)] == 1  # kept now, pruned in the first compressed phase
    for name, mask in pruner.masks.items():
        assert not bool((dict(model.named_parameters())[name][mask == 0] != 0).any())


def test_an_acdc_schedule_resumes_to_the_same_masks():
    def run(stop: int | None):
        torch.manual_seed(0)
        model = create_model("lenet_300_100")
        pruner = Pruner(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        schedule = PruningSchedule.acdc(pruner, target=5, steps=24, phase=4, warmup=2, criterion="global")
        g = torch.Generator().manual_seed(1)
        for i in range(schedule.total_steps):
            if i == stop:  # a checkpoint: the model's state (masks in it) and the schedule's
                state, where = copy.deepcopy(model.state_dict()), schedule.state_dict()
                model = create_model("lenet_300_100")
                pruner = Pruner(model)
                model.load_state_dict(state)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
                schedule = PruningSchedule.acdc(pruner, target=5, steps=24, phase=4, warmup=2, criterion="global")
                schedule.load_state_dict(where)
            schedule.step(optimizer)
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return pruner.masks

    whole = run(None)
    for stop in (8, 13):  # inside the decompressed phase, inside the last compressed one
        resumed = run(stop)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": 0.5, "steps": 10, "phase": 2}, "target"),
    ({"target": 10, "steps": 10, "phase": 0}, "phase >= 1"),
    ({"target": 10, "steps": 10, "phase": 2, "warmup": 9}, "within the 10 steps"),
    ({"target": 10, "steps": 10, "phase": 3}, "two phases"),  # no decompressed phase would fit: one-shot in disguise
    ({"target": 10, "steps": 10, "phase": 2, "criterion": "threshold"}, "criterion"),
])
def test_acdc_errors_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningSchedule.acdc(Pruner(create_model("lenet_300_100")), **kwargs)


ACDC = copy.deepcopy(TINY_RECIPE)
ACDC["threads"] = 1
ACDC["prune"] = {"lr_fraction": 0.5, "acdc": {"target": 20, "epochs": 6, "phase_epochs": 2, "final_epochs": 2}}


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("dies_at", [6, 7])  # saving the resume point of AC/DC's epoch 3, or of epoch 4
def test_an_acdc_run_lands_on_its_target_and_resumes_across_its_phases_to_the_same_bits(
        fast_data, tmp_path, monkeypatch, dies_at):
    whole = run(recipe_from_dict(copy.deepcopy(ACDC)), run_dir=tmp_path / "whole", log=lambda line: None)
    assert whole["compression"] == pytest.approx(20, rel=0.01) and whole["rounds"][0]["criterion"] == "acdc global"
    epochs = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    chosen = [e for e in epochs if e.get("event") == "epoch" and e.get("phase") == "acdc"]
    assert len(chosen) == 6

    # resumed after epoch 2 (the masks just released) or 3 (dense weights, mid-phase)
    assert_resumes_to_the_same_bits(ACDC, whole, tmp_path, monkeypatch, dies_at)


def test_acdc_recipe_errors_name_the_field():
    for acdc, match in [({"epochs": 4}, "acdc.target: required"), ({"target": 10, "epochs": 4, "final_epochs": 5},
                                                                     "hold no compressed and decompressed phase"),
                        ({"target": 10, "epochs": 10, "phase_epochs": 3}, "hold no compressed and decompressed"),
                        ({"target": 10, "criterion": "threshold"}, "acdc.criterion"),
                        ({"target": 10, "epochs": 10, "phase": 2}, "prune.acdc.phase: unknown field"),
                        ({"target": 10, "epochs": 10, "phase_epochs": 1.5}, "acdc.phase_epochs: expected an integer"),
                        ({"target": float("inf"), "epochs": 10}, "acdc.target: expected a number")]:
        with pytest.raises(ConfigError, match=match):
            recipe_from_dict({"prune": {"acdc": acdc}})


@pytest.mark.parametrize("make", [
    lambda p: PruningSchedule.gradual(p, target=10, start=0, end=12, every=4, criterion="erk"),
    lambda p: PruningSchedule.acdc(p, target=10, steps=16, phase=4, criterion="erk"),
])
def test_gradual_and_acdc_share_the_sparsity_among_layers_as_erk_does(make):
    """ERK's share of each layer depends on the shapes alone: a schedule ending at 10x keeps, per layer, what one
    ERK cut at 90% keeps on a fresh copy of the model."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    schedule = make(pruner)
    user_loop(model, schedule, torch.optim.SGD(model.parameters(), lr=0.01), schedule.total_steps)
    reference = Pruner(create_model("lenet_300_100"))
    reference.prune(allocation("erk", 0.9))
    assert {r.layer: r.kept for r in pruner.summary()} == {r.layer: r.kept for r in reference.summary()}
    kept = {r.layer: r.kept / r.weights for r in pruner.summary()}
    assert kept["fc3"] > kept["fc2"] > kept["fc1"]  # ERK keeps small layers denser
    with pytest.raises(ConfigError, match="criterion.*erk"):
        recipe_from_dict({"prune": {"gradual": {"target": 10, "criterion": "movement"}}})
