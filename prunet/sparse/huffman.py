"""Canonical Huffman coding of small-alphabet symbol streams (cluster indices, relative-index codes).

A stream is stored as its code lengths (one byte per symbol of the alphabet, 0
for a symbol that never occurs) and the packed bits; canonical codes are
rebuilt from the lengths alone, so no tree is stored.

Example:
    >>> symbols = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3])
    >>> lengths = code_lengths(np.bincount(symbols))  # the frequent symbol gets the short code
    >>> lengths
    array([1, 2, 3, 3], dtype=uint8)
    >>> data = encode(symbols, lengths)  # 5 x 1 + 2 x 2 + 3 + 3 = 15 bits
    >>> len(data)
    2
    >>> decode(data, lengths, len(symbols))
    array([0, 0, 0, 0, 0, 1, 1, 2, 3])
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LENGTH = 24  # longer codes are flattened (a length-limited code, a hair above the optimum)


def code_lengths(counts: np.ndarray, max_length: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols with count 0), at most ``max_length`` bits.

    A stream of one distinct symbol gets a 1-bit code.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    depth = np.zeros(counts.size, dtype=np.int64)
    tie = len(heap)
    while len(heap) > 1:
        a, _, sa = heapq.heappop(heap)
        b, _, sb = heapq.heappop(heap)
        for s in sa + sb:
            depth[s] += 1
        heapq.heappush(heap, (a + b, tie, sa + sb))
        tie += 1
    if depth.max() > max_length:
        depth = _limit(depth, used, counts, max_length)
    lengths[used] = depth[used]
    return lengths


def _limit(depth: np.ndarray, used: np.ndarray, counts: np.ndarray, max_length: int) -> np.ndarray:
    """Clamp code lengths to ``max_length`` and lengthen the shortest codes until Kraft's sum is <= 1."""
    depth = depth.copy()
    depth[used] = np.minimum(depth[used], max_length)
    order = used[np.argsort(-counts[used], kind="stable")]  # most frequent first: lengthen the rarest first
    while np.sum(2.0 ** -depth[used].astype(np.float64)) > 1.0:
        for s in order[::-1]:
            if depth[s] < max_length:
                depth[s] += 1
                break
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (as an integer of ``lengths[s]`` bits), from the lengths alone."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        codes[s] = code
        previous = int(lengths[s])
        code += 1
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """The packed bits of ``symbols`` under the canonical code of ``lengths`` (most significant bit first)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths[symbols] == 0).any():
        raise ValueError("a symbol has no code (its length is 0)")
    codes = canonical_codes(lengths)
    width = lengths[symbols]
    value = codes[symbols]
    # Bit j of a code (from its most significant) lands at offset start + j of the stream.
    starts = np.concatenate([[0], np.cumsum(width)[:-1]])
    total = int(width.sum())
    bits = np.zeros(total, dtype=np.uint8)
    for j in range(int(width.max())):
        has = width > j
        bits[starts[has] + j] = (value[has] >> (width[has] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` symbols :func:`encode` packed into ``data``.

    Vectorised, without a Python loop per symbol: every bit position's next ``longest`` bits
    are looked up at once (the symbol a code starting there would be, and its length), and
    the chain of code starts from bit 0 is followed by pointer doubling: ``BLOCK`` codes at a
    time between block starts, then every block filled in ``BLOCK`` gathers.

    Raises:
        ValueError: the bits do not decode to ``count`` symbols (a corrupt stream).
    """
    if count < 0:
        raise ValueError(f"the Huffman stream is corrupt: a count of {count} symbols")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not lengths.any():
        raise ValueError("no symbol has a code")
    if lengths.min() < 0 or lengths.max() > MAX_LENGTH:
        raise ValueError(f"the Huffman stream is corrupt: code lengths outside 0..{MAX_LENGTH}")
    used = lengths[lengths > 0]
    if np.ldexp(1.0, -used).sum() > 1.0:  # Kraft's inequality; exact, the terms being multiples of 2^-24
        raise ValueError("the Huffman stream is corrupt: its code lengths are not those of a prefix code")
    codes = canonical_codes(lengths)
    longest = int(lengths.max())
    # A table on the next `longest` bits: each entry, the symbol whose code is their prefix, and its length.
    table_symbol = np.full(1 << longest, -1, dtype=np.int64)
    table_length = np.zeros(1 << longest, dtype=np.uint8)
    for s in np.flatnonzero(lengths):
        shift = longest - int(lengths[s])
        first = int(codes[s]) << shift
        table_symbol[first:first + (1 << shift)] = s
        table_length[first:first + (1 << shift)] = lengths[s]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    total = bits.size
    if count > total:  # every code is at least one bit
        raise ValueError("the Huffman stream is corrupt or truncated")
    keys = _window_keys(bits, longest)  # (total,) the `longest` bits from each position, as an integer
    del bits
    # next[p]: where the code starting at bit p ends (total: the end; a position with no code goes there too).
    # About 17 bytes a bit of stream at the peak (keys, next, the doubling's arrays, the output).
    index = np.int32 if total < 2**31 - 64 else np.int64
    nxt = np.arange(total + 1, dtype=index)
    step = table_length[keys]
    nxt[:-1] += step
    nxt[:-1][step == 0] = total
    del step
    np.minimum(nxt, total, out=nxt)  # the end maps to itself
    starts = _chain(nxt, count)  # (count,) the bit where each symbol's code starts
    del nxt
    if (starts >= total).any():
        raise ValueError("the Huffman stream is corrupt or truncated")
    out = table_symbol[keys[starts]]
    last = int(starts[-1]) + int(table_length[keys[starts[-1]]])
    if (out < 0).any() or last > total:
        raise ValueError("the Huffman stream is corrupt or truncated")
    return out


BLOCK = 256  # codes between the block starts that pointer doubling finds


def _window_keys(bits: np.ndarray, width: int) -> np.ndarray:
    """For every position of ``bits``, the next ``width`` bits (zeros past the end) read as an integer."""
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)])
    keys = np.zeros(bits.size, dtype=np.int32)  # width <= MAX_LENGTH (24) bits fit
    for j in range(width):  # bit j of the window is the (width - 1 - j)-th binary digit of the key
        keys <<= 1
        keys |= padded[j:j + bits.size]
    return keys


def _chain(nxt: np.ndarray, count: int) -> np.ndarray:
    """``p_0 = 0, p_{i+1} = nxt[p_i]`` for ``i < count``, without a Python step per element."""
    jump = nxt
    for _ in range(BLOCK.bit_length() - 1):  # jump = nxt applied BLOCK times
        jump = jump[jump]
    blocks = -(-count // BLOCK)
    heads = np.empty(blocks, dtype=np.int64)
    p = 0
    for b in range(blocks):  # one Python step per block of BLOCK codes
        heads[b] = p
        p = int(jump[p])
    out = np.empty((BLOCK, blocks), dtype=np.int64)
    cur = heads
    for j in range(BLOCK):
        out[j] = cur
        cur = nxt[cur]
    return out.T.reshape(-1)[:count]


def entropy_bits(counts: np.ndarray) -> float:
    """The empirical entropy of a stream with these symbol counts, in bits (its lower bound)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-(counts[counts > 0] * np.log2(p)).sum())
