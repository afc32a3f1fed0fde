"""The compact file of a pruned model: survivors and relative indices, nothing else.

A pruned layer is stored as its surviving values (float32, or float16 /
bfloat16 on request) and their positions as bit-packed relative indices in a
width chosen for that layer (:mod:`prunet.sparse.codec`). Every other tensor
(biases, unpruned layers, BatchNorm statistics) is stored as it is. The
container is safetensors, so nothing is unpickled; its header holds:

* ``format`` (``prunet-compact``) and ``version`` (:data:`VERSION`): a file of
  another format, or of a newer version, is refused with a clear error;
* ``model``: the registry name and keyword arguments when the model has one
  (otherwise the caller supplies the model; the shapes are in the file);
* per pruned tensor: shape, survivors, bits, code count and the value dtype;
* per weight-shared tensor (version 2, Deep Compression): its codebook of 2^b
  values, the cluster index of each survivor and the relative-index codes, both
  Huffman coded (:mod:`prunet.sparse.huffman`), with their code lengths;
* ``checksum``: SHA-256 of every tensor's name, dtype, shape and bytes, so a
  flipped byte is an error, never a wrong model.

Example:
    >>> write_compact("model.prunet", model.state_dict(), pruner.masks, {"model": "lenet_300_100"})
    >>> state, header = read_compact("model.prunet")   # dense tensors, masks multiplied in
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prunet.checkpoint import own_storage
from prunet.files import atomic_path
from prunet.sparse import codec, huffman

FORMAT = "prunet-compact"
VERSION = 2  # 2: weight-shared tensors (a codebook, Huffman-coded cluster indices and relative indices)
_META_KEY = "prunet_compact"
VALUE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CompactFileError(ValueError):
    """A compact file that is missing, truncated, corrupt, foreign or too new; the message names it."""


@dataclass(frozen=True)
class SparseTensorInfo:
    """How one pruned tensor is stored.

    Attributes:
        shape: the dense shape.
        survivors: stored values.
        bits: width of one relative-index code.
        codes: codes stored, fillers included (``codes - survivors`` fillers).
    """

    shape: tuple[int, ...]
    survivors: int
    bits: int
    codes: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def index_bits_per_survivor(self) -> float:
        return self.bits * self.codes / self.survivors if self.survivors else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "survivors": self.survivors, "bits": self.bits, "codes": self.codes}


def encode(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SparseTensorInfo]:
    """``(values, packed index bytes, info)`` of the entries of ``weight`` where ``keep`` is true."""
    flat_keep = keep.detach().reshape(-1).bool().cpu()
    positions = flat_keep.nonzero().reshape(-1).numpy()
    bits = codec.best_bits(codec.gaps_of(positions))
    codes = codec.encode_gaps(positions, bits)
    packed = torch.from_numpy(codec.pack(codes, bits))
    values = weight.detach().reshape(-1).cpu()[flat_keep].contiguous()
    return values, packed, SparseTensorInfo(tuple(weight.shape), int(positions.size), bits, int(codes.size))


def decode(values: torch.Tensor, packed: torch.Tensor, info: SparseTensorInfo) -> torch.Tensor:
    """The dense tensor :func:`encode` stored (zeros where nothing survived)."""
    codes = codec.unpack(packed.numpy(), info.bits, info.codes)
    positions = codec.decode_positions(codes, info.bits)
    if positions.size != info.survivors or (positions.size and positions[-1] >= info.size):
        raise ValueError("its relative indices do not match its header")
    dense = torch.zeros(info.size, dtype=values.dtype)
    dense[torch.from_numpy(positions)] = values
    return dense.reshape(info.shape)


def write_compact(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    value_dtype: str = "float32",
    shared: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model's tensors to a compact file, whole.

    Args:
        path: the file to write.
        state: the model's tensors (a ``state_dict`` without mask buffers).
        keep: tensor name -> boolean tensor of the survivors, for each tensor stored
            sparsely (the pruned weights); every other tensor of ``state`` is stored as it is.
        meta: JSON-serialisable metadata; ``model`` and ``model_kwargs`` let
            :func:`prunet.sparse.load` rebuild a registry model.
        value_dtype: ``float32``, ``float16`` or ``bfloat16`` for the survivors' values.
        shared: tensor name -> :class:`prunet.share.SharedLayer` for each weight-shared
            tensor (its codebook, clusters and survivors); stored Huffman coded.

    Returns:
        The path written.
    """
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype: {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    unknown = sorted(set(keep) - set(state))
    if unknown:
        raise ValueError(f"keep names tensors the state does not have: {unknown[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    shared = shared or {}
    for name, tensor in state.items():
        if name in shared:
            tensors.update(_encode_shared(name, tensor, shared[name]))
            sparse[name] = {"shape": list(tensor.shape), "shared": True}
        elif name in keep:
            values, packed, info = encode(tensor, keep[name])
            tensors[f"{name}.values"] = values.to(VALUE_DTYPES[value_dtype])
            tensors[f"{name}.index"] = packed
            sparse[name] = info.to_dict()
        else:
            tensors[name] = tensor.detach().contiguous().cpu()
    header = {"format": FORMAT, "version": VERSION, "meta": dict(meta), "value_dtype": value_dtype,
              "sparse": sparse, "plain": [n for n in state if n not in keep and n not in shared]}
    header["checksum"] = _checksum(tensors, header)
    with atomic_path(path) as tmp:
        save_file(own_storage(tensors), str(tmp), metadata={_META_KEY: json.dumps(header)})
    return Path(path)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a compact file, checked for format and version (tensors not read)."""
    path = Path(path)
    if not path.is_file():
        raise CompactFileError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CompactFileError(f"{path} is not a prunet compact file: unreadable or truncated "
                               f"({str(e).splitlines()[0]})") from None
    if raw is None:
        raise CompactFileError(f"{path} is a safetensors file but not a prunet compact file (no '{_META_KEY}' header)")
    try:
        header = json.loads(raw)
    except ValueError:
        raise CompactFileError(f"{path}: its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CompactFileError(f"{path}: not a {FORMAT} file")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CompactFileError(f"{path} has format version {version}; this prunet reads up to {VERSION}: "
                               "upgrade prunet")
    return header


def read_compact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The dense tensors of a compact file (pruned entries zero) and its header.

    Raises:
        CompactFileError: a missing, truncated, corrupt, foreign or newer file.
    """
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CompactFileError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    if _checksum(tensors, {k: v for k, v in header.items() if k != "checksum"}) != header.get("checksum"):
        raise CompactFileError(f"{path} is corrupt: its checksum does not match its contents")
    state: dict[str, torch.Tensor] = {}
    try:
        for name, spec in header["sparse"].items():
            if spec.get("shared"):
                state[name] = _decode_shared(name, tensors, tuple(spec["shape"]))
                continue
            info = SparseTensorInfo(tuple(spec["shape"]), spec["survivors"], spec["bits"], spec["codes"])
            state[name] = decode(tensors[f"{name}.values"], tensors[f"{name}.index"], info)
        for name in header["plain"]:
            state[name] = tensors[name]
    except (KeyError, TypeError, ValueError, RuntimeError, MemoryError) as e:
        raise CompactFileError(f"{path} is corrupt: {e}") from None
    return state, header


def stored_bytes(path: str | Path) -> dict[str, int]:
    """Bytes each of the model's tensors takes in a compact file (its values, indices, codebook, streams)."""
    header = read_header(path)
    owners = sorted([*header["sparse"], *header["plain"]], key=len, reverse=True)
    out = dict.fromkeys(owners, 0)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            owner = next((n for n in owners if key == n or key.startswith(n + ".")), None)
            if owner is not None:
                t = f.get_slice(key)
                out[owner] += int(np.prod(t.get_shape(), dtype=np.int64)) * _DTYPE_BYTES.get(t.get_dtype(), 4)
    return out


@dataclass(frozen=True)
class SharedStats:
    """One weight-shared tensor in a compact file, in the terms of Deep Compression's Tables 1-4.

    Attributes:
        survivors: weights kept (each stored as a cluster index).
        weight_bits: bits per weight index before Huffman coding (``log2`` of the codebook size).
        gap_bits: the width of a relative position's code before Huffman coding.
        index_bits: bits of positions per survivor before Huffman coding: ``gap_bits`` times the
            codes stored (a filler code bridges a longer gap) over the survivors.
        weight_bits_huffman, index_bits_huffman: the same streams Huffman coded, bits per survivor.
        shared_bytes: the tensor pruned and shared, before Huffman coding: codebook, b-bit
            indices and fixed-width positions.
        huffman_bytes: as stored: codebook and the two Huffman streams with their code lengths.
    """

    survivors: int
    weight_bits: int
    gap_bits: int
    index_bits: float
    weight_bits_huffman: float
    index_bits_huffman: float
    shared_bytes: int
    huffman_bytes: int


def shared_stats(path: str | Path) -> dict[str, SharedStats]:
    """Tensor name -> :class:`SharedStats` for each weight-shared tensor of a compact file."""
    header = read_header(path)
    names = [n for n, spec in header["sparse"].items() if spec.get("shared")]
    stored = stored_bytes(path)
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in names:
            gap_bits, n_codes, n = (int(v) for v in f.get_tensor(f"{name}.meta").tolist())
            k = int(np.prod(f.get_slice(f"{name}.codebook").get_shape()))
            weight_bits = max(1, math.ceil(math.log2(max(k, 2))))
            clusters = int(np.prod(f.get_slice(f"{name}.clusters").get_shape()))
            index = int(np.prod(f.get_slice(f"{name}.index").get_shape()))
            shared = 4 * k + math.ceil(n * weight_bits / 8) + math.ceil(n_codes * gap_bits / 8)
            out[name] = SharedStats(n, weight_bits, gap_bits, n_codes * gap_bits / max(n, 1),
                                    8 * clusters / max(n, 1), 8 * index / max(n, 1), shared, stored[name])
    return out


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I64": 8, "I32": 4, "BOOL": 1, "F64": 8}


def sparse_infos(header: Mapping[str, Any]) -> dict[str, SparseTensorInfo]:
    """Tensor name -> how it is stored, from a header (weight-shared tensors left out)."""
    return {name: SparseTensorInfo(tuple(s["shape"]), s["survivors"], s["bits"], s["codes"])
            for name, s in header["sparse"].items() if not s.get("shared")}


def _encode_shared(name: str, tensor: torch.Tensor, layer: Any) -> dict[str, torch.Tensor]:
    """The tensors of one weight-shared tensor: codebook, Huffman-coded clusters and relative indices."""
    flat_keep = layer.keep.reshape(-1).cpu()
    positions = flat_keep.nonzero().reshape(-1).numpy()
    bits = codec.best_bits(codec.gaps_of(positions))
    codes = codec.encode_gaps(positions, bits)
    clusters = layer.index.reshape(-1).cpu()[flat_keep].numpy()
    k = layer.codebook.numel()
    out = {f"{name}.codebook": layer.codebook.detach().float().cpu().contiguous(),
           f"{name}.meta": torch.tensor([bits, codes.size, clusters.size], dtype=torch.int64)}
    for stream, symbols, alphabet in (("clusters", clusters, k), ("index", codes, 1 << bits)):
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
        out[f"{name}.{stream}"] = torch.frombuffer(bytearray(huffman.encode(symbols, lengths)) or bytearray(1),
                                                   dtype=torch.uint8)
        out[f"{name}.{stream}_lengths"] = torch.from_numpy(lengths.copy())
    return out


def _decode_shared(name: str, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor :func:`_encode_shared` stored."""
    bits, n_codes, survivors = (int(v) for v in tensors[f"{name}.meta"])
    streams = {}
    for stream, count in (("clusters", survivors), ("index", n_codes)):
        data = tensors[f"{name}.{stream}"].numpy().tobytes()
        streams[stream] = huffman.decode(data, tensors[f"{name}.{stream}_lengths"].numpy(), count)
    positions = codec.decode_positions(streams["index"], bits)
    size = int(np.prod(shape, dtype=np.int64))
    codebook = tensors[f"{name}.codebook"]
    if positions.size != survivors or (positions.size and positions[-1] >= size) or \
            (survivors and streams["clusters"].max() >= codebook.numel()):
        raise ValueError(f"{name}: its streams do not match its header")
    dense = torch.zeros(size, dtype=codebook.dtype)
    dense[torch.from_numpy(positions)] = codebook[torch.from_numpy(streams["clusters"])]
    return dense.reshape(shape)


def _checksum(tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> str:
    """SHA-256 of the header (without its checksum) and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        shape = tuple(tensors[name].shape)
        t = tensors[name].contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{shape}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()
