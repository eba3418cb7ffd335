"""Multi-index hashing: every pair of 64-bit codes within a few bits, without comparing all pairs.

Split each code into ``r + 1`` chunks.  Two codes that differ in at most ``r`` bits agree
exactly on at least one chunk (pigeonhole), so only codes that share a chunk value with the
query are compared at all.  With chunks of about log2(number of codes) bits a bucket holds a
handful of codes, and the work grows with the number of candidates, not with n^2 (Norouzi,
Punjani and Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012).
:func:`near_codes` reports how many codes it compared, so tests can check the growth
without timing anything.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def chunk_bounds(max_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of the ``max_bits + 1`` chunks that cover 64 bits, widths differing by at most one."""
    m = max_bits + 1
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def _chunk(codes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((codes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


class ChunkIndex:
    """The codes of a set of items (each item several codes, one per view), sorted once per chunk."""

    def __init__(self, codes: np.ndarray, max_bits: int):
        codes = np.ascontiguousarray(codes, np.uint64)
        self.n_items, self.n_views = codes.shape
        self.flat = codes.ravel()
        self.max_bits = max_bits
        self.bounds = chunk_bounds(max_bits)
        keys = np.stack([_chunk(self.flat, s, w) for s, w in self.bounds])
        self.order = np.argsort(keys, axis=1, kind="stable")
        self.sorted = np.take_along_axis(keys, self.order, axis=1)

    def query(self, codes: np.ndarray, skip_self: bool) -> tuple[np.ndarray, int]:
        """Every (query row, item, view, bits) with bits <= max_bits, one row per (query, item)
        (its closest view), and the number of codes compared.

        ``skip_self``: the queries are the items themselves (query q is item q), and an item is
        not its own candidate."""
        codes = np.ascontiguousarray(codes, np.uint64)
        keys = np.stack([_chunk(codes, s, w) for s, w in self.bounds])
        return _query(codes, keys, self.flat, self.order, self.sorted, self.n_views, self.n_items, self.max_bits,
                      skip_self)


@njit(cache=True, nogil=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True, nogil=True)
def _query(codes, keys, flat, order, sorted_keys, n_views, n_items, max_bits, skip_self):
    n_q = codes.shape[0]
    seen = np.full(n_items, -1, np.int64)  # the last query that met each item, and where its row is
    slot = np.zeros(n_items, np.int64)
    cap = 1024
    out = np.empty((cap, 4), np.int64)
    n_out = 0
    compared = 0
    for q in range(n_q):
        for c in range(keys.shape[0]):
            k = keys[c, q]
            lo = np.searchsorted(sorted_keys[c], k, side="left")
            hi = np.searchsorted(sorted_keys[c], k, side="right")
            for p in range(lo, hi):
                e = order[c, p]
                item = e // n_views
                if skip_self and item == q:
                    continue
                compared += 1
                bits = np.int64(_popcount(codes[q] ^ flat[e]))
                if bits > max_bits:
                    continue
                if seen[item] == q:
                    s = slot[item]
                    if bits < out[s, 3]:
                        out[s, 2] = e % n_views
                        out[s, 3] = bits
                    continue
                if n_out == cap:
                    cap *= 2
                    grown = np.empty((cap, 4), np.int64)
                    grown[:n_out] = out[:n_out]
                    out = grown
                seen[item] = q
                slot[item] = n_out
                out[n_out, 0] = q
                out[n_out, 1] = item
                out[n_out, 2] = e % n_views
                out[n_out, 3] = bits
                n_out += 1
    return out[:n_out], compared


def near_codes(query: np.ndarray, codes: np.ndarray, max_bits: int, skip_self: bool = False) -> tuple[np.ndarray, int]:
    """Rows (query row, item, view, bits) where ``query[q]`` is within ``max_bits`` bits of some
    view of ``codes[item]`` (its closest view), and how many codes were compared to find them.

    Parameters
    ----------
    query : (m,) uint64
    codes : (n, views) uint64
    skip_self : the query rows are the items themselves; an item is never its own candidate
    """
    return ChunkIndex(codes, max_bits).query(query, skip_self)
