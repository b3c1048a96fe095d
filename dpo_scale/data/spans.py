"""64-bit hashes of token-id spans and of their n-grams, computed with numpy over flat token arrays (a store shard's
memory-mapped tokens, or pairs concatenated in memory): no Python object per pair or per token.

A span's hash is a polynomial in its tokens, each first scrambled by splitmix64, evaluated modulo 2**64:
h(x_0..x_{L-1}) = finish(sum_k mix(x_k) * B**k, L). From one prefix sum S over a chunk of tokens every span and
every n-gram follows in O(1): (S[end] - S[start]) * B**-start (B is odd, so it has an inverse modulo 2**64). The
hash depends only on the span's tokens, not on where they lie, so an n-gram inside a long prompt and the same
tokens as a whole short prompt hash alike. Two different spans collide with probability about 2**-64 for data
nobody built to collide: among a million pairs, about 3e-8 that any two do.
"""

from __future__ import annotations

import numpy as np

B = np.uint64(0x9E3779B97F4A7C15 | 1)
B_INVERSE = np.uint64(pow(int(B), -1, 2**64))
LENGTH_SALT = np.uint64(0xD6E8FEB86659FD93)
CHUNK_TOKENS = 1 << 18
"""Tokens gathered per step: about 10 MiB of transient arrays whatever the data's size (a few 2 MiB uint64 and
int64 arrays, and the power tables); larger chunks were no faster on a 2-core Xeon, and cost more memory."""

def span_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive spans of `lengths` begins in their concatenation: 0, l0, l0 + l1, ... (int64)."""
    lengths = np.asarray(lengths, np.int64)
    return np.cumsum(lengths) - lengths


def expand_ranges(low: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """low[i], low[i] + 1, ..., low[i] + counts[i] - 1 for every i, concatenated (int64; empty for no ranges)."""
    counts = np.asarray(counts, np.int64)
    return np.repeat(np.asarray(low, np.int64) - span_starts(counts), counts) + np.arange(int(counts.sum()))


_powers: tuple[np.ndarray, np.ndarray] = (np.ones(1, np.uint64), np.ones(1, np.uint64))
_mix_table: np.ndarray | None = None
_counting = np.zeros(0, np.int64)


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (the multiplications wrap modulo 2**64 on purpose)."""
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B**k, B**-k) for k < size, kept between calls (16 bytes a token of the largest chunk seen)."""
    global _powers
    if len(_powers[0]) < size:
        size = max(size, CHUNK_TOKENS)
        _powers = tuple(np.cumprod(np.r_[np.uint64(1), np.full(size - 1, b)], dtype=np.uint64) for b in (B, B_INVERSE))
    return _powers


def _count(size: int) -> np.ndarray:
    """np.arange(size), int64, from a table kept between calls (one per chunk would be made and freed ~1,600 times
    at a million pairs)."""
    global _counting
    if len(_counting) < size:
        _counting = np.arange(max(size, CHUNK_TOKENS), dtype=np.int64)
    return _counting[:size]


def _finish(sums: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return mix(sums ^ (lengths.astype(np.uint64) * LENGTH_SALT))


def _chunks(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive [first, last) span ranges of at most CHUNK_TOKENS tokens each (a longer span alone)."""
    ends = np.cumsum(lengths)
    bounds, first = [], 0
    while first < len(lengths):
        base = ends[first - 1] if first else 0
        last = max(int(np.searchsorted(ends, base + CHUNK_TOKENS, side="right")), first + 1)
        bounds.append((first, last))
        first = last
    return bounds


def _mixed(ids: np.ndarray) -> np.ndarray:
    """mix(ids) as a new uint64 array. For 16-bit ids (the store's usual dtype) a lookup in mix's table of all 65,536
    values: one gather from 512 KiB that stays in cache, instead of ten passes over the chunk (`take`: about twice
    as fast as fancy indexing, which first converts the ids to intp)."""
    global _mix_table
    if ids.dtype == np.uint16:
        if _mix_table is None:
            _mix_table = mix(np.arange(1 << 16, dtype=np.uint64))
        return _mix_table.take(ids)
    return mix(ids.astype(np.uint64))


def _prefix_sums(ids: np.ndarray) -> np.ndarray:
    """(L + 1,) S[k] = sum over j < k of mix(ids[j]) * B**j."""
    total = len(ids)
    values = _mixed(ids)
    values *= _power_tables(total + 1)[0][:total]
    sums = np.empty(total + 1, np.uint64)
    sums[0] = 0
    np.cumsum(values, dtype=np.uint64, out=sums[1:])
    return sums


def _gathered(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prefix sums over the spans laid end to end (L + 1,), each span's offset in them (n,))."""
    offsets = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    total = int(offsets[-1] + lengths[-1]) if len(lengths) else 0
    low = int(starts.min()) if len(starts) else 0
    high = int((starts + lengths).max()) if len(starts) else 0
    window = np.asarray(tokens[low:high])  # one read of the chunk's part of a memory-mapped shard
    positions = np.repeat(starts - low - offsets, lengths)  # (L,) each token's place in the window
    positions += _count(total)
    return _prefix_sums(window[positions]), offsets


def _hashes(sums: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The spans at `offsets` of the sequence whose prefix sums are `sums`: (S[end] - S[start]) * B**-start."""
    _, inverse = _power_tables(len(sums))
    return _finish((sums[offsets + lengths] - sums[offsets]) * inverse[offsets], lengths)


def _chunk_hashes(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One chunk's span hashes. Where the spans lie one after another from the first (a store shard's pairs, laid
    end to end: the window holds at most 1/8 more tokens than they do), the prefix sums run over the shard's tokens
    in place, without building each token's position; spans before the first (a pair whose tokens an earlier pair
    already holds) are gathered on their own. Other spans are all gathered end to end. Both give the same hashes."""
    low, total = int(starts[0]), int(lengths.sum())
    inside = starts >= low
    high = int((starts + lengths)[inside].max())
    if high - low > total + total // 8:
        return _hashes(*_gathered(tokens, starts, lengths), lengths)
    out = np.empty(len(starts), np.uint64)
    out[inside] = _hashes(_prefix_sums(np.asarray(tokens[low:high])), starts[inside] - low, lengths[inside])
    if not inside.all():
        out[~inside] = _hashes(*_gathered(tokens, starts[~inside], lengths[~inside]), lengths[~inside])
    return out


def span_hashes(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n,) uint64: the hash of tokens[starts[i] : starts[i] + lengths[i]] for each i (empty spans included)."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    out = np.empty(len(starts), np.uint64)
    with np.errstate(over="ignore"):
        for first, last in _chunks(lengths):
            out[first:last] = _chunk_hashes(tokens, starts[first:last], lengths[first:last])
    return out


def ngram_hashes(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every n-token window inside each span: (hashes (m,) uint64, the span each came from (m,) int64), span by
    span in order. A span shorter than n has none."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    hashes, owners = [], []
    with np.errstate(over="ignore"):
        for first, last in _chunks(lengths):
            spans = lengths[first:last]
            windows = np.maximum(spans - n + 1, 0)
            if not windows.sum():
                continue
            sums, offsets = _gathered(tokens, starts[first:last], spans)
            owner = np.repeat(np.arange(first, last, dtype=np.int64), windows)
            begin = expand_ranges(offsets, windows)
            hashes.append(_hashes(sums, begin, np.full(len(begin), n, np.int64)))
            owners.append(owner)
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hashes), np.concatenate(owners)
