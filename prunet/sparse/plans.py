""":func:`prunet.sparse.sparsify`'s decisions, kept per machine: the same model and batch get the same plan on
every run.

Timings on a shared machine move from run to run, and a layer whose sparse and dense times are close
can fall on either side of the line. So a decision (sparse or dense, and the timed ratio behind it) is
measured once and kept: ``sparsify`` times a layer, or the whole model, only where the cache holds no
entry for it. An entry is keyed by the machine (CPU model, the cores this process may use, torch's
threads, torch's version, the native kernel's build, the version of the decision rule) and by what
was timed (the layer as it prints, its weight's shape, a hash of its pruning pattern, the sparse
kernel, the input's shape, dtype and device, a GPU by name, the margin and repeats; for the whole
model, how it prints and its layers' entries). Anything else, another batch size included, is
timed afresh. Two models that print alike but compute differently (another ``forward``) share
their whole-model decision: give one of them its own cache file, or ``cache=False``.

The file is ``$PRUNET_PLAN_CACHE``, else ``$XDG_CACHE_HOME/prunet/plans.json`` (``~/.cache/prunet/plans.json``).
``PRUNET_PLAN_CACHE=off``, or ``sparsify(..., cache=False)``, times on every call; deleting the file
times everything again (after a change to the machine the key cannot see, e.g. its load).
A cache that cannot be read is ignored and one that cannot be written is not kept (each with a
warning): plans only take longer to make. A ``sparsify`` call writes the file once, merged into what
other processes wrote meanwhile; the newest :data:`MAX_ENTRIES` entries are kept.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from prunet.sparse import native

ENV = "PRUNET_PLAN_CACHE"
FORMAT = "prunet-plans"
MAX_ENTRIES = 2000
RULE = 1  # the decision rule's version (sparsify's timing and choose()): a change to them is a new key


def default_path() -> Path | None:
    """The cache file as the environment sets it: ``$PRUNET_PLAN_CACHE`` (None where it is ``off``), else
    under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in ("off", "0", "false", "no", "") else Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME")
    if not root:
        home = Path("~").expanduser()
        if not home.is_absolute():  # no home directory to be found: no cache, rather than one in the working folder
            return None
        root = home / ".cache"
    return Path(root) / "prunet" / "plans.json"


class PlanCache:
    """The decisions of one cache file: :meth:`get` and :meth:`put` by what was timed, on this machine.

    Args:
        path: the JSON file (created with its folder on the first :meth:`put`).

    Example:
        >>> import tempfile
        >>> cache = PlanCache(Path(tempfile.mkdtemp()) / "plans.json")
        >>> cache.get("layer fc1 ...") is None
        True
        >>> cache.put("layer fc1 ...", {"sparse": True, "ratio": 0.4})
        >>> cache.save()
        >>> PlanCache(cache.path).get("layer fc1 ...")["ratio"]
        0.4
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, dict] | None = None
        self._new: dict[str, dict] = {}  # put since the last save

    @classmethod
    def open(cls, cache: bool | str | Path | None = None) -> "PlanCache | None":
        """The cache ``sparsify(cache=...)`` names: None or True the environment's (:func:`default_path`),
        False none, a path that file."""
        if cache is False:
            return None
        path = default_path() if cache is None or cache is True else Path(cache)
        return None if path is None else cls(path)

    def get(self, what: str) -> dict | None:
        """The value kept for ``what`` on this machine, or None."""
        entry = self._read().get(_key(what))
        return None if entry is None else entry.get("value")

    def put(self, what: str, value: dict) -> None:
        """Keep ``value`` for ``what`` on this machine (in the file at the next :meth:`save`)."""
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        where = machine()
        key = _key(what, where)
        self._read()[key] = self._new[key] = {"what": what, "machine": where, "measured": stamp, "value": value}

    def save(self) -> None:
        """Write the entries :meth:`put` since the last save into the file, merged into what it holds now (another
        process may have written it meanwhile), the newest :data:`MAX_ENTRIES` kept; replaced whole, readable
        as the umask allows. A file that cannot be written warns once: the plans are only not kept."""
        if not self._new:
            return
        entries = {**_entries_of(self.path), **self._new}
        self._entries = dict(sorted(entries.items(), key=lambda kv: str(kv[1].get("measured", "")))[-MAX_ENTRIES:])
        self._new = {}
        f = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as f:
                json.dump({"format": FORMAT, "entries": self._entries}, f, separators=(",", ":"))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(f.name, 0o666 & ~umask)
            os.replace(f.name, self.path)
        except OSError as e:
            if f is not None:
                Path(f.name).unlink(missing_ok=True)
            warnings.warn(f"the plan cache {self.path} cannot be written ({e.strerror or e}): these plans are not "
                          f"kept (set {ENV}=off to stop trying)", RuntimeWarning, stacklevel=3)

    def _read(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = _entries_of(self.path, warn=True)
        return self._entries


def _entries_of(path: Path, warn: bool = False) -> dict[str, dict]:
    """The entries of the cache file ``path``: none where it is missing, or unreadable (then a warning if ``warn``)."""
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict)):
            raise ValueError(f"not a {FORMAT} file")
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if warn:
            warnings.warn(f"the plan cache {path} is unreadable ({e}): timing afresh; it is rewritten when a plan "
                          f"is kept", RuntimeWarning, stacklevel=5)
        return {}


def _key(what: str, where: str | None = None) -> str:
    """The entry's key: ``what`` was timed on ``where`` (default this machine, :func:`machine`)."""
    return hashlib.sha256(f"{machine() if where is None else where}\n{what}".encode()).hexdigest()


def machine() -> str:
    """What about this machine and process decides a timing: CPU, the cores this process may use, threads, torch,
    the kernel, the rule. (A GPU is named in the entry of an input on it: asking here would start CUDA.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {_cpu_model()}; cores {cores}; threads {torch.get_num_threads()}; " \
           f"torch {torch.__version__}; kernel {_kernel_build()}; rule {RULE}"


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The CPU's model name, or (ARM Linux names none) its implementer, part and features."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "cpu model"):
        if fields.get(key):
            return fields[key]
    arm = [fields.get(k, "") for k in ("CPU implementer", "CPU part", "Features")]
    return " ".join([platform.machine(), *arm]).strip() if any(arm) else platform.processor() or platform.machine()


def _device(x: torch.Tensor) -> str:
    """``x``'s device, a GPU by its name."""
    return f"{x.device} {torch.cuda.get_device_name(x.device)}" if x.device.type == "cuda" else str(x.device)


def _kernel_build() -> str:
    """The native library's hash, and whether it is called without ctypes, or why it is not loaded: a rebuilt
    kernel, or one now called another way (which changes a small layer's time), times afresh."""
    lib = native.library()
    return "none" if lib.cdll is None else _file_hash(lib.cdll._name) + (" fastcall" if lib.fastcall else " ctypes")


@lru_cache(maxsize=8)
def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return path


def pattern(weight: torch.Tensor) -> str:
    """A short hash of which entries of ``weight`` are non-zero (its pruning pattern)."""
    bits = np.packbits((weight.detach() != 0).flatten().cpu().numpy())
    return hashlib.sha256(bits.tobytes()).hexdigest()[:16]


def layer_entry(module: nn.Module, x: torch.Tensor, kernel: str, margin: float, repeats: int) -> str:
    """What :func:`~prunet.sparse.sparsify` times for one layer: its decision's key."""
    w = module.weight
    return f"layer {module!r} {tuple(w.shape)} {w.dtype} kept {int(torch.count_nonzero(w))} " \
           f"pattern {pattern(w)}; input {tuple(x.shape)} {x.dtype} {_device(x)}; kernel {kernel}; " \
           f"margin {margin:g}; repeats {repeats}"


def model_entry(structure: str, layers: list[str], x: torch.Tensor, repeats: int) -> str:
    """What :func:`~prunet.sparse.sparsify` times for the whole model: its decision's key."""
    digest = hashlib.sha256("\n".join([structure, *layers]).encode()).hexdigest()[:16]
    return f"model {digest}; input {tuple(x.shape)} {x.dtype} {_device(x)}; repeats {repeats}"
