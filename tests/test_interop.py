"""prunet beside torch.nn.utils.prune: distinct buffer names, no revived weights, a clear error, old files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from safetensors.torch import save_file

import prunet
from prunet import Pruner, Sparsity, create_model
from prunet.checkpoint import load_checkpoint
from prunet.cli import main


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


# --- torch files and sparsity made elsewhere ----------------------------------------------------------


def pruned_lenet(sparsity: float = 0.9):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    Pruner(model).prune(Sparsity(sparsity))
    return model


def test_a_torch_saved_state_dict_exports_with_model_and_loads_back_equal(tmp_path, capsys):
    """The README's torch.save(model.state_dict()) then prunet export used to fail: 'header too large'."""
    model = pruned_lenet()
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    out = tmp_path / "x.prunet"
    assert main(["export", str(tmp_path / "pruned.pt"), "-o", str(out), "--model", "lenet_300_100"]) == 0
    back = prunet.load(out, model=create_model("lenet_300_100"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert out.stat().st_size < (tmp_path / "pruned.pt").stat().st_size / 4  # survivors only, masks as positions


def test_a_torch_saved_state_dict_is_evaluated_with_model_and_dataset(tmp_path, capsys):
    torch.save(pruned_lenet().state_dict(), tmp_path / "pruned.pt")
    assert main(["eval", str(tmp_path / "pruned.pt"), "--model", "lenet_300_100", "--dataset", "fashion-mnist",
                 "--batch-sizes", "1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "pruned.pt"), "--model", "no_such_net", "--dataset", "fashion-mnist"]) == 2
    assert "--model no_such_net:" in capsys.readouterr().err


def test_a_state_dict_that_names_no_model_is_one_line_naming_the_flag(tmp_path, capsys):
    torch.save(pruned_lenet().state_dict(), tmp_path / "pruned.pt")
    assert main(["export", str(tmp_path / "pruned.pt"), "-o", str(tmp_path / "x.prunet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "does not say which model it holds; name it: --model module:function" in err
    assert not (tmp_path / "x.prunet").exists()


def test_a_pickled_model_is_refused_in_one_line_that_says_what_to_save(tmp_path, capsys):
    torch.save(pruned_lenet(), tmp_path / "whole.pt")  # pickles the module: loading it would run code
    assert main(["export", str(tmp_path / "whole.pt"), "-o", str(tmp_path / "x.prunet"), "--model",
                 "lenet_300_100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "prunet reads only as a state dict of tensors" in err and "torch.save(model.state_dict(), path)" in err


def test_a_state_dict_saved_under_torch_pruning_comes_with_its_masks(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    torch_prune.l1_unstructured(model.fc1, "weight", amount=0.7)
    torch.save(model.state_dict(), tmp_path / "torch_pruned.pt")
    back, pruner, _ = load_checkpoint(tmp_path / "torch_pruned.pt", model=create_model("lenet_300_100"))
    assert torch.equal(pruner.masks["fc1.weight"].bool(), model.fc1.weight_mask.bool())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_torch_pruning_then_prunet_from_torch_prune_revives_no_weight():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    torch_prune.global_unstructured([(model.fc1, "weight"), (model.fc2, "weight")], torch_prune.L1Unstructured,
                                    amount=0.8)
    torch_prune.l1_unstructured(model.fc2, "bias", amount=0.5)
    masks = {"fc1.weight": model.fc1.weight_mask.clone(), "fc2.weight": model.fc2.weight_mask.clone(),
             "fc2.bias": model.fc2.bias_mask.clone()}
    pruner = Pruner.from_torch_prune(model)
    assert [t.param for t in pruner.targets] == ["fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight"]
    assert not any(n.endswith(("_orig", ".weight_mask", ".bias_mask")) for n in model.state_dict())
    steps(model)
    for name, mask in masks.items():
        assert torch.equal(pruner.masks[name].bool(), mask.bool()), name
        assert int(torch.count_nonzero(model.get_parameter(name).detach()[mask == 0])) == 0, name
    assert int(model.fc3.weight_prunet_mask.sum()) == model.fc3.weight.numel()  # not pruned by torch: all kept


def test_zeros_left_by_torch_prune_remove_count_as_pruned_with_from_zeros():
    """After torch.nn.utils.prune.remove, Pruner(model) counts the zeros as kept; from_zeros prunes them."""
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    torch_prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    torch_prune.remove(model.fc1, "weight")
    zeros = model.fc1.weight.detach() == 0
    pruner = Pruner.from_zeros(model)
    assert pruner.summary()[0].kept == model.fc1.weight.numel() - int(zeros.sum())
    steps(model)
    assert torch.equal(model.fc1.weight.detach() == 0, zeros)


def test_pruner_state_dict_restores_the_masks_in_a_fresh_model():
    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    pruner = Pruner(model, exclude=["fc3"])
    pruner.prune(Sparsity(0.8))
    saved = pruner.state_dict()
    fresh = create_model("lenet_300_100")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_prunet_mask")})
    again = Pruner(fresh, include=saved["include"], exclude=saved["exclude"])
    again.load_state_dict(saved)
    for name, mask in pruner.masks.items():
        assert torch.equal(again.masks[name], mask), name
    steps(fresh)
    assert int(torch.count_nonzero(fresh.fc1.weight.detach()[pruner.masks["fc1.weight"] == 0])) == 0
    with pytest.raises(ValueError, match=r"does not fit: masks for \['fc1.weight', 'fc2.weight'\] not pruned here"):
        Pruner(create_model("lenet_300_100"), include=["fc3"]).load_state_dict(saved)


def test_report_of_a_file_without_a_run_folder(tmp_path, capsys):
    """report needed a run folder; a torch state dict, a checkpoint or a compact file now has one of its own."""
    torch.save(pruned_lenet().state_dict(), tmp_path / "pruned.pt")
    assert main(["report", str(tmp_path / "pruned.pt"), "--model", "lenet_300_100"]) == 0
    md = (tmp_path / "pruned_report" / "report.md").read_text()
    assert "26,620 of 266,200 weights kept, 10.0× fewer" in md and "| Total | 266K |" in md
    assert "<script" not in (tmp_path / "pruned_report" / "report.html").read_text()
    assert main(["report", str(tmp_path / "pruned.pt"), "--model", "lenet_300_100"]) == 0  # its own: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes\n")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "pruned.pt"), "--model", "lenet_300_100", "-o", str(tmp_path / "mine")]) == 2
    assert "is not a report prunet wrote about a file; choose -o" in capsys.readouterr().err
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes\n"
