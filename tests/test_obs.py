"""Layer-wise OBS on hand-made layers: the OBS step against brute force, reconstruction, masks, limits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from prunet import Pruner
from prunet.criteria import LAMP, Sparsity
from prunet.layers import find_layers
from prunet.obs import (
    MAX_DIM,
    ObsError,
    dampen,
    input_dim,
    layer_hessian,
    obs_prune,
    obs_prune_weight,
    obs_step,
    prune_once,
)

# A 3×6 layer and 8 hand-made input rows (full rank, so H needs no damping).
W = torch.tensor([[0.9, -0.4, 0.05, 1.2, -0.7, 0.3],
                  [-0.2, 0.8, 0.6, -0.1, 0.5, -1.1],
                  [0.4, 0.35, -0.9, 0.7, 0.25, 0.6]], dtype=torch.float64)
X = torch.tensor([[1.0, 0.5, -0.3, 0.0, 2.0, 1.0, -1.0, 0.4],
                  [0.2, 1.0, 0.8, -0.5, 0.1, 0.0, 0.3, 1.2],
                  [-1.0, 0.3, 1.5, 0.7, 0.0, -0.4, 0.9, 0.1],
                  [0.5, -0.2, 0.0, 1.0, 0.6, 0.8, -0.7, 0.3],
                  [0.0, 0.9, -0.6, 0.2, 1.1, -0.3, 0.5, -0.8],
                  [1.3, 0.0, 0.4, -0.9, 0.2, 0.7, 0.1, 0.6]], dtype=torch.float64)  # d=6 × N=8
N = X.shape[1]
H = 2 * X @ X.T / N


def error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖(w − ŵ) X‖² / N, the layer's output error on the calibration rows."""
    return float(((w - w_hat) @ X).square().sum() / N)


def brute_force(w: torch.Tensor, q: int) -> torch.Tensor:
    """The best row with weight ``q`` removed, by least squares on the other weights' inputs."""
    others = [j for j in range(len(w)) if j != q]
    # Minimise ‖w X − ŵ_others X_others‖: regress the row's outputs on the other inputs.
    solution = torch.linalg.lstsq(X[others].T, (w @ X)[:, None]).solution.flatten()
    out = torch.zeros_like(w)
    out[others] = solution
    return out


@pytest.mark.parametrize("row", [0, 1, 2])
def test_obs_step_equals_brute_force_for_every_weight(row):
    w, hinv = W[row], torch.linalg.inv(H)
    for q in range(6):
        delta, loss = obs_step(w, hinv, q)
        best = brute_force(w, q)
        assert torch.allclose(w + delta, best, atol=1e-10)
        assert loss == pytest.approx(error(w, best), rel=1e-9)
        assert loss == pytest.approx(float(w[q] ** 2 / (2 * hinv[q, q])))


def test_pruning_one_weight_of_a_layer_is_the_obs_step():
    w = W.clone()
    w[1, 3] = 1e-3  # the smallest saliency by far, whatever the order of the columns
    new, mask = obs_prune_weight(w, H, keep=17, damp=0.0)
    assert (~mask).nonzero().tolist() == [[1, 3]]
    delta, loss = obs_step(w[1], torch.linalg.inv(H), 3)
    assert torch.allclose(new[1], w[1] + delta, atol=1e-10)
    assert torch.allclose(new[[0, 2]], w[[0, 2]])  # the other rows are untouched
    assert error(w[1], new[1]) == pytest.approx(loss, rel=1e-8)
    # Brute force over every weight of the layer: the one OBS chose costs the least.
    losses = {(i, q): error(w[i], brute_force(w[i], q)) for i in range(3) for q in range(6)}
    assert min(losses, key=losses.get) == (1, 3)


@pytest.mark.parametrize("keep", [17, 12, 9, 6, 3])
def test_obs_reconstructs_better_than_magnitude_at_the_same_sparsity(keep):
    new, mask = obs_prune_weight(W, H, keep=keep, damp=0.0)
    assert int(mask.sum()) == keep and torch.all(new[~mask] == 0)
    cut = W.abs().flatten().sort(descending=True).values[keep - 1]
    magnitude = W * (W.abs() >= cut)
    assert error(W, new) <= error(W, magnitude) + 1e-12


@pytest.mark.parametrize("exact", [True, False])
def test_both_forms_beat_magnitude_on_a_larger_layer_with_correlated_inputs(exact):
    torch.manual_seed(0)
    x = torch.randn(64, 400, dtype=torch.float64)
    x = x + 0.8 * x.roll(1, 0)  # neighbouring inputs correlated, as pixels are
    w = torch.randn(16, 64, dtype=torch.float64)
    h = 2 * x @ x.T / 400
    new, mask = obs_prune_weight(w, h, keep=256, exact=exact)
    assert int(mask.sum()) == 256
    magnitude = w * (w.abs() >= w.abs().flatten().sort(descending=True).values[255])

    def err(v: torch.Tensor) -> float:
        return float(((w - v) @ x).square().sum())

    # The exact form refits and re-ranks at each step; SparseGPT's pass (for large layers) gains less here.
    assert err(new) < (0.7 if exact else 1.0) * err(magnitude)


def test_sparsegpt_pass_prunes_the_first_column_as_the_obs_step_does():
    w = W.clone()
    w[2, 0] = 1e-4
    new, mask = obs_prune_weight(w, H, keep=17, damp=0.0, exact=False)
    assert (~mask).nonzero().tolist() == [[2, 0]]
    delta, _ = obs_step(w[2], torch.linalg.inv(H), 0)  # column 0: every other column is free to move
    assert torch.allclose(new[2], w[2] + delta, atol=1e-10)


def test_pruned_weights_stay_pruned_and_the_rest_compensate():
    prev = torch.ones(3, 6, dtype=torch.bool)
    prev[0, 0] = prev[2, 5] = False
    new, mask = obs_prune_weight(W, H, keep=10, prev=prev)
    assert int(mask.sum()) == 10
    assert not mask[0, 0] and not mask[2, 5] and new[0, 0] == 0 and new[2, 5] == 0
    # A weight the mask already pruned counts as zero, whatever the tensor holds.
    same, _ = obs_prune_weight(W * prev, H, keep=10, prev=prev)
    assert torch.equal(new, same)


def test_a_target_below_what_the_mask_keeps_prunes_nothing_more():
    prev = torch.zeros(3, 6, dtype=torch.bool)
    prev[:, :2] = True
    _, mask = obs_prune_weight(W, H, keep=10, prev=prev)
    assert torch.equal(mask, prev)


def test_the_hessian_of_a_linear_layer_is_2_x_xt_over_n():
    model = nn.Sequential(nn.Linear(6, 3, bias=False).double())
    layer = find_layers(model)[0]
    assert torch.allclose(layer_hessian(model, layer, [X.T[:5], X.T[5:]]), H)


def test_the_hessian_of_a_conv_layer_sees_its_im2col_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, stride=2).double()
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    rows = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)  # B·L, C·kh·kw
    h = layer_hessian(nn.Sequential(conv), find_layers(nn.Sequential(conv))[0], [x])
    assert torch.allclose(h, 2 * rows.T @ rows / len(rows))
    # The rows times the flattened kernel are the convolution's outputs (the weight flattens as unfold does).
    out = (rows @ conv.weight.reshape(4, -1).T).reshape(3, -1, 4).transpose(1, 2)
    assert torch.allclose(out, (conv(x) - conv.bias[:, None, None]).flatten(2))


def test_obs_prune_hits_lamp_counts_and_beats_magnitude_on_a_small_network():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(),
                        nn.Linear(32, 5))
    x = torch.randn(256, 1, 8, 8)
    dense = net(x).detach()
    magnitude = copy.deepcopy(net)
    rows = obs_prune(Pruner(net), [x[:128], x[128:]], LAMP(target=4))
    lamp_rows = Pruner(magnitude).prune(LAMP(target=4))  # the same counts, chosen by LAMP alone, no compensation
    assert {n: r.kept for n, r in rows.items()} == {n: r.kept for n, r in lamp_rows.items()}
    assert (net(x) - dense).square().mean() < (magnitude(x) - dense).square().mean()


def test_layers_obs_cannot_prune_are_refused_in_one_line_before_anything_changes():
    big = nn.Sequential(nn.Linear(MAX_DIM + 1, 2))
    with pytest.raises(ObsError, match=r"has 8,193 inputs.*limit is 8,192") as info:
        input_dim(find_layers(big)[0])
    assert "\n" not in str(info.value)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    before = grouped[2].weight.detach().clone()
    with pytest.raises(ObsError, match="layer 0 is a grouped"):
        obs_prune(Pruner(grouped), [torch.randn(2, 4, 3, 3)], Sparsity(0.5))
    assert torch.equal(grouped[2].weight, before)


def test_prune_once_methods_reach_the_target_and_check_their_arguments():
    torch.set_num_threads(1)
    for method in ("magnitude", "lamp", "obs"):
        torch.manual_seed(0)
        pruner = Pruner(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)))
        prune_once(pruner, method, 4, [torch.randn(100, 1, 8, 8)])
        assert pruner.compression() == pytest.approx(4, rel=1e-3)
    with pytest.raises(ValueError, match="'sgd' is not one of magnitude, lamp, obs"):
        prune_once(pruner, "sgd", 4)
    with pytest.raises(ValueError, match="obs needs calibration batches"):
        prune_once(pruner, "obs", 8)


def test_dampen_adds_a_share_of_the_mean_diagonal():
    assert torch.allclose(dampen(H, 0.1), H + 0.1 * H.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    assert torch.equal(dampen(torch.zeros(2, 2), 0.5), 0.5 * torch.eye(2))
