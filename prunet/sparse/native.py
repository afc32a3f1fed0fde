"""prunet's own sparse kernel (``csrc/spmm.c``), loaded with ctypes: ``y = x W^T + b`` at small batches.

A pruned layer is packed (:func:`pack`) as CSR with rows = output features, int32 row
pointers, uint16 column indices and one of three value formats, whichever holds the
layer's weights exactly:

* ``codebook``: a uint8 index per survivor into at most 256 float32 values (a weight-shared
  layer, :mod:`prunet.share`): 3 bytes a survivor;
* ``fp16``: IEEE halves, when every weight is one (a compact file written with
  ``value_dtype="float16"``): 4 bytes a survivor;
* ``f32``: 6 bytes a survivor, against torch CSR's 12 and SciPy's 8.

At batch 1 a sparse product reads each survivor once for two flops: once enough cores share
the gathers, memory is the limit and these bytes are its time. :class:`Chain` runs one layer,
or a run of them with ReLU between, in one call.

The kernel is a shared library built by ``make native`` (or :func:`compile_library`); where
there is no compiler it is missing, :func:`available` is False, :func:`status` says why, and
:class:`prunet.sparse.SparseLinear` uses torch's CSR product instead. Beside it, a small Python
extension module (``csrc/fastcall.c``, built with the running Python's headers) calls the kernel
without ctypes, which saves tens of microseconds a call with the caches cold; without it, ctypes
calls the kernel.

Example:
    >>> w = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.5, 0.0, 0.0, -1.0]])
    >>> packed = pack(w)
    >>> packed.kind, packed.row_ptr.tolist(), packed.cols.tolist(), packed.codebook.tolist()
    ('codebook', [0, 1, 3], [1, 0, 3], [-1.0, 1.5, 2.0])
    >>> torch.equal(packed.dense(), w)
    True
    >>> x = torch.ones(1, 4)
    >>> y = Chain([Step(packed)])(x) if available() else x @ packed.dense().t()  # torch without the kernel
    >>> y.tolist()
    [[2.0, 0.5]]
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import operator
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

ABI = 1  # PRUNET_SPMM_ABI in csrc/spmm.c: a library built from another version of it is not used
SOURCE = Path(__file__).with_name("csrc") / "spmm.c"
LIBRARY = SOURCE.with_suffix(".so")  # beside its source: a .so in the package itself would look like a Python module
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")  # the Makefile's `native` target compiles with these too
# The extension module that calls the kernel without ctypes, found beside the kernel's library.
FASTCALL_SOURCE = SOURCE.with_name("fastcall.c")
FASTCALL_NAME = "_fastcall" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
FASTCALL_ABI = 1  # PRUNET_FASTCALL_ABI in csrc/fastcall.c
FASTCALL_FLAGS = ("-O2", "-fPIC", "-shared")  # and the Makefile's
MAX_IN_FEATURES = 1 << 16  # column indices are uint16
MAX_CODEBOOK = 256  # codebook indices are uint8
KINDS = {"f32": 0, "fp16": 1, "codebook": 2}  # the VALUES_* of csrc/spmm.c
VALUE_DTYPES = {"f32": torch.float32, "fp16": torch.float16, "codebook": torch.uint8}
FEATURES = {1: "OpenMP", 2: "F16C", 4: "AVX2", 8: "FMA"}  # the FEATURE_* bits of csrc/spmm.c
ERRORS = {1: "bad arguments", 2: "out of memory"}
REBUILD = "run `make -B native` (or delete it, then `make native`)"  # -B: a copied .so can be newer than its source
# The /proc/cpuinfo flags that name instructions -march=native may emit (x86: SSE..AVX-512, FMA, BMI, AES, SHA,
# XSAVE, AMX, ...; ARM: fp, asimd*, sve*, crc32, atomics, ...). Other flags (hypervisor, bug mitigations such as
# md_clear or ssbd, kernel and timer features) differ between machines that run the same code: not compared.
ISA_FLAG = re.compile(r"(sse|ssse|avx|fma|f16c|bmi|aes|pclmul|popcnt|movbe|adx|sha|vaes|vpclmul|gfni|lzcnt|abm"
                      r"|rdrand|rdseed|xsave|amx|cx16|lahf|mmx|xop|tbm|clflushopt|clwb|movdir|serialize"
                      r"|fp$|fphp|asimd|sve|crc32|atomics|pmull|i8mm|bf16|sm3|sm4|jscvt|fcma|lrcpc|ilrcpc|frint"
                      r"|dotprod|fp16)")


class _Layer(ctypes.Structure):
    """``prunet_layer`` of csrc/spmm.c, field for field (all 8 bytes wide)."""

    _fields_ = [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("kind", ctypes.c_int64),
                ("relu", ctypes.c_int64), ("row_ptr", ctypes.c_void_p), ("col", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("codebook", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


@dataclass(frozen=True)
class Library:
    """The loaded kernel, or why there is none.

    Attributes:
        cdll: the shared library, or None.
        reason: what was loaded (``/path/spmm.so (OpenMP, F16C, AVX2, FMA)``) or why not.
        fastcall: ``chain(address, layers, count, x, y, batch, threads)`` of the extension module beside the
            library (:func:`open_fastcall`), or None: then ctypes calls the kernel.
    """

    cdll: ctypes.CDLL | None
    reason: str
    fastcall: Callable[..., int] | None = None


def open_library(path: str | Path = LIBRARY) -> Library:
    """Load the kernel from ``path``; a missing, foreign or outdated file gives a :class:`Library`
    without one, and the reason (never an exception)."""
    path = Path(path)
    if not path.is_file():
        return Library(None, f"{path} is not built (run `make native`, or "
                             "prunet.sparse.native.compile_library(), with a C compiler)")
    built = isa_flags(built_for(path))
    lacking = sorted(built - (isa_flags(cpu_flags()) if cpu_flags() is not None else built))
    if lacking:  # compiled with -march=native elsewhere: calling it here could die of an illegal instruction
        return Library(None, f"{path} was built on a CPU with instructions this one lacks "
                             f"({', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''}): {REBUILD}")
    try:
        cdll = ctypes.CDLL(str(path))
        abi = cdll.prunet_spmm_abi
        abi.restype = ctypes.c_int64
        if abi() != ABI:
            return Library(None, f"{path} was built from another version of spmm.c (ABI {abi()}, need {ABI}): "
                                 f"{REBUILD}")
        features, chain = cdll.prunet_spmm_features, cdll.prunet_chain
    except (OSError, AttributeError) as e:
        return Library(None, f"{path} does not load ({e})")
    features.restype = ctypes.c_int64
    chain.restype = ctypes.c_int
    chain.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    bits = features()
    features = ", ".join(name for bit, name in FEATURES.items() if bits & bit) or "no SIMD extensions, one thread"
    fastcall = open_fastcall(path.with_name(FASTCALL_NAME))
    called = f"called through {FASTCALL_NAME}" if fastcall else f"called through ctypes ({FASTCALL_NAME} is not built)"
    return Library(cdll, f"{path} ({features}); {called}", fastcall)


def open_fastcall(path: str | Path) -> Callable[..., int] | None:
    """``chain`` of the extension module at ``path`` (``csrc/fastcall.c``), or None where it is missing, does
    not load or was built from another version of its source (never an exception)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader("_fastcall", str(path))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_fastcall", loader))
        loader.exec_module(module)
        return module.chain if getattr(module, "ABI", None) == FASTCALL_ABI else None
    except Exception:  # noqa: BLE001 (a module that fails to load in any way leaves the call to ctypes)
        return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """This CPU's instruction-set flags (Linux's ``/proc/cpuinfo``), or None where that cannot be read."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def isa_flags(flags: frozenset[str] | set[str] | None) -> frozenset[str]:
    """The flags among ``flags`` that name instruction sets (:data:`ISA_FLAG`): the ones a library compiled
    with ``-march=native`` may need. A library is refused only for these.

    Example:
        >>> sorted(isa_flags({"avx2", "hypervisor", "md_clear", "sse4_2", "asimd"}))
        ['asimd', 'avx2', 'sse4_2']
    """
    return frozenset(f for f in flags or () if ISA_FLAG.match(f))


def built_for(path: str | Path) -> frozenset[str]:
    """The CPU flags recorded beside a library when it was built (``spmm.so.cpu``); empty when none were."""
    try:
        return frozenset(Path(f"{path}.cpu").read_text(encoding="ascii", errors="replace").partition(":")[2].split())
    except OSError:
        return frozenset()


def _record_cpu(path: Path) -> None:
    """Write the flags of the CPU a library is built on beside it, in ``/proc/cpuinfo``'s form."""
    flags = cpu_flags()
    if flags is not None:
        Path(f"{path}.cpu").write_text("flags\t: " + " ".join(sorted(flags)) + "\n", encoding="ascii")


_library: Library | None = None  # loaded on first use


def library() -> Library:
    """The kernel, loaded from :data:`LIBRARY` the first time it is asked for."""
    global _library
    if _library is None:
        _library = open_library()
    return _library


def available() -> bool:
    """Whether the native kernel loaded (:func:`status` says what, or why not)."""
    return library().cdll is not None


def status() -> str:
    """What was loaded, with the CPU features it was compiled for, or why it was not.

    Example:
        >>> status()  # doctest: +SKIP
        'loaded .../prunet/sparse/csrc/spmm.so (OpenMP, F16C, AVX2, FMA)'
    """
    lib = library()
    return f"loaded {lib.reason}" if lib.cdll is not None else f"not loaded: {lib.reason}; sparse layers use torch CSR"


def compile_library(out: str | Path = LIBRARY, compiler: str | None = None) -> Path:
    """Compile ``csrc/spmm.c`` into ``out`` (as ``make native`` does), with OpenMP where the compiler has it,
    and use it from now on (a process that loaded a library from ``out`` before keeps that one).

    Args:
        out: the shared library to write (replaced whole).
        compiler: the C compiler; default ``$CC``, else ``gcc``, else ``cc``.

    Returns:
        ``out``. Beside it, where this Python's headers are installed, the extension module that calls the
        kernel without ctypes (:data:`FASTCALL_NAME`); where they are not, ctypes calls it.

    Raises:
        RuntimeError: no compiler, or it failed (its message included).
    """
    global _library
    cc = compiler or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc or not shutil.which(cc):
        raise RuntimeError("no C compiler found (set CC or install gcc); sparse layers use torch CSR meanwhile")
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        errors = ""
        for openmp in (["-fopenmp"], []):  # without OpenMP where the compiler has none
            done = subprocess.run([cc, *FLAGS, *openmp, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if done.returncode == 0:
                break
            errors = done.stderr.strip()
        else:
            raise RuntimeError(f"{cc} could not compile {SOURCE}:\n{errors}")
        os.replace(built, out)
        _compile_fastcall(cc, Path(tmp), out.with_name(FASTCALL_NAME))
    _record_cpu(out)
    _library = open_library(out)
    return out


def _compile_fastcall(cc: str, tmp: Path, out: Path) -> None:
    """Compile ``csrc/fastcall.c`` into ``out`` with this Python's headers; nothing where they or the compiler
    fail (ctypes calls the kernel then: the same results, tens of microseconds slower a call)."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return
    built = tmp / out.name
    done = subprocess.run([cc, *FASTCALL_FLAGS, f"-I{include}", str(FASTCALL_SOURCE), "-o", str(built)],
                          capture_output=True, text=True)
    if done.returncode == 0:
        os.replace(built, out)


# --- packing a layer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """One layer's survivors in the kernel's format (see the module's docstring).

    Built by :func:`pack`. A hand-made one is checked when constructed (a one-time cost): ``row_ptr``
    ``out + 1`` non-decreasing offsets from 0 to the number of survivors, every column under ``in_features``
    and every codebook index inside the codebook, so the kernel never reads outside its tensors.

    Attributes:
        row_ptr: int32, ``out + 1`` offsets.
        cols: each survivor's column: uint16, or int32 for a layer wider than :data:`MAX_IN_FEATURES`
            (which the kernel does not take; torch's CSR product does).
        values: per survivor: float32, float16, or (``codebook``) a uint8 index.
        codebook: the ``codebook`` layer's float32 values, else empty.
        kind: ``f32``, ``fp16`` or ``codebook``.
        shape: ``(out_features, in_features)``.
    """

    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    codebook: torch.Tensor
    kind: str
    shape: tuple[int, int]

    def __post_init__(self):
        rows, cols = self.shape
        if self.kind not in KINDS:
            raise ValueError(f"Packed: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        n = self.values.numel()
        if self.row_ptr.dim() != 1 or self.row_ptr.numel() != rows + 1 or self.cols.numel() != n:
            raise ValueError(f"Packed: row_ptr needs {rows + 1} offsets and cols one per value ({n}), got "
                             f"{tuple(self.row_ptr.shape)} and {tuple(self.cols.shape)}")
        steps = self.row_ptr.long().diff()
        if int(self.row_ptr[0]) != 0 or int(self.row_ptr[-1]) != n or (steps.numel() and int(steps.min()) < 0):
            raise ValueError(f"Packed: row_ptr must rise from 0 to the number of values ({n})")
        if n and not 0 <= int(self.cols.int().min()) <= int(self.cols.int().max()) < cols:
            raise ValueError(f"Packed: a column index is outside 0..{cols - 1}")
        if self.kind == "codebook" and n and int(self.values.long().max()) >= self.codebook.numel():
            raise ValueError(f"Packed: a codebook index is outside the codebook of {self.codebook.numel()}")

    @property
    def native(self) -> bool:
        """Whether the kernel takes this layer: at least one row and column, 16-bit columns, int32 row
        pointers, tensors on the CPU in its dtypes."""
        return self.cols.dtype == torch.uint16 and self.row_ptr.dtype == torch.int32 and min(self.shape) >= 1 \
            and all(t.device.type == "cpu" for t in (self.row_ptr, self.cols, self.values, self.codebook)) \
            and self.values.dtype == VALUE_DTYPES[self.kind] and self.codebook.dtype == torch.float32

    def csr(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The layer as a ``torch.sparse`` CSR matrix ``(out, in)`` of ``dtype`` (for torch's product)."""
        device = device or self.values.device
        values = self.codebook[self.values.long()] if self.kind == "codebook" else self.values
        return torch.sparse_csr_tensor(self.row_ptr.to(device), self.cols.to(device, torch.int32),
                                       values.to(device, dtype), self.shape, check_invariants=False)  # pack's own

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's weight ``(out, in)``, zeros where pruned."""
        return self.csr(dtype).to_dense()


def value_kind(values: torch.Tensor) -> str:
    """The smallest format that holds ``values`` exactly: ``codebook``, ``fp16`` or ``f32``.

    Example:
        >>> value_kind(torch.tensor([0.5, -0.25, 0.5])), value_kind(torch.arange(300.0)), value_kind(torch.randn(300))
        ('codebook', 'fp16', 'f32')
    """
    values = values.detach()
    if values.numel() and _exact(values, torch.float32) and torch.unique(values).numel() <= MAX_CODEBOOK:
        return "codebook"
    return "fp16" if _exact(values, torch.float16) else "f32"


def _exact(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value survives a round trip through ``dtype``."""
    return torch.equal(values.to(dtype).to(values.dtype), values)


def pack(weight: torch.Tensor, kind: str | None = None) -> Packed:
    """A dense ``(out, in)`` weight, its zeros the pruned entries, in the kernel's format, on the CPU.

    Args:
        weight: the layer's weight. A float64 weight that float32 does not hold keeps its
            float64 values (under ``f32``): torch's product runs it, the kernel does not.
        kind: ``f32``, ``fp16`` or ``codebook``; default the smallest that holds the weights
            exactly (:func:`value_kind`).

    Raises:
        ValueError: not a 2-d float weight, or ``kind`` does not hold the weights exactly.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"pack takes a 2-d float weight (out, in), got {weight.dtype} {tuple(weight.shape)}")
    csr = weight.detach().cpu().to_sparse_csr()
    values = csr.values()
    if values.numel() >= 2**31:
        raise ValueError(f"pack: {values.numel():,} survivors; int32 row pointers hold fewer than 2^31")
    chosen = kind or value_kind(values)
    if chosen not in KINDS:
        raise ValueError(f"kind: {chosen!r} is not one of {', '.join(KINDS)}")
    codebook = torch.zeros(0)
    if chosen == "codebook":
        table = torch.unique(values)  # sorted
        if table.numel() > MAX_CODEBOOK or not _exact(table, torch.float32):
            raise ValueError(f"kind 'codebook': the layer has {table.numel()} distinct values; at most "
                             f"{MAX_CODEBOOK} float32 values fit")
        stored, codebook = torch.searchsorted(table, values).to(torch.uint8), table.float()
    elif chosen == "fp16" and not _exact(values, torch.float16):
        raise ValueError("kind 'fp16': the layer's weights are not all exactly representable in float16")
    else:
        stored = values.to(VALUE_DTYPES[chosen]) if _exact(values, VALUE_DTYPES[chosen]) else values
    cols = csr.col_indices().to(torch.int32 if weight.shape[1] > MAX_IN_FEATURES else torch.uint16)
    return Packed(csr.crow_indices().to(torch.int32), cols, stored.contiguous(), codebook, chosen,
                  (weight.shape[0], weight.shape[1]))


# --- running it --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One layer of a :class:`Chain`: its packed weight, its bias (float32, or None), and a ReLU after it."""

    packed: Packed
    bias: torch.Tensor | None = None
    relu: bool = False


class Chain:
    """Layers run one after the other in one native call: ``relu?(... relu?(x W1^T + b1) ...)``.

    Holds the tensors it points the kernel at, so they live as long as it does, and before each call checks
    that each still has the memory it had (:attr:`tensors`): one moved in place (``share_memory_()``, sent
    through a ``multiprocessing`` queue, ``set_``) or changed in place is described to the kernel again, and
    checked again. A buffer reassigned, or converted by ``.double()``, is a new tensor that the chain does
    not hold: the module that owns the buffers builds a new chain then (``SparseLinear`` counts such changes).

    Args:
        steps: the layers, each one's ``in_features`` the previous one's ``out_features``; every
            ``packed.native`` and every bias float32 on the CPU.

    Raises:
        RuntimeError: the kernel is not available (:func:`status`).
        ValueError: the layers do not chain or the kernel cannot take one of them.
    """

    def __init__(self, steps: Sequence[Step]):
        lib = library()
        if lib.cdll is None:
            raise RuntimeError(status())
        if not steps:
            raise ValueError("a chain needs at least one layer")
        self._call, self._fastcall = lib.cdll.prunet_chain, lib.fastcall
        self._address = ctypes.cast(self._call, ctypes.c_void_p).value  # for the extension module to call
        self._keep = list(steps)
        self.tensors = [t for s in steps for t in (*_packed_tensors(s.packed), s.bias) if t is not None]
        self._set_layers([_describe(s) for s in steps])
        for before, after in zip(steps, steps[1:]):
            if after.packed.shape[1] != before.packed.shape[0]:
                raise ValueError(f"the layers do not chain: {before.packed.shape} then {after.packed.shape}")
        self.in_features, self.out_features = steps[0].packed.shape[1], steps[-1].packed.shape[0]

    def _where(self) -> tuple[list[int], list[int]]:
        """The tensors' addresses and version counters: what the described layers were built from."""
        return list(map(_data_ptr, self.tensors)), _versions(self.tensors)

    def _redescribe(self) -> None:
        """Describe every layer again from its tensors as they are now, checking them again (ValueError)."""
        steps = [replace(s, packed=replace(s.packed)) for s in self._keep]  # replace(): Packed checks itself again
        self._set_layers([_describe(s) for s in steps])

    def _set_layers(self, layers: list[_Layer]) -> None:
        """Point the kernel at ``layers`` and note the tensors' memory they were described from.

        The array, its address and its length are one attribute, replaced at once: a call reads it once and
        holds the array until the kernel returns, so another thread describing the layers again meanwhile
        cannot free the memory the kernel reads."""
        array = (_Layer * len(layers))(*layers)
        self._described = array, ctypes.addressof(array), len(layers)
        self._memory = self._where()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in), float32 on the CPU -> (B, out), a new tensor (no autograd: it is for inference).

        Raises:
            ValueError: ``x`` is not such a tensor.
        """
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"the native kernel takes a float32 CPU tensor (B, {self.in_features}), got "
                             f"{x.dtype} {x.device.type} {tuple(x.shape)}")
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__` on an ``x`` the caller has checked: every check costs microseconds when a small
        layer's whole product takes a few tens of them."""
        return self.run_rows(x.contiguous(), x.shape[0])

    def run_rows(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """:meth:`run` on a contiguous float32 CPU ``x`` of ``batch * in_features`` values, whatever its shape
        (``(B, 1, 28, 28)`` is read as ``(B, 784)`` where it lies): -> (batch, out)."""
        y = torch.empty(batch, self.out_features, dtype=torch.float32, device=_CPU)  # a device object: not parsed
        if self._where() != self._memory:  # a tensor moved or changed in place: never call with a stale pointer
            self._redescribe()
        if batch:
            layers, at, count = self._described  # held here until the kernel returns
            if self._fastcall is not None:
                rc = self._fastcall(self._address, at, count, x.data_ptr(), y.data_ptr(), batch, _threads())
            else:
                rc = self._call(layers, count, x.data_ptr(), y.data_ptr(), batch, _threads())
            if rc:
                raise RuntimeError(f"native sparse kernel: {ERRORS.get(rc, f'error {rc}')}")
        return y


_data_ptr, _version = torch.Tensor.data_ptr, operator.attrgetter("_version")
_threads, _CPU = torch.get_num_threads, torch.device("cpu")


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """The tensors' version counters; 0 for one made under inference mode, which has none (it can change in
    place only under inference mode: new values are read where they lie, new memory moves its address)."""
    try:
        return list(map(_version, tensors))  # the common case at C speed: a call of a small layer takes µs
    except RuntimeError:
        return [0 if t.is_inference() else t._version for t in tensors]


def _describe(step: Step) -> _Layer:
    p, bias = step.packed, step.bias
    if not p.native:
        raise ValueError(f"the native kernel cannot take this layer: columns {p.cols.dtype} (needs uint16, "
                         f"in_features <= {MAX_IN_FEATURES}), values {p.values.dtype} on {p.values.device}")
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or
                             bias.shape != (p.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"the native kernel needs a contiguous float32 CPU bias of shape ({p.shape[0]},)")
    tensors = _packed_tensors(p)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("the native kernel needs contiguous packed tensors")
    return _Layer(p.shape[0], p.shape[1], KINDS[p.kind], int(step.relu), *(t.data_ptr() or None for t in tensors),
                  None if bias is None else bias.data_ptr())


def _packed_tensors(p: Packed) -> tuple[torch.Tensor, ...]:
    return p.row_ptr, p.cols, p.values, p.codebook
