"""Sparse inference: pruned layers that never materialise their dense weight.

:class:`SparseLinear` packs a Linear layer's survivors in prunet's own CSR format
(rows: output features; uint16 columns; float32, fp16 or codebook values) and
computes ``W x`` from them with the native kernel (:mod:`prunet.sparse.native`),
or with torch's CSR product where the kernel is not built or cannot take the
input; :class:`SparseSequential` runs a chain of them (ReLU fused) in one native
call; :class:`SparseConv2d` does a convolution through im2col (``F.unfold``),
one CSR product per batch. :func:`sparsify` replaces each pruned layer of a
model by its sparse twin only where that is faster: it times both on an input
of the layer's real shape and keeps the dense layer otherwise, then times the
whole model, so a sparse model is never slower than the dense one. The choice
is in each module's repr and in :func:`plan`.

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> model = create_model("lenet_300_100")       # or prunet.load("lenet.prunet")
    >>> pruner = Pruner(model)
    >>> _ = pruner.prune(Sparsity(0.94))
    >>> model = sparsify(pruner.bake(), torch.zeros(1, 1, 28, 28))
    >>> plan(model)  # timed on this machine: each layer 'sparse native f32 (...)' or 'dense (...)', and why
    {'fc1': '...', 'fc2': '...', 'fc3': '...'}
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from prunet.layers import find_layers, is_hf_conv1d
from prunet.sparse import native
from prunet.sparse.native import Chain, Packed, Step
from prunet.sparse.plans import PlanCache, layer_entry, model_entry

# torch warns once per process that CSR support is "beta"; the products used here are long-standing.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda x: False)
_is_tracing = torch._C._is_tracing  # what torch.jit.is_tracing() returns outside TorchScript, without its Python


class SparseLinear(nn.Module):
    """``y = x W^T + b`` computed from the survivors of ``W`` alone.

    ``W`` is packed as CSR in prunet's own format (:func:`prunet.sparse.native.pack`: uint16
    columns; float32, fp16 or codebook values, the smallest that holds the weights exactly) and
    run by the native kernel (:mod:`prunet.sparse.native`) where it is built, the layer has at
    most 65536 inputs and the input is float32 on the CPU. Otherwise (no kernel, another dtype
    or device, an input that needs gradients, a sparse, forward-AD or functorch input, under
    ``torch.jit.trace``) torch's CSR product runs it, on the same values. The kernel always reads
    the layer's buffers as they are now (moved to shared memory, reassigned, converted).

    Outputs equal the dense layer's for finite inputs; a NaN or inf input at a pruned connection
    does not propagate (neither product reads a pruned weight, so NaN * 0 is never computed),
    where the dense layer would give NaN.

    Args:
        linear: the (baked) Linear layer, or Hugging Face ``Conv1D`` (its weight stored
            transposed); its zero weights are the pruned ones.
        use_native: run the native kernel; default: where it is available. ``False``: torch CSR always.
        values: the value format, ``f32``, ``fp16`` or ``codebook``; default the smallest exact one.

    Attributes:
        kernel: ``native f32``, ``native fp16``, ``native codebook`` or ``CSR`` (torch's product): what runs
            now. A layer built on the kernel and copied or loaded where the library is missing or refused
            (:func:`prunet.sparse.native.status`) reads ``CSR``, and runs torch's product.

    Example:
        >>> lin = nn.Linear(300, 40)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
        >>> sparse = SparseLinear(lin)
        >>> sparse.kernel  # doctest: +SKIP
        'native f32'
        >>> sparse.kernel in ("native f32", "CSR")  # CSR: torch's product, where the kernel is not built
        True
        >>> x = torch.randn(3, 300)
        >>> torch.allclose(sparse(x), lin(x), atol=1e-5), torch.allclose(sparse(x.double()), lin.double()(x.double()))
        (True, True)
    """

    def __init__(self, linear: nn.Module, use_native: bool | None = None, values: str | None = None):
        super().__init__()
        object.__setattr__(self, "_buffers", _Buffers())
        weight = linear.weight.detach()
        weight = weight.t() if is_hf_conv1d(linear) else weight  # Conv1D holds (in, out)
        self.out_features, self.in_features = weight.shape
        packed = native.pack(weight, values)
        self.kept = packed.values.numel()
        self.values_kind = packed.kind
        for name in ("row_ptr", "cols", "values", "codebook"):
            self.register_buffer(name, getattr(packed, name).to(weight.device), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        why_not = None if native.available() else native.status()
        if not (packed.native and min(weight.shape) > 0):
            why_not = f"the kernel takes layers of 1 to {native.MAX_IN_FEATURES} inputs on the CPU"
        if use_native and why_not:
            raise ValueError(f"SparseLinear(use_native=True): {why_not}")
        self.kernel = "CSR" if why_not or use_native is False else f"native {packed.kind}"
        self._cache: dict[str, object] = {}

    @property
    def kernel(self) -> str:
        """The kernel chosen when built, or ``CSR`` where the native library is not available now."""
        return self._kernel if self._kernel == "CSR" or native.available() else "CSR"

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._kernel = value

    def packed(self) -> Packed:
        """The layer's weight in the native kernel's format, from the module's (current) buffers."""
        return Packed(self.row_ptr, self.cols, self.values, self.codebook, self.values_kind,
                      (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout != torch.strided:  # a sparse input, as nn.Linear takes: torch's product on its dense form
            x = x.to_dense()
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # reshape(-1, in) would take an empty batch of any width
            raise RuntimeError(f"SparseLinear takes inputs of {self.in_features} features, got shape {tuple(x.shape)}")
        chain = self.native_chain(x)
        if chain is not None and x.dim() == 2:
            return chain.run(x)  # the common case, without the reshapes: each costs microseconds cold
        if chain is None and forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None:
            primal, tangent = forward_ad.unpack_dual(x)  # torch's sparse products have no forward AD: y is linear
            return forward_ad.make_dual(self.forward(primal), self._csr_product(tangent, bias=False))
        if chain is not None:
            return chain.run(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return self._csr_product(x)

    def _csr_product(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """torch's CSR product on ``x`` (..., in), with the bias or without."""
        flat = x.reshape(-1, self.in_features)  # (B, in)
        y = torch.sparse.mm(self._csr(flat), flat.t()).t()  # (out, in) @ (in, B) -> (B, out)
        if bias and self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def native_chain(self, x: torch.Tensor) -> Chain | None:
        """The native kernel for this layer, or None where it cannot run ``x`` (or the layer, as its
        buffers now are: moved to another device or dtype)."""
        if self.kernel == "CSR" or not native_input(x) or x.shape[-1] != self.in_features:
            return None
        built = self._cache.get("chain")  # (the buffer generation it was built at, the chain or None: cannot be)
        if built is None or built[0] != _generation[0]:
            built = self._cache["chain"] = _generation[0], _chain([self], [False])
        chain = built[1]  # the width its buffers describe, not the attribute (which a user can reassign)
        return chain if chain is not None and chain.in_features == x.shape[-1] else None

    def _csr(self, x: torch.Tensor) -> torch.Tensor:
        """torch's CSR matrix of the weight in ``x``'s dtype, on its device; built again after the buffers
        change (reassigned, or in place: their version counters)."""
        key, stamp = f"csr {x.dtype} {x.device}", (_generation[0], _versions(self._buffers.values()))
        cached = self._cache.get(key)
        if cached is None or cached[0] != stamp:
            cached = self._cache[key] = stamp, self.packed().csr(x.dtype, x.device)
        return cached[1]

    def _apply(self, *args, **kwargs):
        self._cache = {}  # the buffers move or change dtype: what was built from them is stale
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_cache": {}}  # ctypes pointers neither copy nor pickle

    def __setstate__(self, state):
        if "kernel" in state:  # pickled before ``kernel`` became a property
            state["_kernel"] = state.pop("kernel")
        if type(state.get("_buffers")) is dict:  # pickled before the buffers were watched
            state["_buffers"] = _Buffers(state["_buffers"])
        super().__setstate__(state)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return f"in_features={self.in_features}, out_features={self.out_features}, sparse {self.kernel}, " \
               f"{100 * self.kept / max(total, 1):.1f}% kept"


def native_input(x: torch.Tensor) -> bool:
    """Whether the native kernel takes ``x``: a dense float32 CPU tensor whose memory holds its values (not a
    negative view, e.g. ``z.conj().imag``), no gradient wanted through it, no
    forward-AD tangent or functorch transform on it, and not under ``torch.jit.trace`` (which records torch
    operations only)."""
    # Each check is one of the cheapest ways to ask (x.is_cpu, not x.device.type; torch._C._is_tracing, not
    # torch.jit.is_tracing()): at batch 1, with the caches cold, every call's first touches cost microseconds.
    return x.dtype == torch.float32 and x.is_cpu and x.layout == torch.strided and not x.is_neg() \
        and not (x.requires_grad and torch.is_grad_enabled()) and not _is_tracing() \
        and (forward_ad._current_level < 0 or forward_ad.unpack_dual(x).tangent is None) \
        and not _is_functorch_wrapped(x)  # a tangent exists only inside a dual_level: one lookup outside it


def native_step(layer: SparseLinear) -> Step | None:
    """``layer`` as one step of a native :class:`~prunet.sparse.native.Chain`, or None where its buffers
    are not what the kernel takes (moved to a GPU, converted to float64, not contiguous)."""
    bias = layer.bias
    if layer.kernel == "CSR" or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                                                       or bias.dim() != 1 or not bias.is_contiguous())):
        return None
    try:
        packed = layer.packed()  # checks the buffers (ValueError), as they are now
    except ValueError:
        return None
    return Step(packed, bias) if packed.native else None


# Bumped whenever a SparseLinear's buffer is set or removed, by any path (:class:`_Buffers`): a chain built
# at another count is built again from the buffers as they are now. One count for every layer, so that a
# call compares one integer, not each buffer: such changes are rare, calls of a small layer take
# microseconds. In-place changes and moved memory are the chain's own check (Chain.run).
_generation = [0]


def _buffers_changed() -> None:
    _generation[0] += 1


class _Buffers(dict):
    """A SparseLinear's ``_buffers``: a buffer set or removed by any path (setattr, ``register_buffer``,
    ``_apply``, ``torch.func.functional_call``, ``_buffers[name] = t``) bumps the generation once made."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        _buffers_changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        _buffers_changed()

    def pop(self, *args):
        try:
            return super().pop(*args)
        finally:
            _buffers_changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        _buffers_changed()

    def setdefault(self, key, default=None):
        try:
            return super().setdefault(key, default)
        finally:
            _buffers_changed()

    def clear(self):
        super().clear()
        _buffers_changed()


def _versions(tensors) -> tuple:
    """The version counters of ``tensors`` (None for a missing one, or one made under inference mode)."""
    out = []
    for t in tensors:
        try:
            out.append(None if t is None else t._version)
        except RuntimeError:  # an inference tensor has no version counter
            out.append(None)
    return tuple(out)


def _chain(layers: list[SparseLinear], relus: list[bool]) -> Chain | None:
    """One native chain of ``layers`` (a ReLU after those marked), from their current buffers; None where the
    kernel cannot take them (not available now, buffers it does not take, shapes that do not chain)."""
    steps = [native_step(layer) for layer in layers]
    if not steps or None in steps:
        return None
    try:
        return Chain([replace(step, relu=relu) for step, relu in zip(steps, relus)])
    except (ValueError, RuntimeError):  # RuntimeError: the library is not available (native.status())
        return None


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
        self.kernel = "CSR"  # torch's product, on im2col columns
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


class SparseSequential(nn.Sequential):
    """An ``nn.Sequential`` whose runs of native sparse Linear layers go through the kernel in one call each.

    A run (:func:`fusable_runs`) is consecutive children: :class:`SparseLinear` layers on the
    native kernel, with ``ReLU`` (fused into the layer before it), ``Flatten`` (first in a run, or
    after a layer, where it changes nothing), ``Dropout`` and ``Identity`` among them. For a small
    model at batch 1 the Python around each module costs more than its arithmetic: one call per
    run saves it. The children, their names and the outputs are the Sequential's. A run goes
    module by module where the kernel cannot take its input (another dtype or device, gradients
    wanted) or a Dropout in it is training; when fused, its members' forward hooks do not run. A
    fused call reads its members' buffers as they are now (one reassigned, converted or moved).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.mul_(torch.rand(8, 16) < 0.3)
        >>> fused = SparseSequential(net[0], SparseLinear(net[1]), net[2], SparseLinear(net[3]))
        >>> fused.runs  # doctest: +SKIP
        [(0, 4)]
        >>> x = torch.randn(2, 1, 4, 4)
        >>> torch.allclose(fused(x), net(x), atol=1e-6)
        True
    """

    def __init__(self, *args):
        super().__init__(*args)
        self._fused: tuple[tuple[bool, tuple[nn.Module, ...]], dict[int, _Run]] | None = None

    @property
    def runs(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each run of children that goes through the kernel in one call."""
        return fusable_runs(list(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        children = tuple(self._modules.values())
        key = (native.available(), children)  # children replaced, appended, deleted: the runs follow
        if self._fused is None or self._fused[0] != key:  # (modules compare by identity)
            self._fused = key, {start: _Run(list(children[start:stop])) for start, stop in fusable_runs(children)}
        runs, i = self._fused[1], 0
        while i < len(children):
            run = runs.get(i)
            x = run(x) if run is not None else children[i](x)
            i += len(run.members) if run is not None else 1
        return x

    def _apply(self, *args, **kwargs):
        self._fused = None  # the members' buffers move or change dtype: the chains point at the old ones
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        return {**super().__getstate__(), "_fused": None}

    def extra_repr(self) -> str:
        names = list(self._modules)
        return "; ".join(f"one native call: {', '.join(names[a:b])}" for a, b in self.runs)


def fusable_runs(modules: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of ``modules`` that the native kernel takes in one call.

    A run holds at least one :class:`SparseLinear` on the native kernel and at least two modules; it
    starts at such a layer or at a ``Flatten``; after its first layer it may hold ``ReLU`` (fused into
    the layer before), ``Flatten``, ``Dropout`` and ``Identity`` (on a flat batch in eval mode, nothing).
    """
    runs, start, linear = [], None, False
    for i, module in enumerate([*modules, None]):
        if start is not None and (_native_linear(module) or (linear and _after_layer(module))):
            linear = linear or _native_linear(module)
            continue
        if start is not None and linear and i - start >= 2:
            runs.append((start, i))
        starts = _native_linear(module) or _flattens(module)
        start, linear = (i, _native_linear(module)) if starts else (None, False)
    return runs


def _native_linear(module: nn.Module | None) -> bool:
    return isinstance(module, SparseLinear) and module.kernel != "CSR"


def _flattens(module: nn.Module | None) -> bool:
    """An ``nn.Flatten`` that flattens all but the batch dimension."""
    return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1


def _after_layer(module: nn.Module | None) -> bool:
    return type(module) in (nn.ReLU, nn.Dropout, nn.Identity) or _flattens(module)


class _Run:
    """One run of a :class:`SparseSequential`: its members, and the native chain that computes them at once,
    built from the members' buffers as they are at each call (rebuilt when one is reassigned or converted;
    None where a member's buffers are not what the kernel takes: moved to a GPU, converted to float64)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.dropouts = [m for m in members if type(m) is nn.Dropout]
        self.flattens = _flattens(members[0])
        self.layers = [m for m in members if isinstance(m, SparseLinear)]
        self.relus = [False] * len(self.layers)
        seen = 0
        for module in members:
            seen += isinstance(module, SparseLinear)
            if type(module) is nn.ReLU and seen:
                self.relus[seen - 1] = True
        self._built: tuple[int, Chain | None] | None = None

    def chain(self) -> Chain | None:
        """The native chain of the members' current buffers, or None (then module by module)."""
        if self._built is None or self._built[0] != _generation[0]:
            self._built = _generation[0], _chain(self.layers, self.relus)
        return self._built[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if native_input(x) and not any(d.training for d in self.dropouts):
            chain = self.chain()
            if chain is not None and x.dim() >= 2 and (self.flattens or x.dim() == 2):
                batch = x.shape[0]
                # An empty batch matches any width by its size: its width is checked below.
                if batch and x.is_contiguous() and x.numel() == batch * chain.in_features:
                    return chain.run_rows(x, batch)  # flattened where it lies: no view to make
                flat = x.flatten(1)
                if flat.shape[1] == chain.in_features:
                    return chain.run(flat)
        for module in self.members:
            x = module(x)
        return x


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


def choose(pairs: Sequence[tuple[float, float]], margin: float = 0.9, kernel: str = "CSR") -> Choice:
    """Sparse only when it is clearly faster: a pure rule over paired timings (dense s, sparse s).

    The sparse path is chosen when even the upper quartile of the per-pair ratios sparse / dense
    is below ``margin``: three pairs in four must beat the margin, not just the median, so a
    layer near the line stays dense run after run instead of flipping with the machine's noise.
    The reason names the sparse ``kernel`` and gives the median ratio.

    Example:
        >>> choose([(1.0, 0.5)] * 8).reason
        'sparse CSR (0.50x of dense time)'
        >>> choose([(1.0, 0.31)] * 8, kernel="native fp16").reason
        'sparse native fp16 (0.31x of dense time)'
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
        return Choice(True, median, f"sparse {kernel} ({median:.2f}x of dense time)")
    close = f", not clearly under {margin:g}x" if median < margin else ""
    return Choice(False, median, f"dense (sparse {median:.2f}x of dense time{close})")


@torch.no_grad()
def sparsify(model: nn.Module, example_input: torch.Tensor, repeats: int = 15, margin: float = 0.9,
             cache: bool | str | Path | None = None) -> nn.Module:
    """Give each pruned Linear / Conv2d layer a sparse kernel where it is clearly faster, in place.

    One forward pass of ``example_input`` records each layer's input; each layer
    is then timed dense and sparse (the native kernel, :class:`SparseLinear`, or
    torch's CSR product) on a random input of that shape (the batch of
    ``example_input``), in interleaved pairs with caches cold, and chosen only
    when :func:`choose` finds the sparse one clearly under ``margin`` of the dense
    time: a layer too close to call stays dense, so the plan is the same run after
    run. Last, the whole model is timed on ``example_input`` against the dense
    one, with the layers chosen alone and, for an ``nn.Sequential``, fused (every
    pruned layer of a run of Linear / ReLU / Flatten on the native kernel in one
    call: :class:`SparseSequential`); the faster of those that is clearly faster
    than dense is kept, else every layer goes back to dense (a layer can time
    differently alone than between its neighbours), so the result is never slower
    than the dense model. :func:`plan` says what was chosen and why.

    Each decision is kept in this machine's plan cache (:mod:`prunet.sparse.plans`): the same layer
    (shape, pruning pattern, input) and the same model at the same batch get the same plan on every
    later run, without timing them again; its reason then ends ``timed on an earlier run``.

    Outputs equal the dense model's for finite inputs; a NaN or inf input at a pruned connection
    does not propagate through a sparse layer (it never reads a pruned weight, so NaN * 0 is never
    computed), where the dense model would give NaN.

    Args:
        model: a plain model (masks multiplied in), e.g. from :func:`prunet.sparse.load`.
        example_input: a batch at the model's input size; its batch size is the one optimised for.
        repeats: timed pairs per layer (and for the whole model).
        margin: the fraction of the dense time the sparse layer must clearly beat.
        cache: the plan cache: default the environment's (``$PRUNET_PLAN_CACHE``, else
            ``~/.cache/prunet/plans.json``), ``False`` none (time everything), or a file.

    Returns:
        The model, in eval mode, its chosen layers replaced: the same object, or where fusing is
        fastest a :class:`SparseSequential` of its children (``model`` itself then runs them unfused).
    """
    model.eval()
    store = PlanCache.open(cache) if isinstance(example_input, torch.Tensor) else None
    structure = repr(model) if store is not None else ""
    layers = [layer for layer in find_layers(model) if sparse_twin_type(layer.module)]
    inputs = _layer_inputs(model, example_input, [layer.layer for layer in layers])
    timed, entries = [], []
    for layer in layers:
        module, seen = layer.module, inputs.get(layer.layer)
        if seen is None or int(torch.count_nonzero(module.weight)) == module.weight.numel():
            module._prunet_plan = "dense (not pruned)" if seen is not None else "dense (not run by the example)"
            continue
        twin = sparse_twin(module)
        x = torch.randn(seen.shape, dtype=seen.dtype, device=seen.device)
        entries.append(layer_entry(module, x, twin.kernel, margin, repeats) if store is not None else "")
        choice = _remembered(store, entries[-1], lambda: choose(
            paired_seconds(lambda: module(x), lambda: twin(x), repeats), margin, twin.kernel))
        module._prunet_plan = twin._prunet_plan = choice.reason
        timed.append((layer, twin, choice))
    what = model_entry(structure, entries, example_input, repeats) if store is not None else ""
    chosen = _settle(model, example_input, timed, repeats, store, what) if timed else model
    if store is not None:
        store.save()
    return chosen


def _remembered(store: PlanCache | None, what: str, measure: Callable[[], Choice]) -> Choice:
    """The choice ``store`` keeps for ``what`` (its reason saying so), else ``measure()``, then kept."""
    kept = store.get(what) if store is not None else None
    if isinstance(kept, dict) and isinstance(kept.get("sparse"), bool) and isinstance(kept.get("ratio"), float) \
            and isinstance(kept.get("reason"), str) and kept["reason"].endswith(")"):  # else: an entry edited by hand
        return Choice(kept["sparse"], kept["ratio"], f"{kept['reason'][:-1]}; timed on an earlier run)")
    choice = measure()
    if store is not None:
        store.put(what, {"sparse": choice.sparse, "ratio": choice.ratio, "reason": choice.reason})
    return choice


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


def _settle(model: nn.Module, example_input: torch.Tensor, timed: list, repeats: int, store: PlanCache | None,
            what: str) -> nn.Module:
    """The whole model against dense, with the layers ``(layer, twin, choice)`` chose alone and fused
    (:func:`_fused`); the faster of those clearly faster than dense (:func:`choose`, margin 1) is put
    in, or none (each decision as ``store`` keeps it for ``what``, where it does). Returns the model,
    or the fused one."""
    alone = {layer.layer for layer, _, choice in timed if choice.sparse}

    def use(names: set[str]) -> None:
        for layer, twin, _ in timed:
            model.set_submodule(layer.layer, twin if layer.layer in names else layer.module)

    def chosen_if_sparse(is_sparse: bool) -> None:
        use(alone if is_sparse else set())

    def run() -> object:
        return model(example_input)

    fused = _fused(model, timed, alone)
    whole = {}
    if alone:
        whole["alone"] = _remembered(store, f"{what}; alone {sorted(alone)}", lambda: choose(
            paired_seconds(run, run, repeats, prepare=chosen_if_sparse), margin=1.0))
    if fused is not None:
        whole["fused"] = _remembered(store, f"{what}; fused {fused.runs} with {sorted(alone)}", lambda: choose(
            paired_seconds(run, lambda: fused(example_input), repeats, prepare=chosen_if_sparse), margin=1.0))
    best = min((k for k, c in whole.items() if c.sparse), key=lambda k: whole[k].ratio, default=None)
    if best == "fused":
        in_runs = _explain_fused(fused, timed, whole["fused"].ratio)
        use(alone | in_runs)
        return fused
    use(alone if best == "alone" else set())
    if best is None and alone:
        for layer, twin, choice in timed:
            if choice.sparse:
                layer.module._prunet_plan = f"dense (sparse {choice.ratio:.2f}x of dense time alone, " \
                                            f"but the whole model {whole['alone'].ratio:.2f}x)"
    return model


def _fused(model: nn.Module, timed: list, alone: set[str]) -> SparseSequential | None:
    """``model`` (a plain ``nn.Sequential``) as a :class:`SparseSequential` of its children: the layers
    chosen alone (``alone``) swapped in, and every timed layer that falls in a run of :func:`fusable_runs`
    on the native kernel. None where nothing fuses (another model type, no native kernel, no run)."""
    if type(model) not in (nn.Sequential, SparseSequential):
        return None
    twins = {layer.layer: twin for layer, twin, _ in timed}
    children = dict(model.named_children())
    settled = {name: twins[name] if name in alone else child for name, child in children.items()}
    trial = [twins[name] if _native_linear(twins.get(name)) else settled[name] for name in children]
    runs = fusable_runs(trial)
    if not runs:
        return None
    inside = {i for start, stop in runs for i in range(start, stop)}
    fused = SparseSequential(OrderedDict((name, trial[i] if i in inside else settled[name])
                                         for i, name in enumerate(children)))
    return fused.train(model.training)


def _explain_fused(fused: SparseSequential, timed: list, ratio: float) -> set[str]:
    """Each fused layer's plan: its kernel, the layers it runs with, the whole model's time and its own
    alone. Returns the names of the fused layers."""
    names, alone = list(fused._modules), {layer.layer: (layer, choice) for layer, _, choice in timed}
    fused_layers = set()
    for start, stop in fused.runs:
        members = [n for n in names[start:stop] if isinstance(fused._modules[n], SparseLinear)]
        for name in members:
            layer, choice = alone[name]
            layer.module._prunet_plan = fused._modules[name]._prunet_plan = \
                f"sparse {fused._modules[name].kernel} (one call for {names[start]}..{names[stop - 1]}: the whole " \
                f"model {ratio:.2f}x of dense time; alone {choice.ratio:.2f}x)"
        fused_layers.update(members)
    return fused_layers


def plan(model: nn.Module) -> dict[str, str]:
    """Layer name -> the path each prunable layer of a (sparsified) model runs, and why.

    ``sparse native f32 (0.45x of dense time)`` (the kernel: ``native f32``, ``native fp16``,
    ``native codebook`` or torch's ``CSR``); ``sparse native f32 (one call for flatten..fc3: the whole
    model 0.40x of dense time; alone 1.10x)`` for a layer fused into a run (:class:`SparseSequential`);
    ``dense (sparse 0.93x of dense time, not clearly under 0.9x)``, ``dense (sparse 1.20x of dense
    time)``, ``dense (sparse 0.80x of dense time alone, but the whole model 1.02x)``, ``dense (not
    pruned)`` as :func:`sparsify` decided;
    ``dense (no sparse kernel)`` for a type :func:`sparse_twin` does not cover (attention
    in-projections, embeddings, grouped convolutions); plain ``dense`` for a layer
    :func:`sparsify` never looked at. The path is the text before the parenthesis.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            out[name] = getattr(module, "_prunet_plan", f"sparse {module.kernel}")
    for layer in find_layers(model, include=["all"]):
        if layer.layer not in out:
            if not sparse_twin_type(layer.module):
                out[layer.layer] = "dense (no sparse kernel)"
            else:
                out[layer.layer] = getattr(layer.module, "_prunet_plan", "dense")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))  # in the model's order


def sparse_twin_type(module: nn.Module) -> bool:
    """Whether :func:`sparse_twin` has a sparse kernel for ``module``."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)
