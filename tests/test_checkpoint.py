"""Checkpoints: exact round trips (plain, masked, shrunken models), atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from prunet import Pruner, Sparsity, Threshold
from prunet.checkpoint import CheckpointError, load_checkpoint, load_state, read_checkpoint, save_checkpoint
from prunet.models import create_model

META = {"model": "lenet_300_100", "model_kwargs": {}}


def outputs(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_plain_model_round_trip(lenet, tmp_path):
    model = lenet()
    path = save_checkpoint(tmp_path / "dense.safetensors", model, {**META, "phase": "dense"})
    loaded, pruner, meta = load_checkpoint(path)
    assert pruner is None
    assert meta == {**META, "phase": "dense"}
    assert torch.equal(outputs(loaded), outputs(model))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_masked_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_5")
    pruner = Pruner(model)
    pruner.prune(Sparsity({"conv": 0.5, "fc": 0.9}))
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model": "lenet_5", "model_kwargs": {}})
    loaded, loaded_pruner, _ = load_checkpoint(path)
    assert torch.equal(outputs(loaded), outputs(model))
    assert loaded_pruner.compression() == pruner.compression()
    assert set(loaded.state_dict()) == set(model.state_dict())
    for k, mask in pruner.masks.items():
        assert torch.equal(loaded_pruner.masks[k], mask)


def test_model_kwargs_are_used(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_300_100", num_classes=4, dropout=0.3)
    path = save_checkpoint(
        tmp_path / "c.safetensors", model, {"model": "lenet_300_100", "model_kwargs": {"num_classes": 4, "dropout": 0.3}}
    )
    loaded, _, _ = load_checkpoint(path)
    assert loaded.fc3.out_features == 4
    assert loaded.drop1.p == 0.3
    assert torch.equal(outputs(loaded), outputs(model))


def test_save_overwrites_atomically_and_leaves_no_temp_files(lenet, tmp_path):
    path = tmp_path / "sub" / "c.safetensors"  # missing folders are created
    save_checkpoint(path, lenet(seed=0), META)
    save_checkpoint(path, lenet(seed=1), META)
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]
    assert torch.equal(outputs(load_checkpoint(path)[0]), outputs(lenet(seed=1)))


def test_failed_save_keeps_the_previous_checkpoint(lenet, tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, lenet(seed=0), META)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, lenet(seed=1), {**META, "bad": object()})  # not JSON: fails mid-save
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=f"{path}.*does not exist"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_names_the_path(lenet, tmp_path, damage):
    path = save_checkpoint(tmp_path / "c.safetensors", lenet(), META)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "corrupt" in message and "\n" not in message


def test_unreadable_metadata(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"prunet": "{not json"})
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)


def test_checkpoint_without_model_name(lenet, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", lenet(), {})
    with pytest.raises(CheckpointError, match=f"{path}.*which model"):
        load_checkpoint(path)


def test_checkpoint_of_unknown_model(lenet, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", lenet(), {"model": "resnet"})
    with pytest.raises(CheckpointError, match=f"{path}.*unknown model 'resnet'"):
        load_checkpoint(path)


def test_state_that_does_not_fit(lenet, tmp_path):
    state = lenet().state_dict()
    del state["fc3.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"c\.safetensors does not fit the model: missing \['fc3\.bias'\]; "
                                              r"unexpected \['extra'\]"):
        load_state(lenet(), state, "c.safetensors")


def shrunken_lenet(seed: int = 0) -> nn.Sequential:
    """LeNet-300-100 with fc1 cut to 200 units and fc2's input cut to match (as neuron removal leaves it)."""
    model = create_model("lenet_300_100")
    torch.manual_seed(seed)
    model.fc1 = nn.Linear(784, 200)
    model.fc2 = nn.Linear(200, 100)
    return model


def test_shrunken_model_loads_via_resize(tmp_path):
    model = shrunken_lenet()
    path = save_checkpoint(tmp_path / "small.safetensors", model, META)
    loaded, pruner, _ = load_checkpoint(path)
    assert pruner is None
    assert (loaded.fc1.out_features, loaded.fc2.in_features) == (200, 200)
    assert loaded.fc1.weight.shape == (200, 784)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(outputs(loaded), outputs(model))


def test_shrunken_and_masked_model_loads(tmp_path):
    model = shrunken_lenet()
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0))
    path = save_checkpoint(tmp_path / "small.safetensors", model, META)
    loaded, loaded_pruner, _ = load_checkpoint(path)
    assert loaded_pruner.masks["fc1.weight"].shape == (200, 784)
    assert torch.equal(loaded_pruner.masks["fc1.weight"], pruner.masks["fc1.weight"])
    assert torch.equal(outputs(loaded), outputs(model))


def test_shrunken_conv_model_loads(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_5")
    model.conv2 = nn.Conv2d(20, 30, 5)
    model.fc1 = nn.Linear(30 * 16, 500)
    path = save_checkpoint(tmp_path / "small.safetensors", model, {"model": "lenet_5"})
    loaded, _, _ = load_checkpoint(path)
    assert (loaded.conv2.out_channels, loaded.fc1.in_features) == (30, 480)
    assert torch.equal(outputs(loaded), outputs(model))


def test_metadata_is_json_in_the_file(lenet, tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "c.safetensors", lenet(), {**META, "phase": "round2", "x": [1, 2]})
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["prunet"])["x"] == [1, 2]
    _, meta = read_checkpoint(path)
    assert meta["phase"] == "round2"


def test_a_mask_for_a_parameter_the_model_lacks_is_a_checkpoint_error(tmp_path):
    model = create_model("lenet_300_100")
    state = {k: v for k, v in model.state_dict().items()}
    state["fc9.weight_prunet_mask"] = torch.ones(3, 3, dtype=torch.bool)
    save_file(state, str(tmp_path / "c.safetensors"), metadata={"prunet": json.dumps({"model": "lenet_300_100"})})
    with pytest.raises(CheckpointError, match=r"masks for parameters lenet_300_100 does not have \(fc9\.weight\)"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_a_model_too_big_to_build_is_a_checkpoint_error(tmp_path):
    state = create_model("lenet_300_100").state_dict()
    meta = {"model": "lenet_300_100", "model_kwargs": {"num_classes": 10**12}}
    save_file(dict(state), str(tmp_path / "c.safetensors"), metadata={"prunet": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"model_kwargs.num_classes: 1000000000000 is not a whole number"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_a_flipped_bit_in_a_checkpoint_is_an_error_not_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    path = save_checkpoint(tmp_path / "c.safetensors", model, {"model": "lenet_300_100"})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # an exponent bit of the last float
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(path)
