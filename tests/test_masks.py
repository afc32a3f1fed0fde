"""The mask primitives: buffers under stable names, gradient masking, optimizer-state cleaning, bake.

The end-to-end guarantees under real optimizers are in ``test_pruner.py``; these
tests pin down the one mechanism they rest on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from prunet import masks as M


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 4)


def checkerboard(shape) -> torch.Tensor:
    """A boolean mask with half its entries False, in a pattern no weight init produces."""
    idx = torch.arange(torch.Size(shape).numel()).view(shape)
    return idx % 2 == 0


# --- the buffer -------------------------------------------------------------------------------


def test_mask_is_a_buffer_under_param_name_mask():
    layer = linear()
    M.attach_mask(layer, "weight")
    assert M.mask_buffer_name("weight") == "weight_prunet_mask"
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "weight_prunet_mask"}
    assert torch.equal(state["weight_prunet_mask"], torch.ones_like(state["weight_prunet_mask"]))  # a fresh mask keeps all


def test_attach_applies_the_given_mask_and_keeps_identity():
    layer = linear()
    before = layer.weight
    dense = layer.weight.detach().clone()
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    assert layer.weight is before
    assert torch.equal(layer.weight.detach(), dense * mask)
    assert torch.equal(M.get_mask(layer, "weight") != 0, mask)


def test_attach_keeps_a_mask_already_on_the_module():
    """A mask loaded from a checkpoint before the hook is attached is not reset to all ones."""
    layer = linear()
    mask = checkerboard(layer.weight.shape)
    layer.register_buffer("weight_prunet_mask", mask.clone())
    M.attach_mask(layer, "weight")
    assert torch.equal(M.get_mask(layer, "weight") != 0, mask)
    assert bool((layer.weight.detach()[~mask] == 0).all())


def test_get_mask_none_without_mask():
    assert M.get_mask(linear(), "weight") is None


@pytest.mark.parametrize("shape", [(4, 5), (6, 4), (24,)])
def test_wrong_mask_shape_is_rejected(shape):
    layer = linear()
    with pytest.raises(ValueError, match="shape"):
        M.attach_mask(layer, "weight", torch.ones(shape, dtype=torch.bool))


def test_attach_to_non_parameter_is_rejected():
    layer = linear()
    layer.register_buffer("running", torch.zeros(3))
    with pytest.raises(TypeError, match="running"):
        M.attach_mask(layer, "running")


def test_set_mask_without_attach_is_a_clear_error():
    with pytest.raises(KeyError, match="attach"):
        M.set_mask(linear(), "weight", torch.ones(4, 6, dtype=torch.bool))


# --- gradients --------------------------------------------------------------------------------


def test_masked_entries_get_exactly_zero_gradient():
    layer = linear()
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    layer(torch.randn(8, 6)).pow(2).sum().backward()
    grad = layer.weight.grad
    assert bool((grad[~mask] == 0).all())
    assert bool((grad[mask] != 0).all())  # the others are untouched (random input: none is 0)


def test_gradient_accumulation_stays_masked():
    layer = linear()
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        layer(torch.randn(8, 6, generator=g)).pow(2).sum().backward()
    assert bool((layer.weight.grad[~mask] == 0).all())


def test_hook_follows_set_mask_and_load_state_dict():
    """The hook reads the live buffer: a mask changed later masks the next gradient."""
    layer = linear()
    M.attach_mask(layer, "weight")
    mask = checkerboard(layer.weight.shape)
    M.set_mask(layer, "weight", mask)
    layer(torch.randn(8, 6)).sum().backward()
    assert bool((layer.weight.grad[~mask] == 0).all())

    other = linear(seed=1)
    M.attach_mask(other, "weight")  # all ones
    other.load_state_dict(layer.state_dict())
    other(torch.randn(8, 6)).sum().backward()
    assert bool((other.weight.grad[~mask] == 0).all())


def test_set_mask_zeroes_removed_weights_in_place():
    layer = linear()
    M.attach_mask(layer, "weight")
    param = layer.weight
    mask = checkerboard(layer.weight.shape)
    M.set_mask(layer, "weight", mask)
    assert layer.weight is param
    assert bool((param.detach()[~mask] == 0).all())
    assert bool((param.detach()[mask] != 0).all())


def test_apply_mask_rezeroes_a_weight_written_by_hand():
    layer = linear()
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    M.apply_mask(layer, "weight")
    assert torch.equal(layer.weight.detach(), mask.float())


# --- optimizer state --------------------------------------------------------------------------


def test_optimizer_state_zeroed_where_masked_and_scalars_left_alone():
    layer = linear()
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 6)).pow(2).sum().backward()
        opt.step()
    M.attach_mask(layer, "weight")
    mask = checkerboard(layer.weight.shape)
    state = opt.state[layer.weight]
    assert bool((state["exp_avg"][~mask] != 0).all())  # dense steps left state there
    step_before = state["step"].clone()
    kept_avg = state["exp_avg"][mask].clone()

    M.set_mask(layer, "weight", mask, optimizer=opt)
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((state[key][~mask] == 0).all()), key
    assert torch.equal(state["exp_avg"][mask], kept_avg)
    assert torch.equal(state["step"], step_before)
    assert bool((opt.state[layer.bias]["exp_avg"] != 0).all())  # other parameters untouched


def test_mask_optimizer_state_without_state_is_a_no_op():
    layer = linear()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    M.mask_optimizer_state(opt, layer.weight, checkerboard(layer.weight.shape))
    assert len(opt.state) == 0


# --- bake -------------------------------------------------------------------------------------


def test_bake_removes_buffer_and_hook_and_keeps_values():
    layer = linear()
    mask = checkerboard(layer.weight.shape)
    handle = M.attach_mask(layer, "weight", mask)
    x = torch.randn(8, 6)
    masked_out = layer(x).detach()
    M.bake(layer, "weight", handle)
    assert "weight_prunet_mask" not in layer.state_dict()
    assert M.get_mask(layer, "weight") is None
    assert torch.equal(layer(x).detach(), masked_out)
    layer(x).pow(2).sum().backward()
    assert bool((layer.weight.grad[~mask] != 0).all())  # no longer masked


def test_baked_copy_is_plain_and_leaves_the_original_pruned():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    mask = checkerboard(model[0].weight.shape)
    M.attach_mask(model[0], "weight", mask)
    x = torch.randn(8, 6)
    expected = model(x).detach()

    plain = M.baked_copy(model)
    assert not any(k.endswith("_mask") for k in plain.state_dict())
    assert "0.weight_prunet_mask" in model.state_dict()
    assert torch.equal(plain(x).detach(), expected)
    assert bool((plain[0].weight.detach()[~mask] == 0).all())

    plain(x).sum().backward()
    model(x).sum().backward()
    assert bool((plain[0].weight.grad[~mask] != 0).any())  # the copy trains freely
    assert bool((model[0].weight.grad[~mask] == 0).all())  # the original is still masked


# --- the bit pattern gradients are masked with --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_pruned_clears_nan_and_inf_at_pruned_entries_and_keeps_kept_bits(dtype):
    layer = linear().to(dtype)
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    grad = torch.randn(layer.weight.shape).to(dtype)
    grad[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0] * 3).to(dtype)
    grad[0, 0] = float("nan")  # kept: the user's divergence stays visible
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    M.zero_pruned(grad, layer.weight, M.get_mask(layer, "weight"))
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert not bool(torch.signbit(grad[~mask]).any())  # +0, not -0
    assert bool(torch.isnan(grad[0, 0]))
    assert torch.equal(grad[mask][1:], expected[mask][1:])


def test_the_cached_bits_follow_a_new_mask_a_new_buffer_and_a_new_dtype():
    layer = linear()
    M.attach_mask(layer, "weight")
    w = layer.weight
    assert bool((M.keep_bits(w, M.get_mask(layer, "weight")) == -1).all())
    mask = checkerboard(w.shape)
    M.set_mask(layer, "weight", mask)  # in place: the version moves
    assert torch.equal(M.keep_bits(w, M.get_mask(layer, "weight")) == -1, mask)
    layer.double()  # a new buffer, wider entries
    bits = M.keep_bits(w, M.get_mask(layer, "weight"))
    assert bits.dtype == torch.int64 and torch.equal(bits == -1, mask)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 6, dtype=torch.float64)).pow(2).sum().backward()
        assert bool((layer.weight.grad[~mask] == 0).all())
        opt.step()
    assert bool((layer.weight.detach()[~mask] == 0).all())


def test_a_trained_parameter_with_its_cache_pickles_and_copies():
    """The cached bits are not saved; a copy masks its gradients after backward, a pickled one at its step."""
    import copy
    import pickle

    layer = linear()
    mask = checkerboard(layer.weight.shape)
    M.attach_mask(layer, "weight", mask)
    layer(torch.randn(8, 6)).sum().backward()  # the cache now exists on the weight
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        twin.weight.grad = None
        twin(torch.randn(8, 6)).pow(2).sum().backward()
        twin.weight.grad.data.fill_(1.0)
        torch.optim.SGD(twin.parameters(), lr=0.1).step()
        assert bool((twin.weight.grad[~mask] == 0).all())
        assert bool((twin.weight.detach()[~mask] == 0).all())
    twin = copy.deepcopy(layer)
    twin(torch.randn(8, 6)).pow(2).sum().backward()
    assert bool((twin.weight.grad[~mask] == 0).all())  # read after backward, before any step


def test_an_optimizer_sees_parameters_masked_after_its_first_step():
    """Its list of masked parameters is cached; a mask attached later (or baked) is still seen."""
    layer = linear()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for attach in (False, True):
        if attach:
            M.attach_mask(layer, "weight", checkerboard(layer.weight.shape))
        opt.zero_grad()
        layer(torch.randn(8, 6)).pow(2).sum().backward()
        layer.weight.grad.data.fill_(1.0)  # after backward, no version bump
        opt.step()
    mask = checkerboard(layer.weight.shape)
    assert bool((layer.weight.detach()[~mask] == 0).all())
    assert bool((opt.state[layer.weight]["momentum_buffer"][~mask] == 0).all())
