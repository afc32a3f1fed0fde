"""Relative indices in a fixed bit width, bit-packed: the positions of a layer's surviving weights.

Han et al. store a pruned layer as its surviving values and, for each, the
distance to the previous survivor in a small fixed number of bits (Deep
Compression, section 3: 8 bits for conv, 5 for fc). A gap longer than the width
can express is bridged by filler entries. Here, with ``b`` bits:

* code ``c`` in ``1 .. 2^b - 1``: the next survivor is ``c`` positions after the previous one;
* code ``0``: a filler, advance ``2^b - 1`` positions, no survivor (so no value is stored for it).

The positions are those of the flattened (row-major) weight, starting before
position 0. :func:`best_bits` picks the width that makes the codes shortest for
the layer at hand; for random positions at density ``d`` that lands within a
few percent of the entropy bound ``H(d) / d`` bits per survivor
(:func:`entropy_bits_per_survivor`).

Example:
    >>> codes = encode_gaps(np.array([0, 3, 40]), bits=5)
    >>> codes.tolist()   # gaps 1, 3, 37 = 31 + 6
    [1, 3, 0, 6]
    >>> decode_positions(codes, bits=5).tolist()
    [0, 3, 40]
"""

from __future__ import annotations

import math

import numpy as np

MAX_BITS = 16


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Distances from each position to the previous one (the first from -1): all >= 1 for sorted unique positions."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.diff(positions, prepend=-1)


def fillers(gaps: np.ndarray, bits: int) -> int:
    """How many filler entries ``bits``-bit codes need for these gaps."""
    longest = (1 << bits) - 1
    return int(((np.asarray(gaps, dtype=np.int64) - 1) // longest).sum())


def best_bits(gaps: np.ndarray) -> int:
    """The width in ``1..16`` bits whose codes (fillers included) take the fewest bits; ties go to the narrower."""
    gaps = np.asarray(gaps, dtype=np.int64)
    if gaps.size == 0:
        return 1
    costs = [(bits * (gaps.size + fillers(gaps, bits)), bits) for bits in range(1, MAX_BITS + 1)]
    return min(costs)[1]


def encode_gaps(positions: np.ndarray, bits: int) -> np.ndarray:
    """The codes of sorted unique ``positions`` in ``bits`` bits, fillers included (uint32)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    gaps = gaps_of(positions)
    if (gaps < 1).any():
        raise ValueError("positions must be sorted, unique and >= 0")
    longest = (1 << bits) - 1
    pad = (gaps - 1) // longest  # fillers before each survivor
    where = np.arange(gaps.size) + np.cumsum(pad)  # each survivor's entry, after its fillers
    codes = np.zeros(gaps.size + int(pad.sum()), dtype=np.uint32)
    codes[where] = gaps - pad * longest
    return codes


def decode_positions(codes: np.ndarray, bits: int) -> np.ndarray:
    """The positions that :func:`encode_gaps` encoded (int64)."""
    codes = np.asarray(codes, dtype=np.int64)
    advance = np.where(codes == 0, (1 << bits) - 1, codes)
    return (np.cumsum(advance) - 1)[codes != 0]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit codes packed little-endian into bytes (uint8), the last byte zero-padded."""
    codes = np.asarray(codes, dtype=np.uint32)
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1  # (n, bits), lowest bit first
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little")


def unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` ``bits``-bit codes of :func:`pack`'s bytes (uint32)."""
    data = np.asarray(data, dtype=np.uint8)
    if data.size * 8 < count * bits:
        raise ValueError(f"{data.size} bytes hold fewer than {count} codes of {bits} bits")
    planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def entropy_bits_per_survivor(size: int, survivors: int) -> float:
    """The entropy bound on position bits per survivor: ``H(d) / d`` for density ``d = survivors / size``."""
    if survivors == 0 or survivors == size:
        return 0.0
    d = survivors / size
    return (-d * math.log2(d) - (1 - d) * math.log2(1 - d)) / d
