"""The compact file of a pruned model: survivors and relative indices, nothing else.

A pruned layer is stored as its surviving values (float32, or float16 /
bfloat16 on request) and their positions as bit-packed relative indices in a
width chosen for that layer (:mod:`prunet.sparse.codec`). Every other tensor
(biases, unpruned layers, BatchNorm statistics) is stored as it is. The
container is safetensors, so nothing is unpickled; its header holds:

* ``format`` (``prunet-compact``) and ``version`` (:data:`VERSION`): a file of
  another format, or of a newer version, is refused with a clear error;
* ``meta``: the model's metadata (:mod:`prunet.meta`): its registry name and keyword
  arguments when it has one (otherwise the caller supplies the model; the shapes
  are in the file), one example's input shape;
* per pruned tensor: shape, survivors, bits, code count and the value dtype;
* per weight-shared tensor (version 2, Deep Compression): its codebook of 2^b
  values, the cluster index of each survivor and the relative-index codes, both
  Huffman coded (:mod:`prunet.sparse.huffman`), with their code lengths;
* ``checksum``: SHA-256 of every tensor's name, dtype, shape and bytes, so a
  flipped byte is an error, never a wrong model.

Anyone can recompute the checksum, so it does not stop a crafted file: every
header field is checked by type and range (:func:`read_header`, the model's
metadata by :func:`prunet.meta.validate_meta`), the dense tensors it describes are
bounded by the file's size, and the tensors are checked against the header
(names, dtypes, lengths) before anything is decoded or allocated.

Example:
    >>> from prunet import Pruner, Sparsity, create_model
    >>> model = create_model("lenet_300_100")
    >>> pruner = Pruner(model)
    >>> _ = pruner.prune(Sparsity(0.9))
    >>> masks = pruner.masks
    >>> state = pruner.bake().state_dict()  # the tensors, masks multiplied in
    >>> write_compact("model.prunet", state, masks, {"model": "lenet_300_100"})
    PosixPath('model.prunet')
    >>> back, header = read_compact("model.prunet")  # dense tensors again, pruned entries zero
    >>> all(torch.equal(back[name], state[name]) for name in state)
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prunet.checkpoint import checksum, own_storage
from prunet.files import atomic_path
from prunet.meta import MAX_SHARED_BITS, check_int, check_mapping, check_str, shown, validate_meta
from prunet.sparse import codec, huffman

FORMAT = "prunet-compact"
VERSION = 2  # 2: weight-shared tensors (a codebook, Huffman-coded cluster indices and relative indices)
_META_KEY = "prunet_compact"
VALUE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_RANK = 8
# The dense tensors a header may describe: a file of n bytes holds at most max(FLOOR, PER_BYTE * n)
# weights. Pruning keeps at least a few survivors in a thousand, each a byte or more, so a real file
# stays far below; a header claiming more is corrupt or crafted, and is refused before it is allocated.
DENSE_FLOOR = 2**26
DENSE_PER_BYTE = 1024
_SHARED_PARTS = ("codebook", "meta", "clusters", "clusters_lengths", "index", "index_lengths")


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
    """The header of a compact file, every field checked by type and range (tensors not read).

    Raises:
        CompactFileError: a missing, unreadable or foreign file, a newer version, or a field
            out of its type or range (the message names the file and the field).
    """
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
    except (ValueError, RecursionError):
        raise CompactFileError(f"{path}: its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CompactFileError(f"{path}: not a {FORMAT} file")
    version = header.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CompactFileError(f"{path} has format version {version}; this prunet reads up to {VERSION}: "
                               "upgrade prunet")
    try:
        check_int(version, "version", 1, VERSION)
        _check_fields(header, path.stat().st_size)
    except ValueError as e:
        raise CompactFileError(f"{path}: {e}") from None
    try:
        validate_meta(header["meta"], str(path))
    except ValueError as e:
        raise CompactFileError(str(e)) from None
    return header


def _check_fields(header: Mapping[str, Any], file_bytes: int) -> None:
    """Every field of a header but ``meta``, by type and range; the dense sizes within what the file can hold.

    Raises:
        ValueError: ``"<field>: <what is wrong>"``.
    """
    for key in ("meta", "value_dtype", "sparse", "plain", "checksum"):
        if key not in header:
            raise ValueError(f"{key}: missing")
    if not isinstance(header["value_dtype"], str) or header["value_dtype"] not in VALUE_DTYPES:
        raise ValueError(f"value_dtype: {shown(header['value_dtype'])} is not one of {', '.join(VALUE_DTYPES)}")
    check_str(header["checksum"], "checksum")
    plain = header["plain"]
    if not isinstance(plain, list) or not all(isinstance(name, str) for name in plain):
        raise ValueError(f"plain: {shown(plain)} is not a list of tensor names")
    if len(set(plain)) < len(plain):
        raise ValueError(f"plain: {shown(next(n for n in plain if plain.count(n) > 1))} is named twice")
    sparse = check_mapping(header["sparse"], "sparse")
    both = set(plain) & set(sparse)
    if both:
        raise ValueError(f"plain: {shown(sorted(both)[0])} is also in sparse")
    budget = max(DENSE_FLOOR, DENSE_PER_BYTE * file_bytes)
    total = 0
    for name, spec in sparse.items():
        field = f"sparse[{shown(name)}]"  # a tensor name, whatever it is
        spec = check_mapping(spec, field)
        size = _size(spec, f"{field}.shape")
        total += size
        if total > budget:
            raise ValueError(f"{field}.shape: {shown(spec['shape'])} brings the dense tensors to {total:,} "
                             f"elements, more than a file of {file_bytes:,} bytes describes (at most {budget:,})")
        shared = spec.get("shared", False)
        if not isinstance(shared, bool):
            raise ValueError(f"{field}.shared: {shown(shared)} is not true or false")
        if not shared:
            for key in ("survivors", "bits", "codes"):
                if key not in spec:
                    raise ValueError(f"{field}.{key}: missing")
            survivors = _count(spec["survivors"], f"{field}.survivors", 0, size, f"a shape of {size:,} elements")
            bits = check_int(spec["bits"], f"{field}.bits", 1, codec.MAX_BITS)
            _count(spec["codes"], f"{field}.codes", survivors, _most_codes(size, survivors, bits),
                   f"{survivors:,} survivors of {size:,} in {bits}-bit codes")


def _size(spec: Mapping[str, Any], field: str) -> int:
    """The element count of a dense shape: a list of at most :data:`MAX_RANK` whole numbers >= 0."""
    if "shape" not in spec:
        raise ValueError(f"{field}: missing")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{field}: {shown(shape)} is not a list of at most {MAX_RANK} whole numbers >= 0")
    return math.prod(shape)


def _count(value: Any, field: str, lo: int, hi: int, context: str) -> int:
    """:func:`~prunet.meta.check_int` for a count whose range another field sets, that field told."""
    try:
        return check_int(value, field, lo, hi)
    except ValueError as e:
        raise ValueError(f"{e}, for {context}") from None


def _most_codes(size: int, survivors: int, bits: int) -> int:
    """The most codes ``survivors`` positions in ``size`` take: each filler skips ``2^bits - 1`` empty positions."""
    return survivors + (size - survivors) // ((1 << bits) - 1)


def _check_tensors(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """The file holds exactly the tensors its (checked) header names, each of the dtype and length it says.

    Raises:
        ValueError: ``"<field>: <what is wrong>"``.
    """
    named = list(header["plain"])
    for name, spec in header["sparse"].items():
        parts = _SHARED_PARTS if spec.get("shared") else ("values", "index")
        named += [f"{name}.{part}" for part in parts]
    if len(set(named)) < len(named):
        twice = next(n for n in named if named.count(n) > 1)
        raise ValueError(f"the header names the tensor {shown(twice)} twice")
    missing = [n for n in named if n not in tensors]
    if missing:
        raise ValueError(f"the header names the tensor {shown(missing[0])}, which the file does not hold")
    extra = sorted(set(tensors) - set(named))
    if extra:
        raise ValueError(f"the file holds the tensor {shown(extra[0])}, which its header does not name")
    values = VALUE_DTYPES[header["value_dtype"]]
    for name, spec in header["sparse"].items():
        field = f"sparse[{shown(name)}]"  # a tensor name, whatever it is
        if spec.get("shared"):
            _check_shared(name, math.prod(spec["shape"]), tensors, field)
        else:
            _check_vector(tensors, f"{name}.values", values, spec["survivors"], field)
            _check_vector(tensors, f"{name}.index", torch.uint8, -(-spec["codes"] * spec["bits"] // 8), field)


def _check_vector(tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, length: int | None,
                  field: str) -> None:
    """``tensors[key]`` is one-dimensional, of ``dtype`` and (unless None) ``length``."""
    t = tensors[key]
    if t.dtype != dtype or t.dim() != 1 or (length is not None and t.numel() != length):
        wanted = f"{length:,} " if length is not None else "a vector of "
        raise ValueError(f"{field}: the tensor {shown(key)} holds {str(t.dtype).removeprefix('torch.')} of shape "
                         f"{list(t.shape)}; expected {wanted}{str(dtype).removeprefix('torch.')} values")


def _check_shared(name: str, size: int, tensors: Mapping[str, torch.Tensor], field: str) -> None:
    """A weight-shared tensor's parts: its counts in range, its code-length tables one entry a symbol."""
    _check_vector(tensors, f"{name}.meta", torch.int64, 3, field)
    bits, n_codes, survivors = (int(v) for v in tensors[f"{name}.meta"].tolist())
    where = f"{field}: its tensor {shown(name + '.meta')}"
    check_int(bits, f"{where}, bits", 1, codec.MAX_BITS)
    _count(survivors, f"{where}, survivors", 0, size, f"a shape of {size:,} elements")
    _count(n_codes, f"{where}, codes", survivors, _most_codes(size, survivors, bits),
           f"{survivors:,} survivors of {size:,} in {bits}-bit codes")
    _check_vector(tensors, f"{name}.codebook", torch.float32, None, field)
    k = tensors[f"{name}.codebook"].numel()
    check_int(k, f"{field}: the size of its codebook", 1 if survivors else 0, 1 << MAX_SHARED_BITS)
    _check_vector(tensors, f"{name}.clusters", torch.uint8, None, field)
    _check_vector(tensors, f"{name}.index", torch.uint8, None, field)
    _check_vector(tensors, f"{name}.clusters_lengths", torch.uint8, k, field)
    _check_vector(tensors, f"{name}.index_lengths", torch.uint8, 1 << bits, field)


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
    try:
        _check_tensors(header, tensors)
    except ValueError as e:
        raise CompactFileError(f"{path}: {e}") from None
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
    return checksum(dict(tensors), json.dumps(header, sort_keys=True))
