"""The reference loop on a real Fashion-MNIST slice: it learns, repeats itself, freezes, keeps masks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from prunet import Pruner, Threshold
from prunet.config import TrainConfig
from prunet.data import Split
from prunet.schedule import lr_at
from prunet.train import DivergedError, FitOptions, Normalization, evaluate, fit, make_optimizer

CFG = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", momentum=0.9, regularization="l2", reg_strength=5e-4,
                  lr_schedule="cosine")


def norm_of(data) -> Normalization:
    return Normalization(data.mean, data.std)


def train(lenet, data, cfg=CFG, seed=0, **kwargs):
    model = lenet(seed=seed)
    records = fit(model, data.train, data.val, cfg, norm_of(data), FitOptions(seed=seed, **kwargs))
    return model, records


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_lowers_the_loss(lenet, fashion):
    model = lenet()
    loss_before, acc_before = evaluate(model, fashion.val, norm_of(fashion))
    records = fit(model, fashion.train, fashion.val, CFG, norm_of(fashion))
    loss_after, acc_after = evaluate(model, fashion.val, norm_of(fashion))
    assert [r.epoch for r in records] == [1, 2] and all(r.phase == "train" for r in records)
    assert loss_after < 0.6 * loss_before
    assert acc_after > 60 > acc_before  # 1000 images, 2 epochs; chance is 10%
    assert records[-1].train_loss < records[0].train_loss
    assert max(r.val_acc for r in records) == pytest.approx(acc_after)


def test_same_seed_same_weights(lenet, fashion):
    a, rec_a = train(lenet, fashion)
    b, rec_b = train(lenet, fashion)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [r.train_loss for r in rec_a] == [r.train_loss for r in rec_b]
    c, _ = train(lenet, fashion, seed=1)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_model_left_at_best_validation_epoch(lenet, fashion):
    snapshots = []
    model = lenet()
    cfg = dataclasses.replace(CFG, epochs=3, lr=0.2, lr_schedule="constant")  # a noisy run
    records = fit(model, fashion.train, fashion.val, cfg, norm_of(fashion), FitOptions(
                  on_epoch=lambda r: snapshots.append(state(model))))
    accs = [r.val_acc for r in records]
    best = accs.index(max(accs))  # the first best epoch
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshots[best].items())


def test_schedule_sets_each_epochs_lr(lenet, fashion):
    cfg = dataclasses.replace(CFG, epochs=3, lr=0.1, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.5)
    _, records = train(lenet, fashion, cfg)
    assert [r.lr for r in records] == [0.1, 0.1, 0.05]
    assert [round(lr_at(e, 4, 0.1, "cosine"), 4) for e in range(4)] == [0.1, 0.0854, 0.05, 0.0146]


def test_warmup_raises_the_rate_linearly_over_the_first_steps_of_dense_training(lenet, fashion):
    rates = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    try:
        cfg = dataclasses.replace(CFG, epochs=2, lr=0.1, lr_schedule="constant", warmup_steps=24)
        _, records = train(lenet, fashion, cfg)
    finally:
        hook.remove()
    assert len(rates) == 32  # 1000 images, batches of 64: 16 steps an epoch
    assert rates[:24] == pytest.approx([0.1 * k / 24 for k in range(1, 25)])  # across the epoch boundary
    assert rates[24:] == pytest.approx([0.1] * 8)
    assert [r.lr for r in records] == [0.1, 0.1]  # each epoch reports its scheduled rate


def test_retraining_after_a_prune_has_no_warmup():
    from prunet.config import recipe_from_dict
    recipe = recipe_from_dict({"train": {"lr": 0.1, "warmup_steps": 100}, "prune": {"lr_fraction": 0.1}})
    assert recipe.train.warmup_steps == 100 and recipe.retrain_config(3).warmup_steps == 0


def test_frozen_parameters_are_bit_identical(lenet, fashion):
    model = lenet()
    before = state(model)
    trainable = [model.fc2.weight, model.fc2.bias]
    fit(model, fashion.train, fashion.val, CFG, norm_of(fashion), FitOptions(trainable=trainable))
    after = model.state_dict()
    for k in ("fc1.weight", "fc1.bias", "fc3.weight", "fc3.bias"):
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards


def test_pruned_weights_stay_zero_through_fit(lenet, fashion):
    model = lenet()
    fit(model, fashion.train, fashion.val, dataclasses.replace(CFG, epochs=1), norm_of(fashion))
    pruner = Pruner(model)
    pruner.prune(Threshold({"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}))
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    before = state(model)
    for opt in ("sgd", "adamw"):
        fit(model, fashion.train, fashion.val, dataclasses.replace(CFG, optimizer=opt, lr=0.01), norm_of(fashion),
            FitOptions(pruner=pruner))
    for t in pruner.targets:
        assert torch.equal(t.mask, masks[t.param])
        assert bool((t.weight.detach()[t.mask == 0] == 0).all())
        assert not torch.equal(t.weight.detach(), before[t.param])  # survivors were retrained


def test_fit_detaches_the_optimizers_it_attached(lenet, fashion, monkeypatch):
    """Each round's fit builds an optimizer; one left attached would keep being masked by every later prune."""
    model = lenet()
    pruner = Pruner(model)
    pruner.prune(Threshold(0.5))
    attached = []
    monkeypatch.setattr(pruner, "attach", lambda opt, *a, **k: (attached.append(opt), Pruner.attach(pruner, opt)))
    fit(model, fashion.train, fashion.val, dataclasses.replace(CFG, epochs=1), norm_of(fashion), FitOptions(
        pruner=pruner))
    (opt,) = attached
    momentum = opt.state[model.fc1.weight]["momentum_buffer"].clone()
    pruner.prune(Threshold(1.0))  # prunes more: an attached optimizer's state would be zeroed there
    newly_pruned = (model.fc1.weight_prunet_mask == 0) & (momentum != 0)
    assert newly_pruned.any()
    assert torch.equal(opt.state[model.fc1.weight]["momentum_buffer"], momentum)


def test_l1_regularization_shrinks_weights(lenet, fashion):
    plain, _ = train(lenet, fashion, dataclasses.replace(CFG, regularization="none"))
    l1, records = train(lenet, fashion, dataclasses.replace(CFG, regularization="l1", reg_strength=1e-3))
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in records)
    size = lambda m: sum(p.abs().sum().item() for p in (m.fc1.weight, m.fc2.weight, m.fc3.weight))
    assert size(l1) < 0.9 * size(plain)
    assert records[-1].val_acc > 50


def test_l2_is_weight_decay_on_weights_not_biases(lenet):
    model = lenet()
    opt = make_optimizer(model.parameters(), CFG, 0.05)
    decays = [(g["weight_decay"], sorted(p.dim() for p in g["params"])) for g in opt.param_groups]
    assert decays == [(5e-4, [2, 2, 2]), (0.0, [1, 1, 1])]
    assert all(g["weight_decay"] == 0 for g in make_optimizer(model.parameters(),
                                                              dataclasses.replace(CFG, regularization="l1"),
                                                              0.05).param_groups)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_make_optimizer_kinds(lenet, name, cls):
    opt = make_optimizer(lenet().parameters(), dataclasses.replace(CFG, optimizer=name), 0.01)
    assert type(opt) is cls and all(g["lr"] == 0.01 for g in opt.param_groups)


def test_zero_epochs_trains_nothing(lenet, fashion):
    model = lenet()
    before = state(model)
    assert fit(model, fashion.train, fashion.val, dataclasses.replace(CFG, epochs=0), norm_of(fashion)) == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_empty_validation_split_keeps_the_last_epoch(lenet, fashion):
    empty = Split(fashion.val.images[:0], fashion.val.labels[:0])
    cfg = dataclasses.replace(CFG, lr_schedule="constant")
    one = lenet()
    fit(one, fashion.train, empty, dataclasses.replace(cfg, epochs=1), norm_of(fashion))
    two = lenet()
    fit(two, fashion.train, empty, cfg, norm_of(fashion))
    assert not torch.equal(one.fc1.weight, two.fc1.weight)  # the second epoch is not thrown away


def test_evaluate_restores_training_mode(lenet, fashion):
    model = lenet(dropout=0.5).train()
    loss, acc = evaluate(model, fashion.val, norm_of(fashion), batch_size=128)
    assert model.training
    assert loss > 0 and 0 <= acc <= 100
    # eval mode: dropout off, so the result does not depend on the RNG
    assert evaluate(model, fashion.val, norm_of(fashion), batch_size=128) == (loss, acc)


def test_distillation_teaches_what_the_labels_do_not(lenet, fashion):
    # The student sees shuffled labels: alone it learns nothing; from the teacher's soft targets it learns the task.
    teacher, _ = train(lenet, fashion, dataclasses.replace(CFG, epochs=3))
    teacher.zero_grad(set_to_none=True)
    _, teacher_acc = evaluate(teacher, fashion.test, norm_of(fashion))
    g = torch.Generator().manual_seed(1)
    noisy = dataclasses.replace(fashion, train=Split(fashion.train.images,
                                                     fashion.train.labels[torch.randperm(1000, generator=g)]))
    alone, _ = train(lenet, noisy, seed=2)
    taught, _ = train(lenet, noisy, seed=2, teacher=teacher, distill_alpha=1.0)
    _, alone_acc = evaluate(alone, fashion.test, norm_of(fashion))
    _, taught_acc = evaluate(taught, fashion.test, norm_of(fashion))
    assert alone_acc < 30 and taught_acc > 0.8 * teacher_acc
    # The teacher is only read.
    assert all(p.grad is None for p in teacher.parameters())


def test_a_model_that_learned_then_fell_below_guessing_is_a_divergence(lenet, fashion):
    """A loss that blows up without becoming NaN (AC/DC with strong distillation did: 0.42, then 28.9, then
    chance for good) stops the fit as a divergence after two such epochs, so a phase retries at a lower rate
    instead of ending with a model that predicts one class."""
    model = lenet()
    steps = -(-len(fashion.train) // 64)
    seen = []

    def collapse(taken):  # from the second epoch on, every image scored as class 0
        if taken > steps:
            with torch.no_grad():
                model.fc3.weight.zero_()
                model.fc3.bias.copy_(torch.tensor([50.0] + [0.0] * 9))

    cfg = dataclasses.replace(CFG, epochs=5)
    with pytest.raises(DivergedError, match=r"train epoch 3 .* guessing uniformly among 10 classes"):
        fit(model, fashion.train, fashion.val, cfg, norm_of(fashion), FitOptions(on_step=collapse,
                                                                                  on_epoch=seen.append))
    assert [r.epoch for r in seen] == [1, 2, 3]  # stopped there, each epoch reported


def test_a_fit_whose_kept_epoch_blew_up_is_a_divergence(lenet, fashion):
    """When the epochs a fit may choose from (after ``choose_after``) end blown up, it raises rather than return
    a model that predicts one class; when an earlier, sound epoch may be chosen, that one is returned."""
    steps = -(-len(fashion.train) // 64)
    cfg = dataclasses.replace(CFG, epochs=2)

    def collapsing(model):
        def collapse(taken):
            if taken > steps:
                with torch.no_grad():
                    model.fc3.weight.zero_()
                    model.fc3.bias.copy_(torch.tensor([50.0] + [0.0] * 9))
        return collapse

    model = lenet()
    with pytest.raises(DivergedError, match=r"train epoch 2 "):
        fit(model, fashion.train, fashion.val, cfg, norm_of(fashion),
            FitOptions(on_step=collapsing(model), choose_after=1))
    model = lenet()
    records = fit(model, fashion.train, fashion.val, cfg, norm_of(fashion), FitOptions(on_step=collapsing(model)))
    assert evaluate(model, fashion.val, norm_of(fashion))[1] == pytest.approx(records[0].val_acc)
    assert records[0].val_acc > 50 > records[1].val_acc


def test_a_fit_resumed_after_its_blown_up_last_epoch_still_raises(lenet, fashion):
    """The last epoch's resume point is saved before the fit judges the epoch it keeps: resuming from it (the
    run's own ``--resume`` after the error) raises again instead of returning the blown-up model."""
    steps = -(-len(fashion.train) // 64)
    no_val = Split(fashion.val.images[:0], fashion.val.labels[:0])
    cfg = dataclasses.replace(CFG, epochs=2)
    model, saved = lenet(), []

    def collapse(taken):
        if taken > steps:
            with torch.no_grad():
                model.fc3.weight.zero_()
                model.fc3.bias.copy_(torch.tensor([50.0] + [0.0] * 9))

    def keep(resume):
        saved.append((copy.deepcopy(resume), copy.deepcopy(model.state_dict())))

    with pytest.raises(DivergedError, match=r"rose to [0-9.]+ in train epoch 2 at lr [0-9.]+, above"):
        fit(model, fashion.train, no_val, cfg, norm_of(fashion), FitOptions(on_step=collapse, on_checkpoint=keep))
    resume, weights = saved[-1]
    again = lenet()
    again.load_state_dict(weights)
    with pytest.raises(DivergedError, match=r"in train epoch 2 "):
        fit(again, fashion.train, no_val, cfg, norm_of(fashion), FitOptions(resume=resume))


def test_a_blow_up_that_recovers_keeps_the_best_epoch(lenet, fashion):
    """One bad batch can lift an epoch's mean loss above guessing; the next epoch recovers, so the fit ends as
    usual, at its best validation epoch."""
    model = lenet()
    steps = -(-len(fashion.train) // 64)
    saved = {}

    def spike(taken):  # one step of epoch 2 scores every image as class 0, the next undoes it
        with torch.no_grad():
            if taken == steps + 1:
                saved["bias"] = model.fc3.bias.clone()
                model.fc3.bias[0] += 200.0
            elif taken == steps + 2:
                model.fc3.bias.copy_(saved["bias"])

    cfg = dataclasses.replace(CFG, epochs=4)
    records = fit(model, fashion.train, fashion.val, cfg, norm_of(fashion), FitOptions(on_step=spike))
    assert records[1].train_loss > max(2.303, 2 * records[0].train_loss)  # epoch 2 blew up
    assert len(records) == 4 and records[-1].train_loss < 1.0
    assert evaluate(model, fashion.val, norm_of(fashion))[1] == pytest.approx(max(r.val_acc for r in records))


def test_a_model_that_never_learns_is_not_stopped(lenet, fashion):
    """Labels with nothing to learn keep the loss about that of guessing, epoch after epoch: no divergence."""
    labels = torch.randint(0, 10, (len(fashion.train),), generator=torch.Generator().manual_seed(0))
    noise = dataclasses.replace(fashion, train=Split(fashion.train.images, labels))
    cfg = dataclasses.replace(CFG, epochs=4, lr=0.01)
    records = fit(lenet(), noise.train, noise.val, cfg, norm_of(noise))
    assert len(records) == 4 and all(2.0 < r.train_loss < 2.6 for r in records)
