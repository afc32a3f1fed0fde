"""Layers beyond Linear and Conv: attention in-projections, Hugging Face's Conv1D, embeddings.

Pruned, trained with masks exact, shared, exported and loaded back equal; what a path does
not cover is said, not skipped in silence.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunet
from prunet import Pruner, Sparsity
from prunet.analysis.tables import count_flops
from prunet.share import share, shared_layers
from prunet.sparse.modules import plan, sparse_twin


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 defines it (transformers is not needed): weight stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class TinyGPT(nn.Module):
    """Embeddings, a GPT-2-style block of Conv1D layers, a head tied to the token embedding."""

    def __init__(self, vocab: int = 16, dim: int = 16):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_out = Conv1D(dim, 4 * dim)

    def forward(self, ids):
        x = self.wte(ids)  # (B, T, D)
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.c_out(F.gelu(self.c_fc(x)))
        return x @ self.wte.weight.t()  # (B, T, vocab)


def train_steps(model, inputs, loss_of, n: int = 5) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(n):
        opt.zero_grad()
        loss_of(model(inputs)).backward()
        opt.step()


def lm_loss(logits):
    return F.cross_entropy(logits.flatten(0, 1), torch.arange(logits.shape[0] * logits.shape[1]) % logits.shape[-1])


def test_transformer_encoder_is_pruned_whole_and_its_attention_masks_hold_in_training():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0), 2,
                                  enable_nested_tensor=False)
    pruner = Pruner(model)
    assert str(pruner.coverage()) == "prunes 16,384 of 16,384 matrix weights (100.0%)"
    pruner.prune(Sparsity(0.8))
    in_proj = model.layers[0].self_attn.in_proj_weight
    pruned = in_proj.detach() == 0
    assert int(pruned.sum()) == round(0.8 * in_proj.numel())
    train_steps(model, torch.randn(4, 6, 32), lambda y: y.square().mean())
    assert torch.equal(in_proj.detach() == 0, pruned)  # no pruned in-projection weight revived
    assert plan(model)["layers.0.self_attn"] == "dense (no sparse kernel)"


def test_gpt2_style_conv1d_is_pruned_shared_exported_and_loaded_back_equal(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT()
    pruner = Pruner(model)
    assert [t.layer for t in pruner.targets] == ["c_attn", "c_proj", "c_fc", "c_out"]
    assert str(pruner.coverage()) == ("prunes 3,072 of 3,328 matrix weights (92.3%); skipped: embeddings 256 "
                                      "(wte.weight; opt-in: include embed or all)")
    pruner.prune(Sparsity(0.75))
    ids = torch.randint(0, 16, (2, 8))
    train_steps(model, ids, lm_loss)
    assert pruner.compression() == pytest.approx(4.0)
    prunet.save(model, tmp_path / "gpt.safetensors")
    for name, quantize in (("plain", None), ("shared", 4)):
        out = tmp_path / f"gpt_{name}.prunet"
        prunet.export(tmp_path / "gpt.safetensors", out, quantize=quantize, model=TinyGPT())
        back = prunet.load(out, model=TinyGPT())
        for layer in ("c_attn", "c_proj", "c_fc", "c_out"):
            weight = getattr(back, layer).weight.detach()
            assert torch.equal(weight == 0, getattr(model, layer).weight.detach() == 0), layer  # same survivors
            if quantize:
                assert weight.unique().numel() <= 2**quantize + 1, layer  # 16 shared values and zero
        with torch.no_grad():
            if quantize is None:
                assert torch.equal(back(ids), model(ids))
    shared = share(model, 4)
    assert sorted(shared) == ["c_attn.weight", "c_fc.weight", "c_out.weight", "c_proj.weight"]
    assert len(shared_layers(model)) == 4


def test_conv1d_runs_sparse_with_the_same_outputs():
    torch.manual_seed(0)
    layer = Conv1D(12, 8)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.2] = 0
    x = torch.randn(3, 5, 8)
    assert torch.allclose(sparse_twin(layer)(x), layer(x), atol=1e-6)


def test_pruned_embeddings_opt_in_and_are_shared_with_the_rest():
    torch.manual_seed(0)
    model = TinyGPT()
    pruner = Pruner(model, include=["all"])
    assert "wte.weight" in pruner.masks
    assert str(pruner.coverage()) == "prunes 3,328 of 3,328 matrix weights (100.0%)"
    pruner.prune(Sparsity(0.5))
    assert "wte.weight" in share(model, 3)


def test_layer_table_counts_attention_and_conv1d_flops():
    """The FLOP hook read module.weight, which MultiheadAttention lacks: a report of any transformer crashed."""
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 1, enable_nested_tensor=False)
    flops = count_flops(model, torch.randn(1, 5, 32))
    assert flops["layers.0.self_attn"] == 2 * 96 * 32 * 5  # in-projection: (3E, E) for each of 5 tokens
    assert flops["layers.0.linear1"] == 2 * 32 * 64 * 5
    gpt = TinyGPT()
    assert count_flops(gpt, torch.randint(0, 16, (1, 4)))["c_attn"] == 2 * 16 * 48 * 4  # Conv1D (in, out) = (16, 48)
