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

LOOKUP_COST = 4.0  # a probe (a bucket start read, a loop that ends unpredictably) against one code compared, measured

TABLE_COST = 1.0  # an entry of a chunk's table of bucket starts, built once, against one code compared

PASS_COST = 1.0  # a chunk's pass over one query (its key, its place in key order)

MAX_CHUNK_BITS = 22  # a chunk's table of bucket starts has 2^width + 1 entries (16 MiB at 22 bits)


def plan_chunks(n_codes: int, max_bits: int,
                n_queries: int | None = None) -> tuple[list[tuple[int, int]], list[int], float]:
    """(shift, width) of each chunk, the radius searched within each chunk, and the modelled work
    per query (buckets probed times LOOKUP_COST, codes compared, and each chunk's table and pass
    shared among ``n_queries``, by default ``n_codes``).

    Pigeonhole, generalised: if two codes differ by more than ``radii[c]`` bits on every chunk
    c, they differ by at least sum(radii[c] + 1) bits, so radii whose sum(r + 1) exceeds
    ``max_bits`` miss no code within it (the radii need not be equal, and the chunks need not
    cover every bit).  Each query probes every key within ``radii[c]`` of its own chunk, and each
    probe finds about n / 2^width codes.

    Chunks searched within the same radius get the same width (the work of a chunk depends on
    its width and radius alone, so the best width of each kind is found on its own, within the
    64 bits), and the number of chunks and the widths are the ones that make the modelled work
    smallest.  That work still grows with the index, about as n^0.45 (from 10^3 to 10^5 images
    of random codes and 15 views, 19 probes and 99 codes compared become 55 and 984): a plan
    with flat work per query would need about 300 probes at 10^3 images too (a radius-2 chunk of
    22 bits), and wide chunks' probes into tables far larger than the queries cost a cache miss
    each (measured at 10^5 images: 50 ns a probe at 22 bits, 5 ns at 17 bits, 2.2 ns a code
    compared; that plan took 15 us an image, this one 2.3)."""
    n_queries = n_codes if n_queries is None else max(1, n_queries)
    L = LOOKUP_COST
    ws = range(1, MAX_CHUNK_BITS + 1)
    # g[r][w - 1]: work per query of one chunk of w bits searched within r bits
    g = [[_n_keys(w, r) * (L + n_codes / 2.0 ** w) + TABLE_COST * 2.0 ** w / n_queries + PASS_COST for w in ws]
         for r in range(4)]
    best_upto = []  # best_upto[r][k]: (cost, width) of the best width <= k + 1
    for r in range(4):
        row, cur = [], None
        for w in ws:
            if cur is None or g[r][w - 1] < cur[0]:
                cur = (g[r][w - 1], w)
            row.append(cur)
        best_upto.append(row)
    best = None
    for m in range(1, 9):
        base, wide = divmod(max_bits + 1, m)
        if base < 1 or base + (1 if wide else 0) > 4:
            continue
        r_wide, r_rest, rest = base, base - 1, m - wide
        for w1 in (ws if wide else [0]):
            left = 64 - w1 * wide
            if rest and left < rest:
                break
            cost = wide * g[r_wide][w1 - 1] if wide else 0.0
            w2 = 0
            if rest:
                c2, w2 = best_upto[r_rest][min(MAX_CHUNK_BITS, left // rest) - 1]
                cost += rest * c2
            if best is None or cost < best[0]:
                best = (cost, [w1] * wide + [w2] * rest, [r_wide] * wide + [r_rest] * rest)
    if best is None:
        raise ValueError(f"max_bits {max_bits} is more than multi-index hashing of 64-bit codes serves here (at most 31)")
    cost, widths, radii = best
    bounds = list(zip(np.cumsum([0, *widths[:-1]]).tolist(), widths))
    return bounds, radii, cost


def _n_keys(width: int, radius: int) -> int:
    """Keys within ``radius`` bits of one key of ``width`` bits."""
    return sum(comb(width, k) for k in range(radius + 1))


class ChunkIndex:
    """The codes of a set of items (each item several codes, one per view), bucketed once per chunk
    by a counting sort (linear in the codes and the table, where argsort was n log n and the
    largest cost at 10^5 images), each chunk's codes copied in bucket order so a bucket is read
    in sequence."""

    def __init__(self, codes: np.ndarray, max_bits: int, n_queries: int | None = None):
        codes = np.ascontiguousarray(codes, np.uint64)
        self.n_items, self.n_views = codes.shape
        self.flat = codes.ravel()
        self.max_bits = max_bits
        self.bounds, self.radii, _ = plan_chunks(len(self.flat), max_bits, n_queries)
        m = len(self.bounds)
        self.shifts = np.array([s for s, _ in self.bounds], np.int64)
        self.widths = np.array([w for _, w in self.bounds], np.int64)
        self.sorted_codes = np.empty((m, len(self.flat)), np.uint64)
        self.order = np.empty((m, len(self.flat)), np.int32)
        # each chunk's table of bucket starts, one after another: 2^width + 1 entries each
        self.table_at = np.concatenate([[0], np.cumsum((1 << self.widths) + 1)]).astype(np.int64)
        self.starts = np.empty(self.table_at[-1], np.int32)
        _bucket(self.flat, self.shifts, self.widths, self.sorted_codes, self.order, self.starts, self.table_at)

    def query(self, codes: np.ndarray, skip_self: bool) -> tuple[np.ndarray, int, int]:
        """Every (query row, item, view, bits) with bits <= max_bits, one row per (query, item)
        (its closest view; the first view of the closest), sorted; the number of codes compared;
        and the number of buckets probed.

        ``skip_self``: the queries are the items themselves (query q is item q), and an item is
        not its own candidate."""
        codes = np.ascontiguousarray(codes, np.uint64)
        hits, compared, probes = _query(codes, self.shifts, self.widths, np.array(self.radii, np.int64),
                                        self.sorted_codes, self.order, self.starts, self.table_at, self.n_views, self.max_bits,
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
def _bucket(flat, shifts, widths, sorted_codes_all, order_all, starts_all, table_at):
    """Counting sort of the codes by each chunk (stable: argsort's order), linear in n + 2^width."""
    for c in range(shifts.shape[0]):
        _bucket_one(flat, shifts[c], widths[c], sorted_codes_all[c], order_all[c], starts_all[table_at[c]:table_at[c + 1]])


@lazy_njit(cache=True, nogil=True)
def _bucket_one(flat, shift, width, sorted_codes, order, starts):
    """starts[k] .. starts[k + 1]: where the codes whose chunk is k sit in ``sorted_codes`` (and
    their places in ``flat`` in ``order``), in the order of ``flat`` within a bucket."""
    mask = np.uint64((1 << width) - 1)
    sh = np.uint64(shift)
    n_keys = 1 << width
    starts[:n_keys + 1] = 0
    for e in range(flat.shape[0]):
        starts[np.int64((flat[e] >> sh) & mask) + 1] += 1
    for k in range(n_keys):
        starts[k + 1] += starts[k]
    pos = starts[:n_keys].copy()
    for e in range(flat.shape[0]):
        x = flat[e]
        k = np.int64((x >> sh) & mask)
        p = pos[k]
        pos[k] = p + 1
        sorted_codes[p] = x
        order[p] = e


@lazy_njit(cache=True, nogil=True)
def _radix_order(keys, width):
    """The stable order of ``keys`` (each < 2^width): two counting-sort passes of half the bits."""
    n = keys.shape[0]
    lo_bits = (width + 1) // 2
    perm = np.arange(n)
    tmp = np.empty(n, np.int64)
    for shift, bits in ((0, lo_bits), (lo_bits, width - lo_bits)):
        if bits == 0:
            continue
        mask = (1 << bits) - 1
        count = np.zeros((1 << bits) + 1, np.int64)
        for i in range(n):
            count[((keys[perm[i]] >> shift) & mask) + 1] += 1
        for k in range(1 << bits):
            count[k + 1] += count[k]
        for i in range(n):
            d = (keys[perm[i]] >> shift) & mask
            tmp[count[d]] = perm[i]
            count[d] += 1
        perm, tmp = tmp, perm
    return perm


@lazy_njit(cache=True, nogil=True)
def _query(codes, shifts, widths, radii, sorted_codes, order, starts, table_at, n_views, max_bits, skip_self):
    """Chunk by chunk and neighbour by neighbour, the queries in the order of their chunk's key
    (copied in that order): the bucket table and the buckets are then read in sequence (a few
    interleaved streams), not at random."""
    n_q = codes.shape[0]
    cap = 1024
    out = np.empty((cap, 4), np.int64)
    n_out = 0
    compared = 0
    probes = 0
    qkeys = np.empty(n_q, np.int64)
    qsorted = np.empty(n_q, np.uint64)
    qorder = np.empty(n_q, np.int32)
    for c in range(shifts.shape[0]):
        width = widths[c]
        mask = np.uint64((1 << width) - 1)
        sh = np.uint64(shifts[c])
        keys = np.empty(n_q, np.int64)
        for i in range(n_q):
            keys[i] = np.int64((codes[i] >> sh) & mask)
        perm = _radix_order(keys, width)
        for i in range(n_q):
            q = perm[i]
            qorder[i] = q
            qkeys[i] = keys[q]
            qsorted[i] = codes[q]
        st = starts[table_at[c]:table_at[c + 1]]
        sc = sorted_codes[c]
        flips = _neighbours(0, width, radii[c])
        for f in flips:
            for i in range(n_q):
                k = qkeys[i] ^ f
                qc = qsorted[i]
                for p in range(st[k], st[k + 1]):
                    bits = np.int64(_popcount(qc ^ sc[p]))
                    if bits > max_bits:
                        continue
                    q = qorder[i]
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
                compared += st[k + 1] - st[k]
            probes += n_q
    return out[:n_out], compared, probes


def near_codes(query: np.ndarray, codes: np.ndarray, max_bits: int,
               skip_self: bool = False) -> tuple[np.ndarray, int]:
    """Rows (query row, item, view, bits) where ``query[q]`` is within ``max_bits`` bits of some
    view of ``codes[item]`` (its closest view), and how many codes were compared to find them.

    Parameters
    ----------
    query : (m,) uint64
    codes : (n, views) uint64
    skip_self : the query rows are the items themselves; an item is never its own candidate
    """
    rows, compared, _ = ChunkIndex(codes, max_bits, len(query)).query(query, skip_self)
    return rows, compared
