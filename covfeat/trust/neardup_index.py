"""Multi-index hashing: every pair of 64-bit codes within a few bits, without comparing all pairs.

Split each code into m chunks.  Two codes that differ in at most ``r`` bits differ in at most
r // m bits on at least one chunk (pigeonhole), so only codes whose chunk is that close to the
query's are compared at all.  With chunks of about log2(number of codes) bits a bucket holds a
handful of codes, and the work grows with the number of candidates, not with n^2 (Norouzi,
Punjani and Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012).
:func:`near_codes` reports how many codes it compared, so tests can check the growth
without timing anything.
"""

from __future__ import annotations

from math import comb

import numpy as np

from covfeat.core.lazyjit import lazy_njit


def plan_chunks(n_codes: int, max_bits: int) -> tuple[list[tuple[int, int]], int, float]:
    """(shift, width) of each chunk, the radius searched within a chunk, and the modelled work
    per query (in codes compared).

    With m chunks, two codes within ``max_bits`` bits differ in at most max_bits // m bits on
    at least one chunk (pigeonhole).  Each query looks up every key within that radius of its
    own chunk, and every lookup finds about n_codes / 2^width codes: the number of chunks is
    the one that makes lookups plus codes compared smallest, so chunks widen as the index grows
    and a bucket stays small (the work per query grows slowly, not with n)."""
    best = None
    for m in range(2, 9):
        widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
        radius = max_bits // m
        if widths[0] > MAX_CHUNK_BITS or radius > 3:
            continue
        lookups = sum(_n_keys(w, radius) for w in widths)
        cost = lookups * (LOOKUP_COST + n_codes / 2.0 ** widths[-1])
        if best is None or cost < best[0]:
            best = (cost, widths, radius)
    if best is None:
        raise ValueError(f"max_bits {max_bits} is more than multi-index hashing of 64-bit codes serves here (at most 26)")
    cost, widths, radius = best
    bounds = list(zip(np.cumsum([0, *widths[:-1]]).tolist(), widths))
    return bounds, radius, cost


LOOKUP_COST = 8.0  # a bucket lookup (a cache miss in a large table) against one code compared, measured

MAX_CHUNK_BITS = 22  # a chunk's table of bucket starts has 2^width + 1 entries (16 MiB at 22 bits)


def _n_keys(width: int, radius: int) -> int:
    """Keys within ``radius`` bits of one key of ``width`` bits."""
    return sum(comb(width, k) for k in range(radius + 1))


def _chunk(codes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((codes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


class ChunkIndex:
    """The codes of a set of items (each item several codes, one per view), bucketed once per chunk."""

    def __init__(self, codes: np.ndarray, max_bits: int):
        codes = np.ascontiguousarray(codes, np.uint64)
        self.n_items, self.n_views = codes.shape
        self.flat = codes.ravel()
        self.max_bits = max_bits
        self.bounds, self.radius, _ = plan_chunks(len(self.flat), max_bits)
        order, starts = [], []
        for shift, width in self.bounds:
            key = _chunk(self.flat, shift, width)
            # the same stable order; numpy sorts keys of 16 bits or fewer by radix (linear), wider ones 2x faster
            o = np.argsort(key.astype(np.uint16 if width <= 16 else np.uint32), kind="stable")
            order.append(o)
            # starts[k] .. starts[k + 1]: where the codes whose chunk is k sit in ``order``
            starts.append(np.searchsorted(key[o], np.arange((1 << width) + 1)).astype(np.int32))
        self.order = np.stack(order)
        self.sorted_codes = self.flat[self.order]  # each chunk's buckets read in sequence
        self.starts = np.zeros((len(starts), max(len(x) for x in starts)), np.int32)
        for k, x in enumerate(starts):
            self.starts[k, :len(x)] = x
        self.widths = np.array([w for _, w in self.bounds], np.int64)

    def query(self, codes: np.ndarray, skip_self: bool) -> tuple[np.ndarray, int]:
        """Every (query row, item, view, bits) with bits <= max_bits, one row per (query, item)
        (its closest view), and the number of codes compared.

        ``skip_self``: the queries are the items themselves (query q is item q), and an item is
        not its own candidate."""
        codes = np.ascontiguousarray(codes, np.uint64)
        keys = np.stack([_chunk(codes, s, w) for s, w in self.bounds])
        return _query(codes, keys, self.widths, self.radius, self.sorted_codes, self.order, self.starts, self.n_views,
                      self.n_items, self.max_bits, skip_self)


@lazy_njit(cache=True, nogil=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@lazy_njit(cache=True, nogil=True)
def _neighbours(key, width, radius):
    """``key`` and every key within ``radius`` (at most 3) bits of it."""
    n = 1
    if radius >= 1:
        n += width
    if radius >= 2:
        n += width * (width - 1) // 2
    if radius >= 3:
        n += width * (width - 1) * (width - 2) // 6
    out = np.empty(n, np.int64)
    out[0] = key
    p = 1
    for a in range(width if radius >= 1 else 0):
        out[p] = key ^ (1 << a)
        p += 1
        for b in range(a + 1, width if radius >= 2 else 0):
            out[p] = key ^ (1 << a) ^ (1 << b)
            p += 1
            for c in range(b + 1, width if radius >= 3 else 0):
                out[p] = key ^ (1 << a) ^ (1 << b) ^ (1 << c)
                p += 1
    return out


@lazy_njit(cache=True, nogil=True)
def _query(codes, keys, widths, radius, sorted_codes, order, starts, n_views, n_items, max_bits, skip_self):
    n_q = codes.shape[0]
    seen = np.full(n_items, -1, np.int64)  # the last query that met each item, and where its row is
    slot = np.zeros(n_items, np.int64)
    cap = 1024
    out = np.empty((cap, 4), np.int64)
    n_out = 0
    compared = 0
    for q in range(n_q):
        for c in range(keys.shape[0]):
            for k in _neighbours(keys[c, q], widths[c], radius):
                for p in range(starts[c, k], starts[c, k + 1]):
                    compared += 1
                    bits = np.int64(_popcount(codes[q] ^ sorted_codes[c, p]))
                    if bits > max_bits:
                        continue
                    e = order[c, p]
                    item = e // n_views
                    if skip_self and item == q:
                        compared -= 1
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
