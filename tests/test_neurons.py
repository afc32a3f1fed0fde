"""Dead-neuron removal: exact outputs, exact shapes and parameter counts, boundaries respected."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from prunet.models import create_model
from prunet.neurons import DeadNeurons, find_dead_neurons, remove_dead_neurons

ATOL = 1e-5


def seq(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers)).eval()


def mlp(act: type[nn.Module] = nn.ReLU, widths=(12, 10, 8, 4), bias: bool = True) -> nn.Sequential:
    """fc1 - act1 - fc2 - act2 - fc3 with the given widths."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers.append((f"fc{i}", nn.Linear(n_in, n_out, bias=bias)))
        if i < len(widths) - 1:
            layers.append((f"act{i}", act()))
    return seq(*layers)


def small_cnn(padding: int = 0) -> nn.Sequential:
    """conv1 - relu - pool - conv2 - relu - pool - flatten - fc1 - relu - fc2, for (N, 3, 12, 12) inputs."""
    size = (12 - 2 * (1 - padding)) // 2  # after conv1 (3x3) and pool1
    size = (size - 2 * (1 - padding)) // 2  # after conv2 and pool2
    return seq(
        ("conv1", nn.Conv2d(3, 6, 3, padding=padding)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 8, 3, padding=padding)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(8 * size * size, 16)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(16, 5)),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), atol=ATOL, rtol=0)


def random_masks(model: nn.Module, seed: int, density: float = 0.6) -> dict[str, torch.Tensor]:
    """Bernoulli masks on every weight, plus a few whole rows and whole columns pruned."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if not name.endswith("weight"):
            continue
        mask = (torch.rand(p.shape, generator=gen) < density).float()
        rows = torch.randperm(p.shape[0], generator=gen)[: p.shape[0] // 4]
        cols = torch.randperm(p.shape[1], generator=gen)[: p.shape[1] // 4]
        mask[rows] = 0
        mask[:, cols] = 0
        masks[name] = mask
    return masks


def bake(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)


def randomise_biases(model: nn.Module, seed: int) -> None:
    """Biases well away from zero, so zero-input neurons emit constants that must be folded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


# --------------------------------------------------------------------------- finding


def test_find_dead_neurons_mlp_indices():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model.fc1.weight[[2, 7]] = 0  # fc1 neurons 2, 7: no input
        model.fc2.weight[:, 4] = 0  # fc1 neuron 4: no output
        model.fc2.weight[1] = 0  # fc2 neuron 1: no input
        model.fc3.weight[:, [0, 5]] = 0  # fc2 neurons 0, 5: no output
        model.fc3.weight[3] = 0  # logits have no next layer: only no_input
    dead = find_dead_neurons(model)
    assert list(dead) == ["fc1", "fc2", "fc3"]
    assert dead["fc1"] == DeadNeurons([2, 7], [4], "fc2")
    assert dead["fc2"] == DeadNeurons([1], [0, 5], "fc3")
    assert dead["fc3"] == DeadNeurons([3], [], None)
    assert dead["fc1"].dead == [2, 4, 7]


def test_find_dead_neurons_conv_to_linear_block():
    """After Flatten, channel c owns features c*H*W .. (c+1)*H*W - 1 of the next layer."""
    torch.manual_seed(0)
    model = create_model("lenet_5").eval()  # conv2: 50 channels of 4x4 -> fc1: 800 inputs
    with torch.no_grad():
        model.fc1.weight[:, 3 * 16 : 4 * 16] = 0  # channel 3's whole block
        model.fc1.weight[:, 5 * 16 : 6 * 16 - 1] = 0  # channel 5: one feature still connected
    assert find_dead_neurons(model)["conv2"].no_output == [3]


def test_find_dead_neurons_uses_masks_when_given():
    torch.manual_seed(0)
    model = mlp()
    masks = {"fc1.weight": torch.ones_like(model.fc1.weight)}
    masks["fc1.weight"][6] = 0
    bake(model, masks)
    with torch.no_grad():
        model.fc2.weight[:, 1] = 0  # zero but not masked: pruned all the same, fc2 has no mask
    dead = find_dead_neurons(model, masks)
    assert dead["fc1"].no_input == [6]
    assert dead["fc1"].no_output == [1]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", range(6))
def test_random_masked_mlp_exact(seed):
    torch.manual_seed(seed)
    model = mlp(widths=(20, 16, 12, 5))
    randomise_biases(model, seed)
    masks = random_masks(model, seed, density=0.35)
    bake(model, masks)
    x = torch.randn(32, 20)

    small, report = remove_dead_neurons(model, masks, example_input=x)

    assert_same_outputs(model, small, x)
    assert report.max_abs_diff is not None and report.max_abs_diff < ATOL
    assert report.params_after < report.params_before
    assert small.fc3.out_features == 5
    for row in report.layers:
        assert row.before - row.after == row.removed_no_input + row.removed_no_output
    # A fixed point: a second pass finds nothing more to remove.
    again, second = remove_dead_neurons(small, report.masks)
    assert second.iterations == 0 and n_params(again) == n_params(small)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity])
def test_zero_input_neuron_with_bias_is_folded(act):
    torch.manual_seed(0)
    model = mlp(act)
    with torch.no_grad():
        model.fc1.weight[3] = 0
        model.fc1.bias[3] = 0.8  # emits act(0.8) for every input
    x = torch.randn(16, 12)

    small, report = remove_dead_neurons(model)

    assert small.fc1.out_features == 9 and small.fc2.in_features == 9
    assert report.layers[0].removed_no_input == 1
    assert not torch.equal(small.fc2.bias, model.fc2.bias)  # the constant went into the bias
    assert_same_outputs(model, small, x)


def test_fold_creates_bias_when_next_layer_has_none():
    torch.manual_seed(0)
    model = seq(("fc1", nn.Linear(6, 5)), ("act", nn.Sigmoid()), ("fc2", nn.Linear(5, 3, bias=False)))
    with torch.no_grad():
        model.fc1.weight[1] = 0
    x = torch.randn(8, 6)

    small, _ = remove_dead_neurons(model)

    assert model.fc2.bias is None and small.fc2.bias is not None
    assert small.fc1.out_features == 4
    assert_same_outputs(model, small, x)


def test_zero_input_zero_bias_needs_no_fold():
    torch.manual_seed(0)
    model = mlp(bias=False)
    with torch.no_grad():
        model.fc1.weight[0] = 0
    small, report = remove_dead_neurons(model)
    assert small.fc2.bias is None  # ReLU(0) = 0: nothing to fold, so no bias is invented
    assert report.layers[0].removed_no_input == 1
    assert_same_outputs(model, small, torch.randn(8, 12))


def test_zero_output_neurons_removed():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model.fc2.weight[:, [1, 2, 9]] = 0
    x = torch.randn(16, 12)

    small, report = remove_dead_neurons(model)

    assert small.fc1.out_features == 7
    assert report.layers[0].removed_no_output == 3 and report.layers[0].removed_no_input == 0
    assert_same_outputs(model, small, x)


def test_parameter_count_shrinks_by_exact_amount():
    torch.manual_seed(0)
    model = mlp(widths=(12, 10, 8, 4))
    with torch.no_grad():
        model.fc1.weight[[0, 5]] = 0  # 2 fc1 neurons, no input
        model.fc3.weight[:, 6] = 0  # 1 fc2 neuron, no output
    small, report = remove_dead_neurons(model)
    # fc1 neuron: a row of 12 + its bias + a column of 8 in fc2 = 21; fc2 neuron: 8 inputs
    # (fc1 is 8 wide by then: the decisions share a pass, so 10 - 2) + bias + 4 outputs.
    assert report.params_removed == 2 * (12 + 1 + 8) + (10 - 2 + 1 + 4)
    assert report.params_before == n_params(model) and report.params_after == n_params(small)
    assert report.iterations == 1


def test_removal_cascades_to_a_fixed_point():
    torch.manual_seed(0)
    model = mlp(widths=(6, 5, 4, 3))
    with torch.no_grad():
        # Upstream: fc2 neuron 0 has no output; it was the only user of fc1 neuron 1, so once
        # it is gone fc1 neuron 1 has no output either.
        model.fc3.weight[:, 0] = 0
        model.fc2.weight[1:, 1] = 0
        # Downstream: fc1 neuron 3 has no input; fc2 neuron 2 listens to it alone, so once its
        # column is gone fc2 neuron 2 has no input either (a constant folded into fc3).
        model.fc1.weight[3] = 0
        model.fc2.weight[2] = 0
        model.fc2.weight[2, 3] = 0.7
    x = torch.randn(16, 6)

    small, report = remove_dead_neurons(model)

    assert report.iterations == 2
    assert (small.fc1.out_features, small.fc2.out_features, small.fc3.out_features) == (3, 2, 3)
    assert [(r.removed_no_input, r.removed_no_output) for r in report.layers] == [(1, 1), (1, 1), (0, 0)]
    assert_same_outputs(model, small, x)


def test_final_layer_outputs_never_removed():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model.fc3.weight.zero_()  # every logit is a constant, and every fc2 neuron has no output
    small, report = remove_dead_neurons(model)
    assert small.fc3.out_features == 4
    assert small.fc2.out_features == 1  # one neuron kept so the layer exists
    assert report.layers[-1].dead_kept == 4
    assert_same_outputs(model, small, torch.randn(8, 12))


def test_a_layer_is_never_emptied():
    torch.manual_seed(0)
    model = mlp(nn.Sigmoid)
    with torch.no_grad():
        model.fc2.weight.zero_()  # all of fc2 is constant, all of fc1 has no output
    small, _ = remove_dead_neurons(model)
    assert small.fc1.out_features == 1 and small.fc2.out_features == 1
    assert_same_outputs(model, small, torch.randn(8, 12))


def test_input_model_and_masks_unchanged():
    torch.manual_seed(0)
    model = small_cnn()
    masks = random_masks(model, 3)
    bake(model, masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks_before = {k: v.clone() for k, v in masks.items()}
    model.train()

    small, _ = remove_dead_neurons(model, masks, example_input=torch.randn(2, 3, 12, 12))

    assert model.training and small.training  # modes restored after the check run
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    for key, mask in masks.items():
        assert torch.equal(mask, masks_before[key])
    assert all(p is not q for p in small.parameters() for q in model.parameters())


def test_masks_sliced_consistently():
    torch.manual_seed(0)
    model = small_cnn()
    randomise_biases(model, 1)
    masks = {k: v.bool() for k, v in random_masks(model, 1).items()}
    masks["fc1.bias"] = torch.ones(16, dtype=torch.bool)
    bake(model, masks)

    small, report = remove_dead_neurons(model, masks)

    assert report.masks is not None and report.masks.keys() == masks.keys()
    params = dict(small.named_parameters())
    for key, mask in report.masks.items():
        assert mask.dtype == torch.bool
        assert mask.shape == params[key].shape
        assert not params[key][~mask].any()  # still baked
    # The sliced masks describe the same dead neurons as the sliced weights.
    assert find_dead_neurons(small, report.masks) == find_dead_neurons(small)
    assert_same_outputs(model, small, torch.randn(4, 3, 12, 12))


def test_fold_into_pruned_bias_revives_its_mask():
    torch.manual_seed(0)
    model = mlp()
    masks = {"fc1.weight": torch.ones(10, 12), "fc2.bias": torch.zeros(8)}
    masks["fc1.weight"][4] = 0
    bake(model, masks)
    small, report = remove_dead_neurons(model, masks)
    assert torch.equal(report.masks["fc2.bias"] != 0, small.fc2.bias != 0)
    assert_same_outputs(model, small, torch.randn(8, 12))


def test_unbaked_masks_are_rejected():
    model = mlp()
    masks = {"fc1.weight": torch.zeros(10, 12)}
    with pytest.raises(ValueError, match="bake"):
        remove_dead_neurons(model, masks)
    with pytest.raises(ValueError, match="names no parameter"):
        find_dead_neurons(model, {"fc9.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        find_dead_neurons(model, {"fc1.weight": torch.ones(12, 10)})


# --------------------------------------------------------------------------- convolutions


def test_lenet5_dead_channels_exact():
    torch.manual_seed(0)
    model = create_model("lenet_5").eval()
    randomise_biases(model, 0)
    with torch.no_grad():
        model.conv1.weight[[2, 11]] = 0  # constant channels through pool1 into conv2 (padding 0): folded
        model.conv2.weight[:, 5] = 0  # conv1 channel 5 has no output
        model.conv2.weight[7] = 0  # constant channel through pool2 and flatten: folded into fc1
        model.fc1.weight[:, 20 * 16 : 21 * 16] = 0  # conv2 channel 20 has no output
        model.fc2.weight[:, 100] = 0  # fc1 neuron 100 has no output
    x = torch.randn(4, 1, 28, 28)

    small, report = remove_dead_neurons(model, example_input=x)

    assert (small.conv1.out_channels, small.conv2.in_channels) == (17, 17)
    assert (small.conv2.out_channels, small.fc1.in_features) == (48, 48 * 16)
    assert (small.fc1.out_features, small.fc2.out_features) == (499, 10)
    # conv1: 3 filters of 25 + bias; conv2 loses those 3 input channels (50 * 25 each) and
    # then 2 filters of 17 * 25 + bias; fc1 loses 2 blocks of 16 columns and a row of 768 + bias;
    # fc2 loses a column.
    expected = 3 * 26 + 3 * 50 * 25 + 2 * (17 * 25 + 1) + 2 * 16 * 500 + (768 + 1) + 10
    assert report.params_removed == expected
    assert_same_outputs(model, small, x)
    assert report.max_abs_diff < ATOL


def test_cnn_zero_input_channel_into_padded_conv_kept():
    """A constant channel meets zero padding at the next conv's borders: no exact fold, so it stays."""
    torch.manual_seed(0)
    model = small_cnn(padding=1)
    with torch.no_grad():
        model.conv1.weight[[1, 4]] = 0
        model.conv1.bias[1] = 0.5  # ReLU(0.5) != 0: kept
        model.conv1.bias[4] = -0.5  # ReLU(-0.5) == 0: contributes nothing, removed
        model.conv2.weight[3] = 0  # through pool2 and flatten into fc1: folded even with padding
        model.conv2.bias[3] = 0.9
    x = torch.randn(4, 3, 12, 12)

    small, report = remove_dead_neurons(model)

    assert small.conv1.out_channels == 5 and small.conv2.out_channels == 7
    assert report.layers[0].dead_kept == 1
    assert_same_outputs(model, small, x)


def test_avgpool_with_zero_padding_blocks_folding():
    torch.manual_seed(0)
    model = seq(
        ("conv1", nn.Conv2d(2, 4, 3)),
        ("pool", nn.AvgPool2d(3, stride=2, padding=1)),  # border windows average in zeros
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4 * 4 * 4, 3)),
    )
    with torch.no_grad():
        model.conv1.weight[2] = 0
        model.conv1.bias[2] = 1.0
    small, _ = remove_dead_neurons(model)
    assert small.conv1.out_channels == 4
    model.pool.count_include_pad = False  # now the average of a constant is the constant
    small, _ = remove_dead_neurons(model)
    assert small.conv1.out_channels == 3
    assert_same_outputs(model, small, torch.randn(4, 2, 10, 10))


def test_batchnorm_sliced_and_folded():
    torch.manual_seed(0)
    model = seq(
        ("conv1", nn.Conv2d(3, 6, 3)),
        ("bn1", nn.BatchNorm2d(6)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(6, 6, 3)),
        ("bn2", nn.BatchNorm2d(6)),
        ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(24, 10)),
        ("bn3", nn.BatchNorm1d(10)),
        ("relu3", nn.Tanh()),
        ("fc2", nn.Linear(10, 3)),
    )
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0, 1)  # positive: constant channels survive the ReLU
        model.conv1.weight[0] = 0
        model.conv2.weight[:, 4] = 0
        model.conv2.weight[2] = 0
        model.fc1.weight[5] = 0
        model.fc2.weight[:, 7] = 0
    x = torch.randn(4, 3, 10, 10)

    small, _ = remove_dead_neurons(model)

    assert small.bn1.num_features == small.conv1.out_channels == 4
    assert small.bn2.running_mean.shape == (5,) and small.fc1.in_features == 20
    assert small.bn3.weight.shape == (8,)
    assert_same_outputs(model, small, x)


def test_lrn_boundary_left_alone():
    torch.manual_seed(0)
    model = seq(
        ("conv1", nn.Conv2d(3, 8, 3)),
        ("relu1", nn.ReLU()),
        ("norm1", nn.LocalResponseNorm(3)),  # mixes neighbouring channels
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 8, 3)),
        ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(8 * 3 * 3, 12)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(12, 4)),
    )
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv2.weight[:, 6] = 0
        model.conv2.weight[3] = 0
        model.fc2.weight[:, 2] = 0
    x = torch.randn(4, 3, 12, 12)

    small, report = remove_dead_neurons(model)

    assert small.conv1.out_channels == 8 and small.conv2.in_channels == 8  # across LRN: untouched
    assert small.conv2.out_channels == 7 and small.fc1.out_features == 11  # elsewhere: shrunk
    assert len(report.boundaries) == 1 and "LocalResponseNorm" in report.boundaries[0]
    assert find_dead_neurons(model)["conv1"] == DeadNeurons([1], [], None)
    assert_same_outputs(model, small, x)


def test_grouped_conv_is_a_boundary():
    torch.manual_seed(0)
    model = seq(
        ("conv1", nn.Conv2d(2, 4, 3)),
        ("conv2", nn.Conv2d(4, 4, 3, groups=2)),
        ("conv3", nn.Conv2d(4, 4, 3)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4 * 4 * 4, 2)),
    )
    with torch.no_grad():
        model.conv1.weight[0] = 0
        model.conv2.weight[1] = 0
        model.conv3.weight[2] = 0
    small, report = remove_dead_neurons(model)
    assert [small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels] == [4, 4, 3]
    assert len(report.boundaries) == 2 and all("grouped" in note for note in report.boundaries)
    assert_same_outputs(model, small, torch.randn(2, 2, 10, 10))


def test_alexnet_boundaries_and_fc_links():
    model = create_model("alexnet", num_classes=10)
    dead = find_dead_neurons(model)
    assert list(dead) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert [dead[name].next_layer for name in dead] == [None] * 5 + ["fc7", "fc8", None]


def test_lenet_300_100_with_dropout():
    torch.manual_seed(0)
    model = create_model("lenet_300_100", dropout=0.5).eval()
    masks = random_masks(model, 0)
    bake(model, masks)
    x = torch.randn(8, 1, 28, 28)
    small, report = remove_dead_neurons(model, masks, example_input=x)
    assert small.fc1.out_features < 300 and small.fc3.out_features == 10
    assert report.max_abs_diff < ATOL
    assert_same_outputs(model, small, x)


# --------------------------------------------------------------------------- structure


def test_nested_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Linear(8, 5)), nn.Sigmoid()),
        nn.Linear(5, 2),
    ).eval()
    with torch.no_grad():
        model[0][0].weight[3] = 0
        model[2].weight[:, 1] = 0
    masks = {"1.0.0.weight": (model[1][0][0].weight != 0).float()}
    small, report = remove_dead_neurons(model, masks)
    assert list(find_dead_neurons(model)) == ["0.0", "1.0.0", "2"]
    assert small[0][0].out_features == 7 and small[1][0][0].out_features == 4
    assert report.masks["1.0.0.weight"].shape == (4, 7)
    assert_same_outputs(model, small, torch.randn(8, 6))


def test_non_sequential_model_raises():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x) + x)  # a residual: not a chain

    with pytest.raises(ValueError, match="nn.Sequential"):
        remove_dead_neurons(Net())
    with pytest.raises(ValueError, match="nn.Sequential"):
        find_dead_neurons(Net())


def test_unknown_module_inside_sequential_is_a_boundary():
    class Scale(nn.Module):
        def forward(self, x):
            return x.flip(1)  # reorders features: neuron identity is lost

    torch.manual_seed(0)
    model = seq(("fc1", nn.Linear(4, 6)), ("scale", Scale()), ("fc2", nn.Linear(6, 2)))
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
    small, report = remove_dead_neurons(model)
    assert small.fc1.out_features == 6
    assert "Scale 'scale'" in report.boundaries[0]


def test_report_table_and_rows():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model.fc1.weight[0] = 0
    _, report = remove_dead_neurons(model)
    rows = report.rows()
    assert rows[0] == {
        "name": "fc1", "before": 10, "after": 9, "removed_no_input": 1, "removed_no_output": 0, "dead_kept": 0
    }
    assert "fc1" in report.table() and "parameters" in report.table()
