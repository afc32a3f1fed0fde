"""Tests for prunet's own sparse kernel (prunet/sparse/native.py, csrc/spmm.c) and the layers that run it.

Every kernel variant (float32, fp16, codebook values) against the dense product, at the batch sizes
it is built for, on random and structured masks (empty rows, empty columns, an all-zero layer), with
and without bias; the fused chain of :class:`SparseSequential`; and the fallback: without the library
(simulated) every layer gives the same outputs through torch's CSR product. The tests that need the
library are skipped, with the reason, where it is not built (``make native`` builds it).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import shutil
import subprocess
import sysconfig
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunet
from prunet.sparse import SparseLinear, export, native, plan, sparsify
from prunet.sparse import modules
from prunet.sparse.modules import SparseSequential, fusable_runs

ROOT = Path(__file__).resolve().parent.parent
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.status()}")
BATCHES = (1, 3, 8, 33, 40, 64, 65)  # 33, 40, 65: tails after a full 32-lane block


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal within 1e-5 relative to the output's scale (sums in another order differ in the last bits)."""
    y, ref = y.detach(), ref.detach()
    return bool((y - ref).abs().max() <= 1e-5 * max(float(ref.abs().max()), 1e-30)) if ref.numel() else True


def weight_of(kind: str, out_f: int, in_f: int, density: float, seed: int) -> torch.Tensor:
    """A random pruned weight whose values the format ``kind`` holds exactly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    if kind == "fp16":
        w = w.half().float()
    elif kind == "codebook":
        table = torch.randn(32, generator=g)
        w = table[torch.randint(0, 32, w.shape, generator=g)] * (w != 0)
    return w


def structured(w: torch.Tensor) -> torch.Tensor:
    """Whole rows and columns pruned, one row kept whole (one of the layer's values, so every format
    still holds it): empty rows, empty columns, and a row longer than the kernel decodes at a time."""
    w = w.clone()
    w[1] = w[w != 0][0]
    w[::3] = 0
    w[:, ::5] = 0
    return w


def linear_with(weight: torch.Tensor, bias: bool, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias:
            lin.bias.copy_(torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(seed)))
    return lin.eval()


# --- packing: pure, no library needed -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["f32", "fp16", "codebook"])
def test_pack_holds_the_weights_exactly_in_the_smallest_format(kind):
    w = weight_of(kind, 40, 301, 0.1, seed=1)
    packed = native.pack(w)
    assert packed.kind == kind and torch.equal(packed.dense(), w)
    assert packed.cols.dtype == torch.uint16 and packed.row_ptr.dtype == torch.int32
    assert packed.values.dtype == native.VALUE_DTYPES[kind] and packed.values.numel() == int((w != 0).sum())
    assert packed.row_ptr[-1] == packed.values.numel() and packed.native


def test_pack_refuses_a_format_that_loses_values():
    w = weight_of("f32", 8, 20, 0.5, seed=2)
    with pytest.raises(ValueError, match="not all exactly representable in float16"):
        native.pack(w, "fp16")
    with pytest.raises(ValueError, match="at most 256 float32 values"):
        native.pack(torch.arange(300.0).reshape(3, 100), "codebook")
    with pytest.raises(ValueError, match="not one of"):
        native.pack(w, "int8")
    with pytest.raises(ValueError, match="2-d float weight"):
        native.pack(torch.ones(3))
    assert torch.equal(native.pack(w, "f32").dense(), w)  # a larger format than needed is allowed


def test_a_layer_wider_than_uint16_columns_runs_on_torch_csr():
    w = torch.zeros(3, native.MAX_IN_FEATURES + 5)
    w[0, -1], w[2, 7] = 1.5, -2.0
    packed = native.pack(w)
    assert packed.cols.dtype == torch.int32 and not packed.native
    layer = SparseLinear(linear_with(w, bias=True))
    assert layer.kernel == "CSR"
    x = torch.randn(2, w.shape[1])
    assert close(layer(x), F.linear(x, w, layer.bias))


def test_a_float64_layer_keeps_its_float64_values():
    w = weight_of("f32", 6, 10, 0.5, seed=3).double() / 3  # not float32 values
    lin = nn.Linear(10, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear(lin)
    x = torch.randn(4, 10, dtype=torch.float64)
    assert layer.kernel == "CSR" and layer.values.dtype == torch.float64
    assert torch.allclose(layer(x), x @ w.t(), rtol=1e-12, atol=0)


# --- the kernel against the dense product ------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("kind", ["f32", "fp16", "codebook"])
@pytest.mark.parametrize("mask", ["random", "structured", "all zero"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_kernel_equals_dense(kind, mask, bias):
    w = weight_of(kind, 37, 601, 0.12, seed=4)  # in_features not a multiple of 8, nor out_features
    w = structured(w) if mask == "structured" else w * 0 if mask == "all zero" else w
    lin = linear_with(w, bias)
    layer = SparseLinear(lin, use_native=True, values=kind if mask != "all zero" else None)
    assert layer.kernel.startswith("native")
    g = torch.Generator().manual_seed(5)
    for batch in BATCHES:
        x = torch.randn(batch, 601, generator=g)
        y = layer(x)
        assert y.shape == (batch, 37) and close(y, lin(x)), (kind, mask, bias, batch)
    if mask == "all zero" and not bias:
        assert torch.equal(layer(x), torch.zeros(batch, 37))


@needs_native
def test_fp16_subnormals_and_ragged_rows_convert_exactly():
    """Halves decoded eight at a time (F16C) and one at a time (the tail of each row) alike."""
    special = torch.tensor([2.0**-24, -(2.0**-20), 65504.0, 1e-3, -0.5, 3.0, 2.0**-14, 7.0]).half().float()
    w = torch.zeros(5, 70)
    for r in range(5):
        n = 3 + 7 * r  # rows of 3, 10, 17, 24, 31 survivors: full blocks of eight and tails
        w[r, torch.randperm(70, generator=torch.Generator().manual_seed(r))[:n]] = special[torch.arange(n) % 8]
    layer = SparseLinear(linear_with(w, bias=False), use_native=True, values="fp16")
    x = torch.rand(3, 70)
    ref = (x.double() @ w.double().t()).float()
    assert close(layer(x), ref)


@needs_native
def test_shapes_of_the_input_and_empty_batches():
    w = weight_of("f32", 9, 20, 0.3, seed=6)
    lin, layer = linear_with(w, True), SparseLinear(linear_with(w, True))
    for x in (torch.randn(2, 3, 20), torch.randn(20), torch.randn(0, 20), torch.randn(40, 2)[:, :1].expand(40, 20)):
        assert layer(x).shape == lin(x).shape and close(layer(x), lin(x))


@needs_native
def test_threads_do_not_change_the_result():
    w = weight_of("f32", 512, 1024, 0.3, seed=7)  # enough work for the kernel to share it out
    layer = SparseLinear(linear_with(w, True))
    x = torch.randn(8, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [layer(x[:1]), layer(x)]
        torch.set_num_threads(2)
        two = [layer(x[:1]), layer(x)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # each row summed in the same order


# --- other inputs: the fallback inside a native layer ------------------------------------------------


@needs_native
def test_other_dtypes_and_gradients_go_through_torch_csr():
    w = weight_of("fp16", 12, 30, 0.3, seed=8)
    lin = linear_with(w, True)
    layer = SparseLinear(lin)
    x = torch.randn(5, 30, dtype=torch.float64)
    assert torch.allclose(layer(x), lin.double()(x), rtol=1e-12, atol=1e-12)
    lin.float()
    x = torch.randn(5, 30, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(5, 30), atol=1e-6)
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        layer.native_chain(torch.randn(1, 30))(torch.randn(1, 30, dtype=torch.float64))


@needs_native
def test_moved_copied_and_pickled_layers_still_compute_the_same():
    w = weight_of("codebook", 10, 50, 0.2, seed=9)
    layer = SparseLinear(linear_with(w, True))
    x = torch.randn(3, 50)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # (plain pickle cannot hold uint16 tensors in torch 2.13; torch.save can)
    buffer.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(x), expected) and other.native_chain(x) is not None
    layer.double()  # float buffers now float64: the kernel no longer takes them, torch's product does
    assert layer.native_chain(x) is None and close(layer(x.double()).float(), expected)
    layer.float()
    assert layer.native_chain(x) is not None and close(layer(x), expected)


def test_a_conv1d_of_hugging_face_runs_through_sparse_linear():
    class Conv1D(nn.Module):  # transformers' layout: weight (in, out), y = x W + b
        def __init__(self, nf: int, nx: int):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(weight_of("f32", nx, nf, 0.2, seed=10))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return x @ self.weight + self.bias

    conv = Conv1D(24, 40)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        assert close(SparseLinear(conv)(x), conv(x))


# --- the fused chain ---------------------------------------------------------------------------------


def lenet(seed: int = 11, dropout: bool = False) -> nn.Sequential:
    """LeNet-300-100 at the demo's densities (fc1 6%, fc2 6%, fc3 36%)."""
    layers = [("flatten", nn.Flatten()), ("fc1", linear_with(weight_of("f32", 300, 784, 0.06, seed), True, seed)),
              ("relu1", nn.ReLU())]
    layers += [("drop", nn.Dropout(0.5))] if dropout else []
    layers += [("fc2", linear_with(weight_of("fp16", 100, 300, 0.06, seed + 1), True, seed + 1)), ("relu2", nn.ReLU()),
               ("fc3", linear_with(weight_of("codebook", 10, 100, 0.36, seed + 2), True, seed + 2))]
    return nn.Sequential(OrderedDict(layers)).eval()


def fused_of(model: nn.Sequential) -> SparseSequential:
    return SparseSequential(OrderedDict((n, SparseLinear(m) if isinstance(m, nn.Linear) else m)
                                        for n, m in model.named_children())).eval()


@needs_native
@pytest.mark.parametrize("dropout", [False, True])
def test_a_fused_chain_equals_the_dense_model(dropout):
    dense = lenet(dropout=dropout)
    fused = fused_of(dense)
    assert fused.runs == [(0, len(fused))]
    assert [m.kernel for m in fused if isinstance(m, SparseLinear)] == ["native f32", "native fp16", "native codebook"]
    for batch in BATCHES:
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert close(fused(x), dense(x)), batch
    assert "one native call: flatten, fc1, relu1" in repr(fused)


@needs_native
def test_a_fused_chain_steps_aside_where_the_kernel_cannot_run():
    dense, x = lenet(dropout=True), torch.randn(4, 1, 28, 28)
    fused = fused_of(dense)
    calls = []
    fused.fc2.register_forward_hook(lambda *args: calls.append(1))  # runs only when the chain does not
    with torch.no_grad():
        fused(x)
        assert calls == []
        assert torch.allclose(fused(x.double()), dense.double()(x.double()), atol=1e-10) and calls == [1]
        dense.float()
        fused.float()
        fused.train()  # dropout now drops: module by module
        torch.manual_seed(0)
        a = fused(x)
        dense.train()
        torch.manual_seed(0)
        assert close(a, dense(x)) and calls == [1, 1]
    fused.eval()
    copied = copy.deepcopy(fused)
    with torch.no_grad():
        assert torch.equal(copied(x), fused(x))


def test_which_runs_fuse():
    class Fake(SparseLinear):  # a native layer as fusable_runs sees it, without building one
        def __init__(self):
            nn.Module.__init__(self)
            self.kernel = "native f32"

    lin, csr = Fake(), Fake()
    csr.kernel = "CSR"
    flat, relu, drop, conv = nn.Flatten(), nn.ReLU(), nn.Dropout(), nn.Conv2d(1, 1, 1)
    assert fusable_runs([flat, lin, relu, lin, relu, lin]) == [(0, 6)]
    assert fusable_runs([conv, relu, flat, lin, relu, drop, lin]) == [(2, 7)]
    assert fusable_runs([relu, lin, csr, lin, relu]) == [(3, 5)]  # a ReLU does not start a run; CSR ends one
    assert fusable_runs([lin]) == [] and fusable_runs([flat, relu, lin]) == []  # one module is no run
    assert fusable_runs([lin, nn.Flatten(0), lin]) == []  # a Flatten that would fold the batch
    assert fusable_runs([flat, drop, lin, flat]) == [(2, 4)]  # only a Flatten may come before the first layer


@needs_native
def test_sparsify_fuses_a_small_model_when_that_is_fastest(monkeypatch):
    """The decision on given timings (fc1, fc2, fc3 alone; the whole model with those; fused)."""
    ratios = iter([0.5, 1.3, 1.3, 0.8, 0.4])

    def pairs(dense, sparse, repeats, prepare=None):
        sparse()  # the candidate runs
        return [(1e-3, 1e-3 * next(ratios))] * repeats

    monkeypatch.setattr(modules, "paired_seconds", pairs)
    dense, x = lenet(), torch.randn(1, 1, 28, 28)
    expected = dense(x)
    model = sparsify(dense, x)
    assert isinstance(model, SparseSequential) and model.runs == [(0, 6)]
    reasons = plan(model)
    assert reasons["fc2"] == "sparse native fp16 (one call for flatten..fc3: the whole model 0.40x of dense time; " \
                             "alone 1.30x)"
    assert set(plan(dense)) == set(reasons) and plan(dense) == reasons  # the unfused model: the same layers
    with torch.no_grad():
        assert close(model(x), expected) and close(dense(x), expected)


@needs_native
@pytest.mark.parametrize("options, kernel", [({"value_dtype": "float16"}, "native fp16"),
                                             ({"quantize": {"fc": 5}}, "native codebook")])
def test_a_compact_file_loads_onto_the_kernel_of_its_values(tmp_path, monkeypatch, options, kernel):
    """fp16 values in the file (exactly fp16 when loaded) and shared ones (32 values a layer) keep their form."""
    torch.manual_seed(0)
    model = prunet.create_model("lenet_300_100")
    with torch.no_grad():  # values over a wide range: more than 256 distinct halves in a layer
        for p in model.parameters():
            p.mul_(4 * torch.randn_like(p))
    prunet.Pruner(model).prune(prunet.Sparsity(0.9))
    prunet.save(model, tmp_path / "m.safetensors", {"model": "lenet_300_100"})
    export(tmp_path / "m.safetensors", tmp_path / "m.prunet", **options)
    monkeypatch.setattr(modules, "paired_seconds", lambda dense, sparse, repeats, prepare=None: [(1.0, 0.5)] * repeats)
    sparse = prunet.load(tmp_path / "m.prunet", sparse=True)
    assert sparse.fc1.kernel == sparse.fc2.kernel == kernel
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert close(sparse(x), prunet.load(tmp_path / "m.prunet")(x))


# --- without the library -----------------------------------------------------------------------------


def test_without_the_library_every_layer_runs_on_torch_csr(monkeypatch):
    monkeypatch.setattr(native, "_library", native.Library(None, "simulated: no library"))
    assert not native.available() and native.status() == "not loaded: simulated: no library; sparse layers use " \
                                                         "torch CSR"
    dense = lenet()
    fused = fused_of(dense)
    assert fused.runs == [] and all(m.kernel == "CSR" for m in fused if isinstance(m, SparseLinear))
    for batch in BATCHES:
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert close(fused(x), dense(x))
    with pytest.raises(ValueError, match="simulated: no library"):
        SparseLinear(dense.fc1, use_native=True)
    with pytest.raises(RuntimeError, match="simulated"):
        native.Chain([native.Step(native.pack(dense.fc1.weight))])
    model = sparsify(lenet(), torch.randn(1, 1, 28, 28), repeats=2)
    assert all(re.fullmatch(r"(dense|sparse CSR) \(.+\)", r) for r in plan(model).values()), plan(model)


def test_a_missing_or_foreign_library_is_a_reason_not_an_error(tmp_path):
    missing = native.open_library(tmp_path / "nope.so")
    assert missing.cdll is None and "make native" in missing.reason
    (tmp_path / "junk.so").write_bytes(b"not a library")
    assert "does not load" in native.open_library(tmp_path / "junk.so").reason


needs_cc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")


@needs_cc
def test_a_library_from_another_version_of_the_source_is_not_used(tmp_path):
    (tmp_path / "old.c").write_text("#include <stdint.h>\nint64_t prunet_spmm_abi(void) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "old.c"), "-o", str(tmp_path / "old.so")], check=True)
    assert "another version of spmm.c" in native.open_library(tmp_path / "old.so").reason


@needs_cc
def test_a_library_built_for_a_cpu_with_more_instructions_is_not_called(tmp_path, monkeypatch):
    """-march=native: a library built on another machine (a shared home, a copied folder) could die of an
    illegal instruction here; the flags recorded at build time keep it from being called at all."""
    monkeypatch.setattr(native, "_library", native.library())  # restored afterwards
    out = native.compile_library(tmp_path / "spmm.so")
    assert native.built_for(out) and native.built_for(out) <= (native.cpu_flags() or native.built_for(out))
    (tmp_path / "spmm.so.cpu").write_text("flags\t: sse2 avx512_future_extension\n")
    lib = native.open_library(out)
    assert lib.cdll is None and "built on a CPU with instructions this one lacks (avx512_future_extension" \
        in lib.reason and "make -B native" in lib.reason
    here = sorted(native.cpu_flags() or {"sse2"})
    (tmp_path / "spmm.so.cpu").write_text("flags\t: " + " ".join([*here, "hypervisor", "md_clear", "ibrs_future"]) + "\n")
    assert native.open_library(out).cdll is not None  # flags that are no instructions do not refuse it


def test_only_instruction_set_flags_are_compared():
    assert native.isa_flags({"sse4_2", "avx2", "fma", "hypervisor", "ssbd", "md_clear", "constant_tsc", "asimd",
                             "evtstrm", "sve2", "bmi2", "xsaveopt", "amx_tile"}) == \
        {"sse4_2", "avx2", "fma", "asimd", "sve2", "bmi2", "xsaveopt", "amx_tile"}


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert native.cpu_flags(tmp_path / "x86") == {"fpu", "sse2", "avx2"}
    assert native.cpu_flags(tmp_path / "arm") == {"fp", "asimd"}
    assert native.cpu_flags(tmp_path / "none") is None


@needs_cc
def test_compile_library_builds_the_kernel_from_python(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_library", native.library())  # restored afterwards
    out = native.compile_library(tmp_path / "spmm.so")
    assert out.is_file() and native.available() and str(out) in native.status()
    if Path(sysconfig.get_paths()["include"], "Python.h").is_file():  # and the module that calls it without ctypes
        assert native.library().fastcall is not None and "called through _fastcall" in native.status()
    w = weight_of("f32", 20, 30, 0.3, seed=12)
    x = torch.randn(3, 30)
    assert close(native.Chain([native.Step(native.pack(w))])(x), x @ w.t())
    with pytest.raises(RuntimeError, match="no C compiler"):
        native.compile_library(tmp_path / "again.so", compiler="no-such-cc")


# --- the call without ctypes --------------------------------------------------------------------------


needs_fastcall = pytest.mark.skipif(native.library().fastcall is None, reason=f"native kernel: {native.status()}")


@needs_fastcall
def test_the_extension_module_and_ctypes_compute_the_same_chain(monkeypatch):
    """Where csrc/fastcall.c is built the kernel is called through it, else through ctypes: the same products,
    bit for bit, for every kind of value, with and without bias and ReLU, at every batch size."""
    torch.manual_seed(7)
    steps = [native.Step(native.pack(weight_of("codebook", 40, 70, 0.2, seed=1)), torch.randn(40), relu=True),
             native.Step(native.pack(weight_of("fp16", 30, 40, 0.3, seed=2)), None, relu=True),
             native.Step(native.pack(weight_of("f32", 9, 30, 0.5, seed=3)), torch.randn(9))]
    calls, real = [], native.library().fastcall

    def spy(*args):  # the extension module's chain, counted
        calls.append(args)
        return real(*args)

    fast_library = dataclasses.replace(native.library(), fastcall=spy)
    monkeypatch.setattr(native, "_library", fast_library)
    fast = native.Chain(steps)
    monkeypatch.setattr(native, "_library", dataclasses.replace(fast_library, fastcall=None))
    slow = native.Chain(steps)
    for batch in BATCHES:
        x = torch.randn(batch, 70)
        reference = x
        for step in steps:
            reference = reference @ step.packed.dense().t() + (step.bias if step.bias is not None else 0)
            reference = reference.relu() if step.relu else reference
        y = fast(x)
        assert torch.equal(y, slow(x)) and close(y, reference)
    assert len(calls) == len(BATCHES)  # every product went through the extension module


@needs_native
@pytest.mark.parametrize("path", ["extension module", "ctypes"])
def test_layers_described_again_during_a_call_stay_alive_until_the_kernel_returns(path, monkeypatch):
    """Another thread may describe a chain's layers again (it saw a tensor changed in place) while this one is
    between reading the description and the kernel's return: the kernel must not read freed memory."""
    if path == "ctypes":
        monkeypatch.setattr(native, "_library", dataclasses.replace(native.library(), fastcall=None))
    elif native.library().fastcall is None:
        pytest.skip(f"native kernel: {native.status()}")
    torch.manual_seed(0)
    steps = [native.Step(native.pack(weight_of("f32", o, i, 0.3, seed=o)), torch.randn(o), relu=True)
             for o, i in ((40, 70), (30, 40), (9, 30))]
    chain = native.Chain(steps)
    x = torch.randn(1, 70)
    expected = chain(x)
    threads, junk = native._threads, []

    def another_thread_meanwhile():  # called while the call's arguments are made
        chain.tensors[-1].mul_(1.0)  # an in-place change: the same values, a new version
        chain._redescribe()  # what the other thread's call does on seeing it
        junk.extend(bytes([0xAB]) * 180 for _ in range(20000))  # reuse what was freed
        return threads()

    monkeypatch.setattr(native, "_threads", another_thread_meanwhile)
    assert torch.equal(chain(x), expected)


def test_a_missing_or_foreign_extension_module_leaves_the_call_to_ctypes(tmp_path):
    assert native.open_fastcall(tmp_path / native.FASTCALL_NAME) is None
    (tmp_path / native.FASTCALL_NAME).write_bytes(b"not a module")
    assert native.open_fastcall(tmp_path / native.FASTCALL_NAME) is None


@needs_native
def test_the_kernel_alone_is_called_through_ctypes(tmp_path, monkeypatch):
    """A kernel library without the extension module beside it (copied alone, no Python headers at build)."""
    shutil.copy(native.LIBRARY, tmp_path / "spmm.so")
    if Path(f"{native.LIBRARY}.cpu").is_file():
        shutil.copy(f"{native.LIBRARY}.cpu", tmp_path / "spmm.so.cpu")
    lib = native.open_library(tmp_path / "spmm.so")
    assert lib.cdll is not None and lib.fastcall is None and "called through ctypes" in lib.reason
    monkeypatch.setattr(native, "_library", lib)
    w = weight_of("f32", 20, 30, 0.3, seed=12)
    x = torch.randn(3, 30)
    assert close(native.Chain([native.Step(native.pack(w))])(x), x @ w.t())


def test_the_makefile_compiles_with_the_flags_compile_library_uses():
    makefile = (ROOT / "Makefile").read_text()
    assert f"NATIVE_FLAGS := {' '.join(native.FLAGS)}" in makefile
    assert "NATIVE      := prunet/sparse/csrc/spmm.so" in makefile
    assert "prunet/sparse/csrc/spmm.so" in (ROOT / ".gitignore").read_text().split()
    assert native.LIBRARY == ROOT / "prunet/sparse/csrc/spmm.so" and native.SOURCE.is_file()


# --- pointers, dtypes and paths that must follow the layer as it is now --------------------------------


def sequential_pair(seed: int = 13) -> tuple[nn.Sequential, SparseSequential]:
    torch.manual_seed(seed)
    dense = nn.Sequential(linear_with(weight_of("f32", 32, 64, 0.3, seed), True, seed), nn.ReLU(),
                          linear_with(weight_of("f32", 8, 32, 0.3, seed + 1), True, seed + 1)).eval()
    return dense, SparseSequential(SparseLinear(dense[0]), nn.ReLU(), SparseLinear(dense[2])).eval()


def scribble() -> list[torch.Tensor]:
    """Fill freed memory with something loud, so a stale pointer reads it."""
    return [torch.full((10000,), 1e30) for _ in range(50)]


@needs_native
def test_share_memory_after_sparsify_keeps_the_fused_chain_on_the_live_buffers(monkeypatch):
    ratios = iter([0.5, 1.3, 1.3, 0.8, 0.4])
    monkeypatch.setattr(modules, "paired_seconds",
                        lambda dense, sparse, repeats, prepare=None: [(1e-3, 1e-3 * next(ratios))] * repeats)
    dense, x = lenet(), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = dense(x)
        model = sparsify(dense, x)
        assert isinstance(model, SparseSequential) and model.fc1 is dense.fc1
        model(x)
        dense.share_memory()  # the original model, whose layers the fused one shares: its chains are not told
        junk = scribble()
        assert close(model(x), expected) and close(dense(x), expected)
        seq_dense, seq = sequential_pair()
        seq(x[:, 0, 0, :].repeat(1, 3)[:, :64])
        seq[0].share_memory()  # one member alone
        junk += scribble()
        x2 = torch.randn(3, 64)
        assert close(seq(x2), seq_dense(x2))
    del junk


@needs_native
def test_reassigned_buffers_are_used():
    dense, seq = sequential_pair()
    x = torch.randn(3, 64)
    with torch.no_grad():
        seq(x), seq[0](x)
        new_bias = torch.randn(32)
        seq[0].bias = new_bias.clone()
        dense[0].bias.copy_(new_bias)
        assert close(seq[0](x), dense[0](x)) and close(seq(x), dense(x))
        seq[2].double()  # one member of the fused chain: the chain must not read its old float32 buffers
        junk = scribble()
        assert torch.allclose(seq[2](dense[1](dense[0](x)).double()), dense[2].double()(dense[1](dense[0](x)).double()))
        dense[2].float()
        assert close(seq(x).float(), dense(x))
    del junk


@needs_native
def test_buffers_changed_in_place_or_registered_again_are_used():
    dense, seq = sequential_pair()
    x = torch.randn(3, 64)
    with torch.no_grad():
        seq(x), seq[0](x)
        seq[0].values.mul_(2)  # in place: the same tensor, a new version
        dense[0].weight.mul_(2)
        assert close(seq[0](x), dense[0](x)) and close(seq(x), dense(x))
        new_bias = torch.randn(8)
        seq[2].register_buffer("bias", new_bias.clone(), persistent=False)  # not through setattr
        dense[2].bias.copy_(new_bias)
        assert close(seq(x), dense(x))
        values = seq[2].values
        values.set_(values.clone())  # new memory under the same tensor
        junk = scribble()
        assert close(seq(x), dense(x)) and close(seq[2](dense[1](dense[0](x))), dense[2](dense[1](dense[0](x))))
    del junk


@needs_native
def test_layers_built_under_inference_mode_run_the_kernel_they_name(monkeypatch):
    """Buffers made under torch.inference_mode have no version counter: the layers said ``native`` and ran
    torch's CSR product."""
    ran = []
    run = native.Chain.run_rows  # what every native call goes through
    monkeypatch.setattr(native.Chain, "run_rows",
                        lambda self, x, batch: ran.append(len(self._keep)) or run(self, x, batch))
    dense, _ = sequential_pair()
    x = torch.randn(3, 64)
    with torch.inference_mode():
        seq = SparseSequential(SparseLinear(dense[0]), nn.ReLU(), SparseLinear(dense[2])).eval()
        assert seq[0].kernel == "native f32" and close(seq[0](x), dense[0](x)) and ran == [1]
        assert close(seq(x), dense(x)) and ran == [1, 2]  # the fused chain: both layers in one call
        seq[0].values.mul_(2)  # in place, under inference mode: no version to bump, the kernel reads the memory
        with torch.no_grad():
            dense[0].weight.mul_(2)
        assert close(seq(x), dense(x)) and ran == [1, 2, 2]


@needs_native
def test_a_layer_sent_through_forking_pickler_still_runs_in_this_process():
    from multiprocessing.reduction import ForkingPickler
    layer = SparseLinear(linear_with(weight_of("f32", 128, 256, 0.3, seed=14), True))
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = layer(x)
        before = layer.values.data_ptr()
        blob = ForkingPickler.dumps(layer)  # what mp.Queue.put does: the buffers move to shared memory
        junk = scribble()
        assert layer.values.data_ptr() != before and torch.equal(layer(x), expected)
    del blob, junk


@needs_native
def test_the_default_dtype_does_not_change_the_kernels_output():
    dense, seq = sequential_pair()
    x = torch.randn(3, 64)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.no_grad():
            y, fused = seq[0](x), seq(x)
    finally:
        torch.set_default_dtype(before)
    with torch.no_grad():
        assert y.dtype == fused.dtype == torch.float32 and close(y, dense[0](x)) and close(fused, dense(x))


@needs_native
def test_a_native_layer_loaded_where_the_library_is_refused_falls_back_to_csr(monkeypatch):
    dense, seq = sequential_pair()
    x = torch.randn(3, 64)
    with torch.no_grad():
        seq(x)
        copied, layer = copy.deepcopy(seq), SparseLinear(dense[0])
        assert layer.kernel == "native f32"
        monkeypatch.setattr(native, "_library", native.Library(None, "simulated: refused"))
        assert layer.kernel == "CSR" and "sparse CSR" in repr(layer) and fused_of(dense).runs == []
        for model in (seq, copied, copy.deepcopy(seq), copy.deepcopy(layer)):
            ref = dense(x) if isinstance(model, SparseSequential) else dense[0](x)
            assert close(model(x), ref)


@pytest.mark.parametrize("use_native", [None, False])
def test_a_nan_input_at_a_pruned_connection_does_not_propagate(use_native):
    """Documented: the sparse layers never read a pruned weight, so NaN * 0 is never computed."""
    w = weight_of("f32", 6, 10, 0.5, seed=15)
    w[:, 3] = 0  # input 3 is pruned from every output
    lin = linear_with(w, True)
    layer = SparseLinear(lin, use_native=use_native)
    x = torch.randn(2, 10)
    x[0, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(lin(x)[0]).all() and torch.isfinite(layer(x)).all()
        assert close(layer(x[1:]), lin(x[1:]))


@needs_native
def test_tracing_and_sparse_inputs_take_the_torch_path():
    w = weight_of("f32", 9, 20, 0.3, seed=16)
    lin = linear_with(w, True)
    layer = SparseLinear(lin)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(2, 20), check_trace=False)
        x = torch.randn(5, 20)
        assert close(traced(x), lin(x))
        for sparse_x in (x.to_sparse(), x.to_sparse_csr()):
            assert close(layer(sparse_x), lin(x))
    assert not modules.native_input(x.to_sparse()) and modules.native_input(x)


@needs_native
def test_forward_ad_gives_the_tangent():
    import torch.autograd.forward_ad as fwAD
    w = weight_of("f32", 9, 20, 0.3, seed=17)
    layer = SparseLinear(linear_with(w, True))
    x, t = torch.randn(2, 20), torch.randn(2, 20)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        assert not modules.native_input(dual)
        tangent = fwAD.unpack_dual(layer(dual)).tangent
    assert tangent is not None and close(tangent, t @ w.t())


def test_hand_made_packed_layers_are_checked():
    p = native.pack(weight_of("f32", 4, 6, 0.5, seed=18))
    assert not dataclasses.replace(p, row_ptr=p.row_ptr.long()).native
    with pytest.raises(ValueError, match="column"):
        dataclasses.replace(p, cols=p.cols.int().add(6).to(torch.uint16))
    with pytest.raises(ValueError, match="row_ptr"):
        dataclasses.replace(p, row_ptr=p.row_ptr.flip(0).contiguous())
    empty = native.pack(torch.zeros(0, 6))
    assert not empty.native
    if native.available():
        with pytest.raises(ValueError):
            native.Chain([native.Step(empty)])


@needs_cc
def test_a_library_without_the_features_function_is_a_reason(tmp_path):
    (tmp_path / "part.c").write_text(f"#include <stdint.h>\nint64_t prunet_spmm_abi(void) {{ return {native.ABI}; }}\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "part.c"), "-o", str(tmp_path / "part.so")], check=True)
    lib = native.open_library(tmp_path / "part.so")
    assert lib.cdll is None and "does not load" in lib.reason


def test_buffers_swapped_by_functional_call_or_written_directly_are_used():
    """torch.func.functional_call swaps buffers in ``_buffers`` itself, as a direct write does: the native chain
    and torch's CSR copy (the float64 path) must read the swapped ones, then the originals again."""
    dense, seq = sequential_pair()
    x = torch.randn(3, 64)
    layer = seq[0]
    with torch.no_grad():
        seq(x), layer(x), layer(x.double())
        zero = torch.zeros(32)
        assert close(torch.func.functional_call(layer, {"bias": zero}, (x,)), F.linear(x, dense[0].weight))
        assert close(torch.func.functional_call(seq, {"0.bias": zero}, (x,)),
                     dense[2](dense[1](F.linear(x, dense[0].weight))))
        assert close(layer(x), dense[0](x)) and close(seq(x), dense(x))  # the originals back
        layer._buffers["values"] = layer.values * 2
        dense[0].weight.mul_(2)
        assert close(layer(x), dense[0](x)) and close(seq(x), dense(x))
        assert torch.allclose(layer(x.double()), dense[0].double()(x.double()))
        layer.values.mul_(0.5)  # in place: the CSR copy too
        dense[0].weight.mul_(0.5)
        assert torch.allclose(layer(x.double()), dense[0].double()(x.double()))


@needs_native
def test_a_reassigned_in_features_never_sends_a_narrower_input_to_the_kernel():
    layer = SparseLinear(linear_with(weight_of("f32", 16, 64, 0.3, seed=21), True))
    with torch.no_grad():
        layer(torch.randn(2, 64))
        layer.in_features = 8  # a user's edit: the packed weight still has 64 columns
        with pytest.raises(ValueError, match="column index"):  # the kernel would have read past x
            layer(torch.randn(2, 8))


@needs_native
def test_a_fused_chain_takes_images_as_they_lie_strided_ones_too_and_any_default_dtype(monkeypatch):
    """The fused call reads a contiguous (B, 1, H, W) batch as (B, H * W) where it lies; a strided batch, an
    empty one and a process whose default dtype is float64 get the same outputs as the dense model."""
    ran = []
    run = native.Chain.run_rows
    monkeypatch.setattr(native.Chain, "run_rows", lambda self, x, batch: ran.append(batch) or run(self, x, batch))
    first, rest = sequential_pair()
    dense = nn.Sequential(nn.Flatten(), *first).eval()
    fused = SparseSequential(nn.Flatten(), *rest).eval()
    torch.manual_seed(3)
    images = torch.randn(5, 1, 8, 8)
    strided = torch.randn(5, 1, 8, 16)[..., ::2]  # every other column: not contiguous
    with torch.no_grad():
        for x in (images, images[:1], strided, images[:0]):
            y = fused(x)
            assert y.shape == (x.shape[0], 8) and y.dtype == torch.float32 and close(y, dense(x))
        assert ran == [5, 1, 5, 0]  # every one in the one native call
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            y = fused(images)
        finally:
            torch.set_default_dtype(before)
        assert y.dtype == torch.float32 and close(y, dense(images)) and ran == [5, 1, 5, 0, 5]


@needs_native
def test_a_negative_view_and_an_empty_batch_of_the_wrong_width_behave_as_the_dense_model():
    """``z.conj().imag`` is a float32 tensor whose memory holds the negatives of its values: the kernel reads
    memory, so it must not take it. An empty batch of the wrong width is an error, as for the dense model."""
    first, rest = sequential_pair()
    dense = nn.Sequential(nn.Flatten(), *first).eval()
    fused = SparseSequential(nn.Flatten(), *rest).eval()
    torch.manual_seed(4)
    strided = torch.complex(torch.randn(3, 64), torch.randn(3, 64)).conj().imag
    contiguous = torch._neg_view(torch.randn(3, 64))  # what a (1, 1) z.conj().imag is: contiguous, negated
    with torch.no_grad():
        for negative in (strided, contiguous):
            assert negative.is_neg() and negative.dtype == torch.float32
            assert close(fused(negative), dense(negative)) and close(rest[0](negative), first[0](negative))
        for wrong in (torch.randn(0, 3, 5), torch.randn(0, 5)):
            with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
                dense(wrong)
            with pytest.raises(RuntimeError, match="takes inputs of 64 features, got shape"):
                fused(wrong)
