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

from covfeat.core.lazyjit import compile_module, lazy_intrinsic, lazy_njit, map_nogil

# The plan's cost model, in ns, measured by timing one chunk's build and query at 10^3, 10^4 and
# 10^5 images of random codes with 15 views (`python benchmarks/bench_neardup_index.py`,
# benchmarks/results/intel-xeon-amx/neardup_index.md, Intel Xeon, 2026-12-02):
PROBE_NS = 4.0  # a bucket probed: its start read, its first block of LANES codes (2.5 in cache, 6.4 at 10^5)

CODE_NS = 0.17  # a code compared, in blocks of LANES with vector popcounts

TABLE_NS = 0.9  # an entry of a chunk's table of bucket starts, built once for all the queries

INSERT_NS = 6.0  # a code put in a chunk's buckets (3 in cache, 11 at 10^5 images)

PASS_NS = 30.0  # a chunk's pass over one query (its key, its place in key order, the copies)

LANES = 16  # codes a probe compares at once: a bucket is read in blocks this long

PARALLEL_CODES = 1 << 18  # an index of at least this many codes builds and searches its chunks on every core
# (bench_neardup_index.py, 2 cores, Intel Xeon: at 3 x 10^4 images of 15 codes two cores took 1.11 us an
# image against 1.41, at 10^5 1.08 against 1.60; at 10^3 1.85 against 0.82, the threads' cost; at 10^4
# 0.65 against 0.84 in that run, no gain in an earlier one, so 10^4 stays on one core)

MAX_CHUNK_BITS = 22  # a chunk's table of bucket starts has 2^width + 1 entries (16 MiB at 22 bits)


def plan_chunks(n_codes: int, max_bits: int,
                n_queries: int | None = None) -> tuple[list[tuple[int, int]], list[int], float]:
    """(shift, width) of each chunk, the radius searched within each chunk, and the modelled ns
    per query (buckets probed, codes compared, each chunk's pass, and its table and buckets
    built once and shared among ``n_queries``, by default ``n_codes``).

    Pigeonhole, generalised: if two codes differ by more than ``radii[c]`` bits on every chunk
    c, they differ by at least sum(radii[c] + 1) bits, so radii whose sum(r + 1) exceeds
    ``max_bits`` miss no code within it (the radii need not be equal, and the chunks need not
    cover every bit).  Each query probes every key within ``radii[c]`` of its own chunk, and each
    probe finds about n / 2^width codes.

    Chunks searched within the same radius get the same width (the work of a chunk depends on
    its width and radius alone, so the best width of each kind is found on its own, within the
    64 bits), and the number of chunks and the widths are the ones that make the modelled work
    smallest.  The work per query still grows with the index: from 10^3 to 10^5 images of random
    codes and 15 views the modelled work goes from 680 to 840 ns, and the codes compared from 150
    to 801 in 40 and 55 probes.  Exact search within a radius has no flat per-query cost in 64
    bits: a plan with flat work would need about 300 probes at 10^3 images too (a radius-2 chunk
    of 22 bits), and wide chunks' probes into tables far larger than the queries cost a cache
    miss each (10 ns a probe at 21 bits and 10^5 images, against 6.4 at 17 bits).  Every chunk
    also costs every query its pass and its share of the build, so the model favours few chunks."""
    n_queries = max(1, n_codes if n_queries is None else n_queries)
    ws = range(1, MAX_CHUNK_BITS + 1)
    # g[r][w - 1]: ns per query of one chunk of w bits searched within r bits
    g = [[_n_keys(w, r) * (PROBE_NS + CODE_NS * n_codes / 2.0 ** w)
          + (TABLE_NS * 2.0 ** w + INSERT_NS * n_codes) / n_queries + PASS_NS for w in ws]
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
        self.sorted_codes = np.zeros((m, len(self.flat) + LANES), np.uint64)  # LANES codes of padding: a probe reads whole blocks
        self.order = np.empty((m, len(self.flat)), np.int32)
        # each chunk's table of bucket starts, one after another: 2^width + 1 entries each
        self.table_at = np.concatenate([[0], np.cumsum((1 << self.widths) + 1)]).astype(np.int64)
        self.starts = np.empty(self.table_at[-1], np.int32)
        self.parallel = len(self.flat) >= PARALLEL_CODES
        if self.parallel:
            compile_module(__name__)  # numba's dispatchers in place before the threads (each compiles or loads
            # its code on its first call, behind numba's lock), not two threads swapping the stand-ins
        map_nogil(lambda c: _bucket_one(self.flat, self.shifts[c], self.widths[c], self.sorted_codes[c], self.order[c],
                                        self._starts(c)), range(m), self.parallel)

    def _starts(self, c: int) -> np.ndarray:
        return self.starts[self.table_at[c]:self.table_at[c + 1]]

    def query(self, codes: np.ndarray, skip_self: bool) -> tuple[np.ndarray, int, int]:
        """Every (query row, item, view, bits) with bits <= max_bits, one row per (query, item)
        (its closest view; the first view of the closest), sorted; the number of codes compared;
        and the number of buckets probed.

        ``skip_self``: the queries are the items themselves (query q is item q), and an item is
        not its own candidate."""
        codes = np.ascontiguousarray(codes, np.uint64)
        found = map_nogil(lambda c: _query_chunk(codes, self.shifts[c], self.widths[c], self.radii[c], self.sorted_codes[c],
                                                 self.order[c], self._starts(c), self.n_views, self.max_bits, skip_self),
                          range(len(self.bounds)), self.parallel)
        hits = np.concatenate([h for h, _, _ in found])
        compared, probes = sum(int(c) for _, c, _ in found), sum(int(p) for _, _, p in found)
        # one row per (query, item): the fewest bits, then the first view (hits of several chunks repeat)
        hits = hits[np.lexsort((hits[:, 2], hits[:, 3], hits[:, 1], hits[:, 0]))]
        first = np.ones(len(hits), bool)
        first[1:] = (hits[1:, 0] != hits[:-1, 0]) | (hits[1:, 1] != hits[:-1, 1])
        return hits[first], compared, probes


def _within_mask_intrinsic():
    """``within_mask(qc, codes, start, end, max_bits)``: bit j (j < LANES) set when ``start + j <
    end`` and ``codes[start + j]`` is within ``max_bits`` bits of ``qc``, as explicit LLVM vector
    code: one load of LANES codes, xor, ``llvm.ctpop`` and compare, masked to the bucket
    (``vpopcntq`` on AVX-512 CPUs; LLVM lowers the same code to scalar popcounts elsewhere).
    ``codes`` is a C-contiguous uint64 array with at least ``start + LANES`` elements: lanes past
    ``end`` are read and masked, never reported.

    numba's own loops over a bucket gave a branch per code or, unrolled, 16 scalar popcounts: a
    probe of a bucket of 2 codes cost 10 ns and of 11 codes 17 ns (the loop's end mispredicted);
    this costs 4 to 6 ns a probe whatever the bucket's length up to 16 (Intel Xeon, 2026-12-02)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def within_mask(typingctx, qc, codes, start, end, max_bits):
        if not (isinstance(codes, types.Array) and codes.dtype == types.uint64 and codes.layout == "C"):
            return None
        sig = types.int64(types.uint64, codes, types.int64, types.int64, types.int64)

        def codegen(context, builder, sg, args):
            qv, cv, sv, ev, mv = args
            data = context.make_array(sg.args[1])(context, builder, cv).data
            i64 = ir.IntType(64)
            vt = ir.VectorType(i64, LANES)

            def splat(x):
                v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
                return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                              ir.Constant(ir.VectorType(ir.IntType(32), LANES), None))

            x = builder.load(builder.bitcast(builder.gep(data, [sv]), vt.as_pointer()), align=8)
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt]), f"llvm.ctpop.v{LANES}i64")
            bits = builder.call(ctpop, [builder.xor(x, splat(qv))])
            near = builder.icmp_unsigned("<=", bits, splat(mv))
            inside = builder.icmp_signed("<", ir.Constant(vt, list(range(LANES))), splat(builder.sub(ev, sv)))
            mask = builder.bitcast(builder.and_(near, inside), ir.IntType(LANES))
            return builder.zext(mask, i64)

        return sig, codegen

    return within_mask


_within_mask = lazy_intrinsic(_within_mask_intrinsic)


@lazy_njit(cache=True, nogil=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))  # int64: compared with int64 (uint64 against int64 is float64 in numba)


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
def _bucket_one(flat, shift, width, sorted_codes, order, starts):
    """starts[k] .. starts[k + 1]: where the codes whose chunk is k sit in ``sorted_codes`` (and
    their places in ``flat`` in ``order``), in the order of ``flat`` within a bucket.  (Two
    passes, by the top 4 to 10 bits first and then to the bucket, were no faster at 10^5 images:
    the writes are bound by the last-level cache either way.)"""
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
def _grown(a, rows):
    """``a`` with room for ``rows`` rows, its rows kept."""
    out = np.empty((rows, a.shape[1]), a.dtype)
    out[:a.shape[0]] = a
    return out


@lazy_njit(cache=True, nogil=True)
def _probe(qkeys, qsorted, flips, sc, st, max_bits, near_at):
    """Every bucket each query's key and its neighbours ``flips`` point to, LANES codes at a time
    with vector popcounts (:func:`_within_mask_intrinsic`): (query, block start, lanes within
    reach) of each block with a code within reach, stored while ``near_at`` has room, and
    counted; the number of such blocks and of codes compared."""
    n_near = 0
    compared = 0
    room = near_at.shape[0]
    for f in flips:
        for i in range(qkeys.shape[0]):
            k = qkeys[i] ^ f
            qc = qsorted[i]
            lo, hi = st[k], st[k + 1]
            compared += hi - lo
            for s in range(lo, hi, LANES):
                near = _within_mask(qc, sc, np.int64(s), np.int64(hi), max_bits)
                if near != 0:  # nearly never, but for a query's own code
                    if n_near < room:
                        near_at[n_near, 0] = i
                        near_at[n_near, 1] = s
                        near_at[n_near, 2] = near
                    n_near += 1
    return n_near, compared


@lazy_njit(cache=True, nogil=True)
def _query_chunk(codes, shift, width, radius, sc, order, st, n_views, max_bits, skip_self):
    """One chunk's hits (query row, item, view, bits), codes compared and buckets probed.

    Neighbour by neighbour, the queries in the order of their chunk's key (copied in that
    order): the bucket table and the buckets are then read in sequence (a few interleaved
    streams), not at random.  Each probe reads its bucket LANES codes at a time with vector
    popcounts (:func:`_within_mask_intrinsic`); only a block with a code within reach is
    looked at code by code."""
    n_q = codes.shape[0]
    mask = np.uint64((1 << width) - 1)
    sh = np.uint64(shift)
    keys = np.empty(n_q, np.int64)
    for i in range(n_q):
        keys[i] = np.int64((codes[i] >> sh) & mask)
    perm = _radix_order(keys, width)
    qkeys = np.empty(n_q, np.int64)
    qsorted = np.empty(n_q, np.uint64)
    for i in range(n_q):
        qkeys[i] = keys[perm[i]]
        qsorted[i] = codes[perm[i]]
    flips = _neighbours(0, width, radius)
    # first the probes, which keep only (query, block, lanes) of a block with a code within
    # reach; then those blocks' hits.  The probes' loop stores into an array it never replaces
    # (with the array grown inside it, or the hits made there, it ran three times slower): when
    # the room runs out it counts on, and runs again with the room it needs.
    near_at = np.empty((2 * n_q + 1024, 3), np.int64)
    n_near, compared = _probe(qkeys, qsorted, flips, sc, st, max_bits, near_at)
    if n_near > near_at.shape[0]:
        near_at = np.empty((n_near, 3), np.int64)
        n_near, compared = _probe(qkeys, qsorted, flips, sc, st, max_bits, near_at)
    out = np.empty((n_near * 2 + 16, 4), np.int64)
    n_out = 0
    for r in range(n_near):
        i, s, near = near_at[r, 0], near_at[r, 1], near_at[r, 2]
        while near != 0:
            j = _popcount(np.uint64((near & -near) - 1))  # the lowest lane set
            near &= near - 1
            p = s + j
            q = perm[i]
            e = order[p]
            item = e // n_views
            if skip_self and item == q:
                compared -= 1
                continue
            if n_out == out.shape[0]:
                out = _grown(out, 2 * n_out)
            out[n_out, 0] = q
            out[n_out, 1] = item
            out[n_out, 2] = e % n_views
            out[n_out, 3] = _popcount(qsorted[i] ^ sc[p])
            n_out += 1
    return out[:n_out], compared, n_q * flips.shape[0]


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
