"""prunet beside torch.nn.utils.prune: distinct buffer names, no revived weights, a clear error, old files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from safetensors.torch import save_file

from prunet import Pruner, Sparsity, create_model
from prunet.checkpoint import load_checkpoint


def steps(model, n: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        loss = F.cross_entropy(model(torch.randn(8, 1, 28, 28, generator=g)), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_torch_pruning_after_prunet_revives_no_weight():
    """torch's weight_mask used to replace prunet's: 32 kept became 44 non-zero after 3 SGD steps."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.9))
    prunet_mask = model.fc3.weight_prunet_mask.clone()
    torch_prune.l1_unstructured(model.fc3, "weight", amount=0.2)  # torch's own mask, beside prunet's
    steps(model)
    weight = model.fc3.weight.detach()
    assert int(torch.count_nonzero(weight[prunet_mask == 0])) == 0
    assert torch.equal(model.fc3.weight_prunet_mask, prunet_mask)


def test_prunet_on_a_layer_under_torch_pruning_is_an_error_naming_the_fix():
    model = create_model("lenet_300_100")
    torch_prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"'fc1' is pruned by torch.nn.utils.prune .*prune.remove\(layer, 'weight'\)"):
        Pruner(model)
    torch_prune.remove(model.fc1, "weight")  # the fix the message names
    pruner = Pruner(model)
    assert [t.layer for t in pruner.targets] == ["fc1", "fc2", "fc3"]


def test_a_checkpoint_with_the_old_mask_names_still_loads_with_its_masks(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.8))
    state = {k.replace("_prunet_mask", "_mask"): v.detach().contiguous() for k, v in model.state_dict().items()}
    state = {k: v.bool() if k.endswith("_mask") else v for k, v in state.items()}
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"prunet": json.dumps({"model": "lenet_300_100"})})
    back, reloaded, _ = load_checkpoint(tmp_path / "old.safetensors")
    for name, mask in pruner.masks.items():
        assert torch.equal(reloaded.masks[name], mask), name
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
