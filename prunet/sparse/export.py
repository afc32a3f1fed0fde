"""Export a pruned model (compact, dense safetensors, ONNX) and load it back.

:func:`export` takes a run folder (its ``final.safetensors``) or a checkpoint,
multiplies the masks in, optionally removes dead neurons (``shrink``) and
writes one of three files:

* ``prunet``: the compact file of :mod:`prunet.sparse.compact` (survivors and relative indices);
* ``safetensors``: a plain prunet checkpoint of the baked model, dense, no masks;
* ``onnx``: the baked model through ``torch.onnx.export`` (needs ``pip install prunet[onnx]``).

:func:`load` reads a compact file or a prunet checkpoint back into a plain
model whose outputs equal the pruned model's; ``sparse=True`` gives its pruned
layers sparse kernels (:mod:`prunet.sparse.modules`).

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> model = create_model("lenet_300_100")
    >>> _ = Pruner(model).prune(Sparsity(0.9))
    >>> _ = save(model, "lenet.safetensors", {"model": "lenet_300_100"})
    >>> done = export("lenet.safetensors", "lenet.prunet")  # or a run folder: its final.safetensors
    >>> done.ratio > 5
    True
    >>> x = torch.randn(2, 1, 28, 28)
    >>> torch.allclose(load("lenet.prunet")(x), model(x), atol=1e-5)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from prunet.checkpoint import (
    CheckpointError,
    is_torch_file,
    load_checkpoint,
    load_state,
    read_meta,
    resize_to_state,
    save_checkpoint,
)
from prunet.data import first_batch
from prunet.devices import model_device
from prunet.factory import Trust, check_trusted, is_factory
from prunet.files import atomic_path
from prunet.layers import Setting, find_layers
from prunet.masks import MASK_SUFFIX, baked_copy
from prunet.meta import INPUT_DTYPES, shown
from prunet.models import create_model, get_model_info
from prunet.neurons import remove_dead_neurons
from prunet.runfolder import FINAL, RunFolder, run_file_at
from prunet.share import share, unshare
from prunet.sparse.compact import CompactFileError, read_compact, read_header, write_compact
from prunet.sparse.modules import median_seconds, plan, sparsify
from prunet.train import Normalization, evaluate

FORMATS = ("prunet", "safetensors", "onnx")


class ExportError(ValueError):
    """Something export or load cannot do: a missing source, a bad option, ONNX not installed."""


@dataclass
class Exported:
    """What :func:`export` wrote.

    Attributes:
        path: the file.
        format: one of :data:`FORMATS`.
        bytes: its size.
        source: the checkpoint it was made from.
        shrunk: whether dead neurons were removed first.
        dense_bytes: the model's tensors at float32 before pruning (masks not counted),
            the size a dense float32 file of it holds.
    """

    path: Path
    format: str
    bytes: int
    source: Path
    shrunk: bool
    dense_bytes: int

    @property
    def ratio(self) -> float:
        """How many times smaller the file is than the dense float32 tensors."""
        return self.dense_bytes / self.bytes


def source_checkpoint(source: str | Path) -> Path:
    """A run folder's ``final.safetensors``, or the checkpoint itself."""
    source = Path(source)
    if source.is_dir():
        source = source / FINAL
    if not source.is_file():
        raise ExportError(f"{source} does not exist (give a run folder with {FINAL}, or a checkpoint)")
    return source


def export(
    source: str | Path,
    out: str | Path,
    format: str = "prunet",
    shrink: bool = False,
    value_dtype: str = "float32",
    quantize: Setting | None = None,
    trust_factory: Trust = False,
    owner: RunFolder | None = None,
    model: nn.Module | None = None,
) -> Exported:
    """Write the pruned model of ``source`` as ``out``.

    Args:
        source: a run folder (its ``final.safetensors`` is used), a checkpoint (:func:`save`), or
            a ``torch.save``-d state dict (with ``model``).
        out: the file to write (replaced whole).
        format: ``prunet`` (compact), ``safetensors`` (baked, dense) or ``onnx``.
        shrink: remove dead neurons first, so layers are physically smaller
            (needs an ``nn.Sequential`` model, as the registry models are).
        value_dtype: with ``prunet``: ``float32``, ``float16`` or ``bfloat16`` values.
        quantize: with ``prunet``: share the survivors of each layer named here among
            2^bits values (``{"conv": 8, "fc": 5}``; k-means, no retraining:
            :func:`prunet.share.share`) and Huffman code their clusters and positions.
            :func:`load` then gives the shared model.
        trust_factory: build a model whose checkpoint names a factory (``mypkg.nets:resnet20``):
            ``True``, or a collection of the trusted specs (see :func:`prunet.factory.check_trusted`).
        model: a fresh instance of the model the checkpoint holds, loaded into instead of the
            one it names; needed for a file that names none (a ``torch.save``-d state dict).
        owner: the run folder ``out`` belongs to, when its run writes it (the pipeline's
            ``final.prunet``): ``out`` is recorded as a file of that run. Otherwise ``out``
            must not be a file a run recorded, nor in prunet's hidden folders.

    Returns:
        What was written.

    Raises:
        ExportError: a bad source or option; prunet.checkpoint.CheckpointError: a corrupt checkpoint.
    """
    if format not in FORMATS:
        raise ExportError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    ckpt = source_checkpoint(source)
    if Path(out).resolve() == ckpt.resolve():
        raise ExportError(f"-o {out}: that is the checkpoint being exported; write to another file")
    if owner is not None and Path(out).parent.resolve() == owner.path.resolve():
        out = owner.record(Path(out).name)
    else:
        taken = run_file_at(out)
        if taken:
            raise ExportError(f"-o {out} is {taken}; export writes only files of its own: choose another name")
    if Path(out).is_dir():
        raise ExportError(f"-o {out} is a folder; give a file name")
    model, pruner, meta = load_checkpoint(ckpt, trust_factory, model)  # before `out` is touched
    dense_bytes = sum(4 * t.numel() for k, t in model.state_dict().items() if not k.endswith(MASK_SUFFIX))
    keep = {p: m.bool() for p, m in pruner.masks.items()} if pruner is not None else {}
    plain = baked_copy(model).eval()
    if shrink:
        if not isinstance(plain, nn.Sequential):
            raise ExportError(f"--shrink: dead-neuron removal needs an nn.Sequential model, {ckpt} holds "
                              f"{type(plain).__name__}")
        plain, _ = remove_dead_neurons(plain)
        keep = {}  # shapes changed; the zeros of the baked weights are the pruned entries
    if quantize is not None and format != "prunet":
        raise ExportError(f"--quantized writes the compact format; --format {format} cannot hold shared weights")
    meta = {**meta, "exported_from": str(ckpt), "shrunk": shrink}
    out = Path(out)
    if format == "prunet":
        shared = {}
        if quantize is not None:
            try:
                shared = share(plain, quantize, masks=keep or None)
            except ValueError as e:
                raise ExportError(f"--bits: {e}") from None
            unshare(plain)
        save_compact(out, plain, meta, keep=keep or None, shared=shared, value_dtype=value_dtype)
    elif format == "safetensors":
        save_checkpoint(out, plain, meta)
    else:
        _export_onnx(plain, meta, out)
    return Exported(out, format, out.stat().st_size, ckpt, shrink, dense_bytes)


def save_compact(
    out: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    keep: dict[str, torch.Tensor] | None = None,
    shared: dict[str, Any] | None = None,
    value_dtype: str = "float32",
) -> Path:
    """Write a plain (baked) model as a compact file: shared layers, then sparse ones where that pays.

    Args:
        out: the file.
        model: a model without masks; its zeros are the pruned entries unless ``keep`` says otherwise.
        meta: the header's metadata (``model``, ``model_kwargs`` for :func:`load`).
        keep: parameter name -> survivors, for the pruned layers (default: their non-zeros).
        shared: parameter name -> :class:`prunet.share.SharedLayer` (codebooks, clusters): stored Huffman coded.
        value_dtype: the survivors' value type.
    """
    shared = shared or {}
    if keep is None:
        keep = {layer.param: layer.weight.detach() != 0 for layer in find_layers(model, include=["all"])}
    if shared:
        meta = {**meta, "shared_bits": {name: layer.bits for name, layer in shared.items()}}
    state = model.state_dict()
    sparse = {k: v for k, v in keep.items() if k not in shared and _sparse_pays(state[k], v)}
    return write_compact(out, state, sparse, meta, value_dtype, shared=shared)


def _sparse_pays(weight: torch.Tensor, keep: torch.Tensor) -> bool:
    """Whether survivors plus relative indices (about 8 bits each, at worst) take less room than the dense tensor."""
    survivors = int(keep.sum())
    return survivors * (weight.element_size() * 8 + 8) < weight.numel() * weight.element_size() * 8


def _export_onnx(model: nn.Module, meta: dict[str, Any], out: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it; a clear message when it is missing)
    except ImportError:
        raise ExportError("--format onnx needs the onnx package: pip install 'prunet[onnx]'") from None
    example = example_input_of(meta)
    if example is None:
        raise ExportError("--format onnx: the checkpoint names neither a registry model nor its input shape")
    # The TorchScript exporter: the newer torch.export one needs onnxscript as well, and these
    # feed-forward models need nothing it adds. Its deprecation notice is not the user's business.
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def file_meta(path: str | Path) -> dict[str, Any]:
    """The metadata a prunet file records (model, its arguments, the data split it was trained on), checked,
    without building anything."""
    kind = file_kind(path)
    if kind == "foreign":
        raise CompactFileError(f"{path} is a safetensors file but not one prunet wrote (no prunet header)")
    if kind == "checkpoint":
        try:
            return read_meta(path)
        except CheckpointError as e:
            raise CompactFileError(str(e)) from None
    return read_header(path).get("meta") or {}


def file_kind(path: str | Path) -> str:
    """``compact``, ``checkpoint`` or ``foreign``, from a safetensors file's metadata (a torch state dict: ``checkpoint``)."""
    if is_torch_file(Path(path)):
        return "checkpoint"
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CompactFileError(f"{path} is not a prunet file: unreadable or truncated ({str(e).splitlines()[0]})") \
            from None
    if "prunet_compact" in keys:
        return "compact"
    if "prunet" in keys:
        return "checkpoint"
    return "foreign"


def save(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with its masks as a prunet checkpoint (safetensors, written whole): :func:`load` reads it.

    Args:
        model: any model; a pruned one keeps its masks (its ``*_prunet_mask`` buffers) in the file.
        path: the file, conventionally ``*.safetensors``.
        meta: JSON metadata; ``{"model": "lenet_300_100"}`` (a registry name) lets :func:`load` build the
            model itself; otherwise load into your own module (``load(path, model=MyNet())``).
            ``input_shape`` (one example's, e.g. ``[64]``) and ``input_dtype`` (``int64`` for token
            ids; float32 when absent) let a loader check the model runs, tune ``sparse=True`` and
            export ONNX without an example from you.

    Returns:
        ``path``.

    Example:
        >>> import prunet
        >>> model = prunet.create_model("lenet_300_100")
        >>> _ = prunet.Pruner(model).prune(prunet.Sparsity(0.9))
        >>> _ = prunet.save(model, "pruned.safetensors")
        >>> back = prunet.load("pruned.safetensors", model=prunet.create_model("lenet_300_100"))
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.equal(back(x), model(x))
        True
    """
    return save_checkpoint(path, model, dict(meta or {}))


def load(
    path: str | Path,
    sparse: bool = False,
    model: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    trust_factory: Trust = False,
) -> nn.Module:
    """A plain model from a compact file or a prunet checkpoint, in eval mode.

    Args:
        path: a file written by :func:`export` or a prunet checkpoint (masks are multiplied in).
        sparse: run the pruned layers with sparse kernels where they are faster (see
            :func:`prunet.sparse.modules.sparsify`; the model's repr says which).
        model: the model to load into (a fresh instance of the model that was saved): a file's
            own model is then never built, so no trust is needed.
        example_input: with ``sparse``, the batch the kernels are chosen for; default one
            example of the registry model's input size (batch 1).
        trust_factory: a file of the user's own model names the factory that builds it, code
            that loading would run; it is called only when ``True`` (you trust the file) or in this
            collection of specs. Registry models, and ``model=``, need no trust.

    Returns:
        The model; its outputs equal the pruned model's.

    Raises:
        CompactFileError: a missing, truncated, corrupt, foreign or newer file.
        prunet.factory.UntrustedFactoryError: the file names a factory that is not trusted (nothing ran).
    """
    path = Path(path)
    if not path.is_file():
        raise CompactFileError(f"{path} does not exist")
    plain, meta = _load_plain(path, model, trust_factory)
    plain.eval()
    example = example_input_of(meta, model_device(plain))
    _check_runs(plain, example, path)
    if not sparse:
        return plain
    if example_input is None:
        if example is None:
            raise ExportError("load(sparse=True) of a model whose file records no input shape needs example_input")
        example_input = example
    return sparsify(plain, example_input)


def _load_plain(path: Path, model: nn.Module | None, trust: Trust) -> tuple[nn.Module, dict[str, Any]]:
    kind = file_kind(path)
    if kind == "foreign":
        raise CompactFileError(f"{path} is a safetensors file but not one prunet wrote (no prunet header)")
    if kind == "checkpoint":
        try:
            loaded, pruner, meta = load_checkpoint(path, trust, model)  # model given: nothing the file names is built
        except CheckpointError as e:
            raise CompactFileError(str(e)) from None
        return (pruner.bake() if pruner is not None else loaded), meta
    state, header = read_compact(path)
    meta = header.get("meta") or {}
    plain = model if model is not None else _header_model(path, meta, trust)
    try:
        resize_to_state(plain, state)
        load_state(plain, state, path)
    except CheckpointError as e:
        raise CompactFileError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    return plain, meta


@torch.no_grad()
def _check_runs(model: nn.Module, example: torch.Tensor | None, path: Path) -> None:
    """One example of the recorded input shape through the loaded model: a file whose shapes fit the
    model's tensors one by one but not each other (a crafted or damaged header) fails here, in one line."""
    if example is None:
        return
    try:
        model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CompactFileError(f"{path}: the model it holds does not run on its input shape {list(example.shape[1:])} "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward pass, finished: on CUDA the kernels run asynchronously, so wait for them."""
    out = model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return out


def example_input_of(meta: dict[str, Any], device: torch.device | str | None = None) -> torch.Tensor | None:
    """A batch of one zero example, of the recorded input shape and type (``input_dtype``: token ids are
    ``int64``; float32 when unrecorded), or None when the file records no shape.

    Example:
        >>> example_input_of({"input_shape": [64], "input_dtype": "int64"}).dtype
        torch.int64
        >>> example_input_of({"model": "lenet_300_100"}).shape
        torch.Size([1, 1, 28, 28])
    """
    shape = recorded_input_shape(meta)
    if shape is None:
        return None
    name = meta.get("input_dtype") or "float32"
    if name not in INPUT_DTYPES:  # validate_meta refused it already where the file was read: never getattr a file's word
        raise ValueError(f"meta.input_dtype: {shown(name)} is not one of {', '.join(INPUT_DTYPES)}")
    return torch.zeros(1, *shape, dtype=getattr(torch, name), device=device)


def recorded_input_shape(meta: dict[str, Any]) -> list[int] | None:
    """One example's shape: recorded by the run (every model), else the registry's (its own models)."""
    if meta.get("input_shape"):
        return list(meta["input_shape"])
    name = meta.get("model")
    if name and not is_factory(name):
        try:
            return list(get_model_info(name).input_shape)
        except ValueError:
            return None
    return None


def _header_model(path: Path, meta: dict[str, Any], trust: Trust) -> nn.Module:
    """The model a compact file's header names: a registry model, or a trusted factory."""
    name = meta.get("model")
    if not name:
        raise CompactFileError(f"{path} names no registry model; pass the model: load(path, model=...)")
    check_trusted(name, trust, str(path))
    kwargs = meta.get("model_kwargs", {})
    try:
        return create_model(name, **kwargs)
    except (ValueError, TypeError, RuntimeError, MemoryError, OverflowError) as e:
        # torch's argument errors run over many lines; the first says what is wrong
        raise CompactFileError(f"{path}: cannot build {name} {kwargs} "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


@dataclass
class Measurement:
    """What :func:`measure` found: accuracy on a split and the latency of a forward pass.

    Attributes:
        accuracy: percent correct.
        examples: how many were evaluated.
        latency_ms: batch size -> median milliseconds per forward pass.
        plan: layer -> ``sparse`` or ``dense`` (the path each weight layer runs).
    """

    accuracy: float
    examples: int
    latency_ms: dict[int, float]
    plan: dict[str, str]


@torch.no_grad()
def measure(model: nn.Module, split: Dataset, norm: Normalization, batch_sizes: Sequence[int] = (1, 64),
            repeats: int = 20) -> Measurement:
    """Accuracy of ``model`` on ``split`` and its median forward latency at each batch size.

    Args:
        model: a loaded model (:func:`load`).
        split: the images, e.g. the test split; latency is timed on its first images.
        norm: the dataset's normalisation.
        batch_sizes: the batch sizes to time.
        repeats: forward passes timed per batch size.
    """
    _, accuracy = evaluate(model, split, norm)
    latency = {}
    for b in batch_sizes:
        x, _ = first_batch(split, b, mean=norm.mean, std=norm.std, device=model_device(model))
        latency[b] = 1000 * median_seconds(lambda: _forward(model, x), repeats)
    return Measurement(accuracy, len(split), latency, plan(model))
