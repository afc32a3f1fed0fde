"""Masks cannot leak, whatever the user's loop does: the invariant after 50 steps of many loops.

The invariant: every weight whose mask is 0 is exactly 0. Each test prunes a
model that an optimizer has already been stepping (so momentum and Adam moments
exist), *without* telling the pruner about the optimizer and without
``attach``, then runs the user's loop for 50 steps.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunet import Pruner, Sparsity
from prunet.models import create_model


class MySGD(torch.optim.SGD):
    """A user's optimizer that looks like SGD but also nudges every weight."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def batches(n: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def assert_invariant(pruner: Pruner) -> None:
    for t in pruner.targets:
        leaked = int(torch.count_nonzero(t.weight.detach()[t.mask == 0]))  # a NaN counts as non-zero
        assert leaked == 0, f"{t.param}: {leaked} pruned weights are non-zero"


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 50, after_backward=None, dtype=None,
          closure: bool | None = None) -> None:
    """The user's loop: zero_grad, backward, step; through a closure for LBFGS (or when asked)."""
    closure = isinstance(opt, torch.optim.LBFGS) if closure is None else closure
    for x, y in batches(steps):
        if dtype is not None:
            x = x.to(dtype)

        def compute():
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            return loss

        if closure:
            opt.step(compute)
        else:
            compute()
            opt.step()


OPTIMIZERS = {
    "sgd momentum wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "sgd subclass": lambda p: MySGD(p, lr=0.05, momentum=0.9),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.1, max_iter=2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_attach_no_optimizer_given(name):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, steps=3)  # state exists before pruning
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.7))  # the optimizer is not passed, and attach is never called
    train(model, opt)
    assert_invariant(pruner)


@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("modify", ["noise", "assign", "clip"])
def test_gradients_changed_after_backward(modify, closure):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(model)
    pruner.attach(opt)
    pruner.prune(Sparsity(0.7))

    def change(m: nn.Module) -> None:
        for p in m.parameters():
            if modify == "noise":  # DP-SGD
                p.grad.add_(torch.randn_like(p.grad) * 1e-2)
            elif modify == "assign":
                p.grad = torch.ones_like(p)
        if modify == "clip":
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)

    train(model, opt, after_backward=change, closure=closure)
    assert_invariant(pruner)


def test_a_deep_copy_trains_with_its_masks():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.8))
    twin = copy.deepcopy(model)  # no new Pruner
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    train(twin, opt)
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(twin, name)
        assert torch.count_nonzero(layer.weight.detach()[layer.weight_prunet_mask == 0]) == 0
        assert torch.equal(layer.weight_prunet_mask, getattr(model, name).weight_prunet_mask)


def test_float16_with_adam_keeps_pruned_weights_zero_not_nan():
    torch.manual_seed(0)
    model = create_model("lenet_300_100").half()
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.7))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # eps 1e-8 underflows in float16: 0/0 at pruned entries
    train(model, opt, dtype=torch.float16)
    assert_invariant(pruner)  # exactly 0, not NaN (NaN * 0 would be NaN)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["sgd momentum wd", "adam", "adamw"])
def test_a_nan_or_inf_gradient_at_pruned_positions_moves_no_weight(name, bad):
    """One bad gradient where the mask is 0 (a loss spike, a user's hook): pruned weights stay exactly 0
    and the kept ones finite; a multiply by the mask would have made every pruned weight NaN."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    opt = OPTIMIZERS[name](model.parameters())
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.9))

    def poison(m: nn.Module) -> None:
        for t in pruner.targets:
            t.weight.grad[t.mask == 0] = bad

    train(model, opt, steps=3, after_backward=poison)
    assert_invariant(pruner)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_saved_whole_model_comes_back_enforced(how):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(0.8))
    if how == "pickle":
        back = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(back(x), model(x))
    train(back, torch.optim.SGD(back.parameters(), lr=0.1, momentum=0.9))
    assert torch.count_nonzero(back.fc1.weight.detach()[back.fc1.weight_prunet_mask == 0]) == 0


def test_a_shared_parameter_is_one_target_with_one_mask():
    torch.manual_seed(0)
    a = nn.Linear(20, 20)
    b = nn.Linear(20, 20)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, nn.ReLU(), b)
    pruner = Pruner(model)
    assert [t.param for t in pruner.targets] == ["0.weight"]
    pruner.prune(Sparsity(0.5))
    assert pruner.summary()[0].weights == 400 and pruner.summary()[0].kept == 200
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(8, 20)).pow(2).mean().backward()
        opt.step()
    assert_invariant(pruner)


@pytest.mark.parametrize("case", ["prune_after_backward", "data_noise", "assign_then_clip", "state_replaced",
                                  "load_assign"])
def test_more_ways_a_loop_can_touch_gradients_and_state(case):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, steps=2)
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.5))
    saved = {k: v.clone() for k, v in opt.state[model.fc1.weight].items()}
    for i, (x, y) in enumerate(batches(20)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if case == "prune_after_backward" and i == 5:
            pruner.prune(Sparsity(0.9))  # between backward and step
        elif case == "data_noise":
            for p in model.parameters():
                p.grad.data.add_(torch.randn_like(p.grad) * 1e-2)  # .data: no version bump
        elif case == "assign_then_clip":
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        elif case == "state_replaced" and i == 5:
            opt.state[model.fc1.weight]["momentum_buffer"] = saved["momentum_buffer"].clone()  # pre-prune momentum
        elif case == "load_assign" and i == 5:
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            continue
        opt.step()
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(model, name)
        assert torch.count_nonzero(layer.weight.detach()[layer.weight_prunet_mask == 0]) == 0, name


def test_a_copy_of_an_unpickled_model_is_enforced_too():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(0.8))
    twin = copy.deepcopy(pickle.loads(pickle.dumps(model)))
    train(twin, torch.optim.Adam(twin.parameters(), lr=1e-2))
    assert torch.count_nonzero(twin.fc1.weight.detach()[twin.fc1.weight_prunet_mask == 0]) == 0
