"""Multi-index hashing: every pair of 64-bit codes within a few bits, without comparing all pairs.

Split each code into m chunks and give chunk c a radius r_c with sum(r_c + 1) > r.  Two codes
that differ in at most ``r`` bits then differ in at most r_c bits on at least one chunk c
(pigeonhole), so only codes whose chunk is that close to the query's are compared at all.  With
chunks of about log2(number of codes) bits a bucket holds a handful of codes, and the work grows
with the number of candidates, not with n^2 (Norouzi, Punjani and Fleet, "Fast search in Hamming
space with multi-index hashing", CVPR 2012).  :func:`near_codes` reports how many codes it
compared, so tests can check the growth without timing anything."""

from __future__ import annotations

from math import comb

import numpy as np

from covfeat.core.lazyjit import lazy_njit


def plan_chunks(n_codes: int, max_bits: int) -> tuple[list[tuple[int, int]], list[int], float]:
    """(shift, width) of each chunk, the radius searched within each chunk, and the modelled work
    per query (buckets probed times LOOKUP_COST, plus codes compared).

    Pigeonhole, generalised: if two codes differ by more than ``radii[c]`` bits on every chunk
    c, they differ by at least sum(radii[c] + 1) bits, so radii whose sum(r + 1) exceeds
    ``max_bits`` miss no code within it (the radii need not be equal, and the chunks need not
    cover every bit).  Each query probes every key within ``radii[c]`` of its own chunk, and each
    probe finds about n / 2^width codes.

    The number of chunks and their widths are the ones that make probes plus codes compared
    smallest, so chunks widen as the index grows and a bucket stays small.  The work per query
    still grows: from 10^3 to 10^5 images of random codes (15 views), 19 probes and 106 codes
    compared become 55 and 984.  Chunks wide enough to keep the codes compared flat need
    radius 2 on one of them (three chunks of 21 bits or so): about 300 probes, each a cache
    miss in a table of 2^width entries, which cost more than the codes they save."""
    best = None
    for m in range(1, 9):
        base, extra = divmod(max_bits + 1, m)  # sum(r + 1) = max_bits + 1, shared as evenly as can be
        radii = [base - 1 + (1 if k < extra else 0) for k in range(m)]
        if min(radii) < 0 or max(radii) > 3:
            continue
        for widths in _widths(m, extra):
            probes = [_n_keys(w, r) for w, r in zip(widths, radii)]
            cost = sum(p * (LOOKUP_COST + n_codes / 2.0 ** w) for p, w in zip(probes, widths))
            if best is None or cost < best[0]:
                best = (cost, widths, radii)
    if best is None:
        raise ValueError(f"max_bits {max_bits} is more than multi-index hashing of 64-bit codes serves here (at most 31)")
    cost, widths, radii = best
    bounds = list(zip(np.cumsum([0, *widths[:-1]]).tolist(), widths))
    return bounds, radii, cost


LOOKUP_COST = 8.0  # a probe (a cache miss in a large table) against one code compared, measured

MAX_CHUNK_BITS = 22  # a chunk's table of bucket starts has 2^width + 1 entries (16 MiB at 22 bits)


def _widths(m: int, wide: int):
    """Widths of m chunks (each at most MAX_CHUNK_BITS, 64 bits in all): an even split, and
    every split giving the first ``wide`` chunks (the ones searched one bit further) a width
    of their own and the others the rest evenly; a wider chunk has fewer codes a probe, which
    pays most where each probe brings more neighbours to look up."""
    def even(bits, k):
        return [min(MAX_CHUNK_BITS, bits // k + (1 if j < bits % k else 0)) for j in range(k)]
    yield even(64, m)
    if 0 < wide < m:
        for w in range(1, min(MAX_CHUNK_BITS, 64 // wide) + 1):
            if 64 - w * wide >= m - wide:
                yield [w] * wide + even(64 - w * wide, m - wide)


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
        self.bounds, self.radii, _ = plan_chunks(len(self.flat), max_bits)
        order, starts = [], []
        for shift, width in self.bounds:
            key = _chunk(self.flat, shift, width)
            # the same stable order; numpy sorts keys of 16 bits or fewer by radix (linear), wider ones 2x faster
            order.append(np.argsort(key.astype(np.uint16 if width <= 16 else np.uint32), kind="stable"))
            # starts[k] .. starts[k + 1]: where the codes whose chunk is k sit in ``order`` (linear in n + 2^width)
            starts.append(np.concatenate([[0], np.cumsum(np.bincount(key, minlength=1 << width))]).astype(np.int32))
        self.order = np.stack(order)
        self.sorted_codes = self.flat[self.order]  # each chunk's buckets read in sequence
        self.starts = np.zeros((len(starts), max(len(x) for x in starts)), np.int32)
        for k, x in enumerate(starts):
            self.starts[k, :len(x)] = x
        self.widths = np.array([w for _, w in self.bounds], np.int64)

    def query(self, codes: np.ndarray, skip_self: bool) -> tuple[np.ndarray, int, int]:
        """Every (query row, item, view, bits) with bits <= max_bits, one row per (query, item)
        (its closest view; the first view of the closest), sorted; the number of codes compared;
        and the number of buckets probed.

        ``skip_self``: the queries are the items themselves (query q is item q), and an item is
        not its own candidate."""
        codes = np.ascontiguousarray(codes, np.uint64)
        keys = np.stack([_chunk(codes, s, w) for s, w in self.bounds])
        in_key_order = np.stack([np.argsort(k, kind="stable") for k in keys])
        hits, compared, probes = _query(codes, keys, in_key_order, self.widths, np.array(self.radii, np.int64),
                                        self.sorted_codes, self.order, self.starts, self.n_views, self.max_bits,
                                        skip_self)
        # one row per (query, item): the fewest bits, then the first view (hits of several chunks repeat)
        hits = hits[np.lexsort((hits[:, 2], hits[:, 3], hits[:, 1], hits[:, 0]))]
        first = np.ones(len(hits), bool)
        first[1:] = (hits[1:, 0] != hits[:-1, 0]) | (hits[1:, 1] != hits[:-1, 1])
        return hits[first], compared, probes


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
def _query(codes, keys, in_key_order, widths, radii, sorted_codes, order, starts, n_views, max_bits, skip_self):
    """Chunk by chunk and neighbour by neighbour, the queries in the order of their chunk's key:
    the bucket table and the buckets are then read in sequence (a few interleaved streams), not
    at random, so a probe costs about the same in a table of 4 MiB entries as in a small one."""
    n_q = codes.shape[0]
    cap = 1024
    out = np.empty((cap, 4), np.int64)
    n_out = 0
    compared = 0
    probes = 0
    for c in range(keys.shape[0]):
        flips = _neighbours(0, widths[c], radii[c])
        for f in flips:
            for i in range(n_q):
                q = in_key_order[c, i]
                k = keys[c, q] ^ f
                probes += 1
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
                    if n_out == cap:
                        cap *= 2
                        grown = np.empty((cap, 4), np.int64)
                        grown[:n_out] = out[:n_out]
                        out = grown
                    out[n_out, 0] = q
                    out[n_out, 1] = item
                    out[n_out, 2] = e % n_views
                    out[n_out, 3] = bits
                    n_out += 1
    return out[:n_out], compared, probes


def near_codes(query: np.ndarray, codes: np.ndarray, max_bits: int, skip_self: bool = False) -> tuple[np.ndarray, int]:
    """Rows (query row, item, view, bits) where ``query[q]`` is within ``max_bits`` bits of some
    view of ``codes[item]`` (its closest view), and how many codes were compared to find them.

    Parameters
    ----------
    query : (m,) uint64
    codes : (n, views) uint64
    skip_self : the query rows are the items themselves; an item is never its own candidate
    """
    rows, compared, _ = ChunkIndex(codes, max_bits).query(query, skip_self)
    return rows, compared
