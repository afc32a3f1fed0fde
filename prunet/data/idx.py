"""Read and write IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the array in C order,
big-endian. The files are often gzip-compressed.

The reader trusts nothing: every way a file can be damaged (wrong magic,
unknown dtype, short header, too little or too much data, a broken gzip
stream) raises :class:`DataError` with one line naming the file, never a
NumPy traceback and never silently wrong data.

Example:
    >>> write_idx("labels-idx1-ubyte.gz", np.array([3, 1, 4], dtype=np.uint8))
    >>> read_idx("labels-idx1-ubyte.gz")
    array([3, 1, 4], dtype=uint8)
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from prunet.files import write_bytes

__all__ = ["DataError", "read_idx", "write_idx"]


class DataError(ValueError):
    """Data missing, malformed or inconsistent; the message says which file and why."""


# IDX dtype code -> big-endian NumPy dtype.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
# The header's dimension count is a byte (up to 255); NumPy holds at most 32 dimensions (64 since 2.0).
# Images and labels have 1 to 4: more is a damaged header, refused before any size is computed from it.
MAX_NDIM = 32


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed.

    Compression is detected from the first two bytes, not the file name, so a
    renamed file still reads.

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the shape the header gives.

    Raises:
        DataError: the file cannot be read or is not a well-formed IDX file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        # A cut-off download raises EOFError; a damaged one any of the others.
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            raise DataError(f"{path}: gzip stream is truncated or corrupt ({e})") from e

    if len(raw) < 4:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, need at least 4)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DataError(f"{path}: not an IDX file (magic starts 0x{zero:04x}, expected 0x0000)")
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim > MAX_NDIM:
        raise DataError(f"{path}: the header claims {ndim} dimensions; at most {MAX_NDIM} can be read "
                        f"(images and labels have 1 to 4): a damaged header")

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header_size})"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])

    dtype = _DTYPES[code]
    # Python ints, so a header with huge dimensions cannot overflow the check.
    expected = dtype.itemsize * math.prod(shape)
    actual = len(raw) - header_size
    if actual != expected:
        kind = "shorter" if actual < expected else "longer"
        raise DataError(
            f"{path}: data is {kind} than the header says "
            f"({actual} bytes, shape {shape} of {dtype.name} needs {expected})"
        )

    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # astype copies: the result is writable (torch.from_numpy warns otherwise)
    # and in native byte order (torch rejects big-endian arrays).
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed if the name ends in ``.gz``.

    Args:
        path: the file to write; replaced if it exists.
        array: uint8, int8, int16, int32, float32 or float64, at most :data:`MAX_NDIM` dimensions
            (what :func:`read_idx` reads back).

    Raises:
        DataError: the dtype or shape cannot be stored in IDX.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _code_for(array.dtype)
    if code is None:
        raise DataError(
            f"{path}: IDX cannot store dtype {array.dtype} "
            "(use uint8, int8, int16, int32, float32 or float64)"
        )
    if array.ndim > MAX_NDIM or any(d >= 2**32 for d in array.shape):
        raise DataError(f"{path}: IDX cannot store shape {array.shape}")

    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        # mtime=0 so the same array always gives the same bytes.
        data = gzip.compress(data, mtime=0)
    write_bytes(path, data)


def _code_for(dtype: np.dtype) -> int | None:
    """The IDX code storing ``dtype`` (either byte order), or None."""
    for code, idx_dtype in _DTYPES.items():
        if dtype.kind == idx_dtype.kind and dtype.itemsize == idx_dtype.itemsize:
            return code
    return None

