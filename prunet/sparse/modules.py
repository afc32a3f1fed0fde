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
    >>> plan(model)  # timed on this machine: each layer 'sparse CSR (...)' or 'dense (...)', and why
    {'fc1': '...', 'fc2': '...', 'fc3': '...'}
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

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


def paired_seconds(dense: Callable[[], object], sparse: Callable[[], object], repeats: int,
                   prepare: Callable[[bool], object] | None = None) -> list[tuple[float, float]]:
    """``repeats`` pairs (dense seconds, sparse seconds), caches cold before each call, the order alternating.

    Timed in pairs so that a burst of load on the machine slows both of a pair alike: the ratio
    within a pair is steadier than a ratio of two medians timed one after the other.

    Args:
        prepare: called, untimed, before each call with whether the sparse one comes next.
    """
    dense(), sparse()  # warm-up
    pairs = []
    for i in range(repeats):
        took = {}
        for is_sparse in ((False, True) if i % 2 == 0 else (True, False)):
            if prepare is not None:
                prepare(is_sparse)
            _evict_caches()
            start = time.perf_counter()
            (sparse if is_sparse else dense)()
            took[is_sparse] = time.perf_counter() - start
        pairs.append((took[False], took[True]))
    return pairs


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided for one layer (or the whole model), and why, in words."""

    sparse: bool
    ratio: float  # median of sparse / dense over the pairs
    reason: str


def choose(pairs: Sequence[tuple[float, float]], margin: float = 0.9) -> Choice:
    """Sparse only when it is clearly faster: a pure rule over paired timings (dense s, sparse s).

    The sparse path is chosen when even the upper quartile of the per-pair ratios sparse / dense
    is below ``margin``: three pairs in four must beat the margin, not just the median, so a
    layer near the line stays dense run after run instead of flipping with the machine's noise.
    The reason gives the median ratio.

    Example:
        >>> choose([(1.0, 0.5)] * 8).reason
        'sparse CSR (0.50x of dense time)'
        >>> choose([(1.0, 0.5)] * 5 + [(1.0, 0.95)] * 3).reason
        'dense (sparse 0.50x of dense time, not clearly under 0.9x)'
        >>> choose([(1.0, 1.2)] * 8).reason
        'dense (sparse 1.20x of dense time)'
    """
    if not pairs:
        raise ValueError("choose needs at least one pair of timings")
    ratios = sorted(s / d for d, s in pairs)
    median = statistics.median(ratios)
    upper = ratios[min(len(ratios) - 1, (3 * len(ratios)) // 4)]
    if upper < margin:
        return Choice(True, median, f"sparse CSR ({median:.2f}x of dense time)")
    close = f", not clearly under {margin:g}x" if median < margin else ""
    return Choice(False, median, f"dense (sparse {median:.2f}x of dense time{close})")


@torch.no_grad()
def sparsify(model: nn.Module, example_input: torch.Tensor, repeats: int = 15, margin: float = 0.9) -> nn.Module:
    """Give each pruned Linear / Conv2d layer a sparse kernel where it is clearly faster, in place.

    One forward pass of ``example_input`` records each layer's input; each layer
    is then timed dense and sparse on a random input of that shape (the batch of
    ``example_input``), in interleaved pairs with caches cold, and replaced only
    when :func:`choose` finds the sparse one clearly under ``margin`` of the dense
    time: a layer too close to call stays dense, so the plan is the same run after
    run. Last, the whole model is timed both ways on ``example_input``; unless the
    sparse one is clearly faster there too (a layer can time differently alone than
    between its neighbours), every layer goes back to dense, so the result is never
    slower than the dense model. :func:`plan` says what was chosen and why.

    Args:
        model: a plain model (masks multiplied in), e.g. from :func:`prunet.sparse.load`.
        example_input: a batch at the model's input size; its batch size is the one optimised for.
        repeats: timed pairs per layer (and for the whole model).
        margin: the fraction of the dense time the sparse layer must clearly beat.

    Returns:
        The same model, in eval mode.
    """
    model.eval()
    layers = [layer for layer in find_layers(model) if sparse_twin_type(layer.module)]
    inputs = _layer_inputs(model, example_input, [layer.layer for layer in layers])
    swapped = []
    for layer in layers:
        module, seen = layer.module, inputs.get(layer.layer)
        if seen is None or int(torch.count_nonzero(module.weight)) == module.weight.numel():
            module._prunet_plan = "dense (not pruned)" if seen is not None else "dense (not run by the example)"
            continue
        twin = sparse_twin(module)
        x = torch.randn(seen.shape, dtype=seen.dtype, device=seen.device)
        choice = choose(paired_seconds(lambda: module(x), lambda: twin(x), repeats), margin)
        module._prunet_plan = twin._prunet_plan = choice.reason
        if choice.sparse:
            swapped.append((layer, twin, choice))
    if swapped:
        _keep_if_faster(model, example_input, swapped, repeats)
    return model


def _layer_inputs(model: nn.Module, example_input: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Each named layer's first input in one forward pass of ``example_input``: its shape, dtype and device."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args) -> None:
            seen.setdefault(name, args[0])
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _keep_if_faster(model: nn.Module, example_input: torch.Tensor, swapped: list, repeats: int) -> None:
    """Put the sparse layers ``(layer, twin, choice)`` in; take them all out again unless the whole
    model is clearly faster so (:func:`choose` with a margin of 1)."""

    def use(sparse: bool) -> None:
        for layer, twin, _ in swapped:
            model.set_submodule(layer.layer, twin if sparse else layer.module)

    def run() -> object:
        return model(example_input)

    whole = choose(paired_seconds(run, run, repeats, prepare=use), margin=1.0)
    use(whole.sparse)
    if not whole.sparse:
        for layer, _, choice in swapped:
            layer.module._prunet_plan = f"dense (sparse {choice.ratio:.2f}x of dense time alone, " \
                                        f"but the whole model {whole.ratio:.2f}x)"


def plan(model: nn.Module) -> dict[str, str]:
    """Layer name -> the path each prunable layer of a (sparsified) model runs, and why.

    ``sparse CSR (0.45x of dense time)``; ``dense (sparse 0.93x of dense time, not clearly under
    0.9x)``, ``dense (sparse 1.20x of dense time)``, ``dense (sparse 0.80x of dense time alone,
    but the whole model 1.02x)``, ``dense (not pruned)`` as :func:`sparsify` decided;
    ``dense (no sparse kernel)`` for a type :func:`sparse_twin` does not cover (attention
    in-projections, embeddings, grouped convolutions); plain ``dense`` for a layer
    :func:`sparsify` never looked at. The path is the text before the parenthesis.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            out[name] = getattr(module, "_prunet_plan", "sparse CSR")
    for layer in find_layers(model, include=["all"]):
        if layer.layer not in out:
            if not sparse_twin_type(layer.module):
                out[layer.layer] = "dense (no sparse kernel)"
            else:
                out[layer.layer] = getattr(layer.module, "_prunet_plan", "dense")
    return out


def sparse_twin_type(module: nn.Module) -> bool:
    """Whether :func:`sparse_twin` has a sparse kernel for ``module``."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)
