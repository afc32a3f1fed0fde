"""Sparse inference: pruned layers that never materialise their dense weight.

:class:`SparseLinear` keeps a Linear layer's weight as a ``torch.sparse`` CSR
matrix (rows: output features) and computes ``W x`` from the survivors alone;
:class:`SparseConv2d` does the same for a convolution through im2col
(``F.unfold``), one CSR product per batch. :func:`sparsify` replaces each
pruned layer of a model by its sparse twin only where that is faster: it times
both on an input of the layer's real shape and keeps the dense layer otherwise,
so a sparse model is never slower than the dense one layer by layer. The
choice is in each module's repr and in :func:`plan`.

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> model = create_model("lenet_300_100")       # or prunet.load("lenet.prunet")
    >>> pruner = Pruner(model)
    >>> _ = pruner.prune(Sparsity(0.94))
    >>> model = sparsify(pruner.bake(), torch.zeros(1, 1, 28, 28))
    >>> plan(model)  # timed on this machine: each layer 'sparse CSR' or 'dense'
    {'fc1': '...', 'fc2': '...', 'fc3': '...'}
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunet.layers import find_layers, is_hf_conv1d

# torch warns once per process that CSR support is "beta"; the products used here are long-standing.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a CSR matrix of its survivors.

    Args:
        linear: the (baked) Linear layer, or Hugging Face ``Conv1D`` (its weight stored
            transposed); its zero weights are the pruned ones.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        weight = linear.weight.detach()
        weight = weight.t() if is_hf_conv1d(linear) else weight  # Conv1D holds (in, out)
        self.out_features, self.in_features = weight.shape
        self.kept = int(torch.count_nonzero(weight))
        self.register_buffer("weight", weight.to_sparse_csr(), persistent=False)  # (out, in)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # (B, in)
        y = torch.sparse.mm(self.weight, flat.t()).t()  # (out, in) @ (in, B) -> (B, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return f"in_features={self.in_features}, out_features={self.out_features}, sparse CSR, " \
               f"{100 * self.kept / total:.1f}% kept"


class SparseConv2d(nn.Module):
    """A 2-d convolution as im2col and one CSR product: ``W (out, in*kh*kw) @ cols``.

    Args:
        conv: the (baked) Conv2d layer, ``groups == 1``, zero padding.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d takes convolutions with groups=1 and numeric zero padding")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        weight = conv.weight.detach()
        self.kept, self.total = int(torch.count_nonzero(weight)), weight.numel()
        self.register_buffer("weight", weight.reshape(weight.shape[0], -1).to_sparse_csr(), persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        kh, kw = self.kernel_size
        out_h = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, in*kh*kw, L)
        L = cols.shape[-1]
        flat = cols.transpose(0, 1).reshape(cols.shape[1], B * L)  # (in*kh*kw, B*L)
        y = torch.sparse.mm(self.weight, flat)  # (out, B*L)
        y = y.reshape(self.out_channels, B, L).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        return y.reshape(B, self.out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, sparse CSR (im2col), " \
               f"{100 * self.kept / self.total:.1f}% kept"


def sparse_twin(module: nn.Module) -> nn.Module | None:
    """The sparse replacement of a Linear, HF Conv1D or Conv2d layer, or None where there is none.

    None for attention in-projections, embeddings, grouped or 1-D/3-D convolutions: they run dense.
    """
    if not sparse_twin_type(module):
        return None
    return SparseConv2d(module) if isinstance(module, nn.Conv2d) else SparseLinear(module)


# Larger than the last-level cache of the machines this runs on (32 MiB here): reading it
# between timed calls leaves a layer's weights as cold as the rest of a forward pass does.
_EVICT = torch.empty(0)


def _evict_caches() -> None:
    global _EVICT
    if _EVICT.numel() == 0:
        _EVICT = torch.ones(16 * 2**20)  # 64 MiB
    _EVICT.sum()


def median_seconds(fn: Callable[[], object], repeats: int, cold: bool = False) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call.

    Args:
        cold: evict the caches before each call, as a model's other layers do in a
            real forward pass; a layer timed warm, over and over, looks faster than
            it is whenever its weights fit in the cache.
    """
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cold:
            _evict_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def sparsify(model: nn.Module, example_input: torch.Tensor, repeats: int = 15, margin: float = 0.9) -> nn.Module:
    """Give each pruned Linear / Conv2d layer a sparse kernel where it is faster, in place.

    One forward pass of ``example_input`` records each layer's input; each
    layer is then timed dense and sparse on a random input of that shape (the
    batch of ``example_input``), caches cold, and replaced only when the sparse
    one takes less than ``margin`` of the dense time: a layer too close to call
    stays dense. Last, the whole model is timed both ways on ``example_input``;
    if the sparse one is not faster there (a layer can time differently alone
    than between its neighbours), every layer goes back to dense, so the result
    is never slower than the dense model.

    Args:
        model: a plain model (masks multiplied in), e.g. from :func:`prunet.sparse.load`.
        example_input: a batch at the model's input size; its batch size is the one optimised for.
        repeats: timings per layer and path (the median counts).
        margin: the fraction of the dense time the sparse layer must beat.

    Returns:
        The same model, in eval mode.
    """
    model.eval()
    layers = [layer for layer in find_layers(model) if int(torch.count_nonzero(layer.weight)) < layer.weight.numel()]
    shapes: dict[str, torch.Tensor] = {}  # each layer's first input: its shape, dtype and device

    def record(name: str):
        def hook(module: nn.Module, args) -> None:
            shapes.setdefault(name, args[0])
        return hook

    handles = [layer.module.register_forward_pre_hook(record(layer.layer)) for layer in layers]
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    swapped = []
    for layer in layers:
        twin = sparse_twin(layer.module) if layer.layer in shapes else None  # not run by the example: left alone
        if twin is None:
            continue
        seen = shapes[layer.layer]
        x = torch.randn(seen.shape, dtype=seen.dtype, device=seen.device)
        dense = median_seconds(lambda: layer.module(x), repeats, cold=True)
        sparse = median_seconds(lambda: twin(x), repeats, cold=True)
        if sparse < margin * dense:
            swapped.append((layer, twin))
    if not swapped:
        return model
    dense_model = median_seconds(lambda: model(example_input), repeats, cold=True)
    for layer, twin in swapped:
        model.set_submodule(layer.layer, twin)
    if median_seconds(lambda: model(example_input), repeats, cold=True) >= dense_model:
        for layer, _ in swapped:
            model.set_submodule(layer.layer, layer.module)
    return model


def plan(model: nn.Module) -> dict[str, str]:
    """Layer name -> the path each prunable layer of a (sparsified) model runs.

    ``sparse CSR``; ``dense`` (a sparse kernel exists but was not faster, or the layer is
    not pruned); ``dense (no sparse kernel)`` for a type :func:`sparse_twin` does not cover
    (attention in-projections, embeddings, grouped convolutions).
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            out[name] = "sparse CSR"
    for layer in find_layers(model, include=["all"]):
        if layer.layer not in out:
            out[layer.layer] = "dense" if sparse_twin_type(layer.module) else "dense (no sparse kernel)"
    return out


def sparse_twin_type(module: nn.Module) -> bool:
    """Whether :func:`sparse_twin` has a sparse kernel for ``module``."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)
