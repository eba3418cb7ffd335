"""Multi-index hashing with uneven radii per chunk (covfeat issue 20, item 2): the same rows as
comparing every code, and fewer codes compared at 10^5 images than the even split it replaced."""

from __future__ import annotations

import numpy as np

from covfeat.trust.neardup import FINGERPRINT_HASHES, MAX_BITS
from covfeat.trust.neardup_index import ChunkIndex, near_codes, plan_chunks


def _brute(query, codes, max_bits, skip_self):
    """(query, item, view, bits) of the closest view (the first of the closest), all pairs compared."""
    x = np.bitwise_xor(query[:, None, None], codes[None])
    bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)
    rows = []
    for q in range(len(query)):
        for item in range(len(codes)):
            if skip_self and item == q:
                continue
            v = int(np.argmin(bits[q, item]))
            if bits[q, item, v] <= max_bits:
                rows.append((q, item, v, int(bits[q, item, v])))
    return rows


def test_uneven_radii_find_every_code_within_max_bits_and_no_other():
    """A plan whose chunks search radii (1, 1, 1, 0) instead of 1 everywhere misses nothing:
    two codes within 6 bits differ by at most 1 bit on one of the first three chunks or by none
    on the last.  Near codes planted at 0 to 8 bits, their flipped bits spread over chunk
    boundaries and piled into one chunk, at every plan the index can take."""
    rng = np.random.default_rng(3)
    n = 400
    codes = rng.integers(0, 2**63, (n, FINGERPRINT_HASHES), dtype=np.uint64) << np.uint64(1)
    for t in range(300):
        i, j = rng.integers(0, n, 2)
        k = int(rng.integers(0, 9))
        lo = int(rng.integers(0, 64 - 2 * k)) if t % 2 else 0  # odd t: the k bits within 2k neighbours
        flips = rng.choice(np.arange(lo, lo + 2 * k if t % 2 else 64), k, replace=False)
        codes[j, rng.integers(0, FINGERPRINT_HASHES)] = codes[i, 0] ^ np.uint64(sum(1 << int(b) for b in flips))
    for max_bits in (MAX_BITS, 2, 9):
        for skip_self in (True, False):
            rows, _ = near_codes(codes[:, 0], codes, max_bits, skip_self=skip_self)
            assert [tuple(r) for r in rows.tolist()] == _brute(codes[:, 0], codes, max_bits, skip_self), max_bits


def test_buckets_longer_than_a_vector_block_and_both_cores_find_the_same_rows(monkeypatch):
    """A probe reads its bucket 16 codes at a time (neardup_index._within_mask_intrinsic), and a large index
    builds and searches its chunks on two threads.  Codes that share their low 40 bits fill one
    bucket of every chunk there (hundreds of codes, many blocks, a partial last one), with near
    codes planted at every place in it: the same rows as comparing all pairs, on one core and on
    every core."""
    from covfeat.trust import neardup_index

    rng = np.random.default_rng(5)
    n = 120
    codes = rng.integers(0, 2**63, (n, FINGERPRINT_HASHES), dtype=np.uint64) << np.uint64(1)
    codes = (codes & ~np.uint64(2**40 - 1)) | np.uint64(0x5A5A5A5A5A)
    for t in range(80):
        i, j = rng.integers(0, n, 2)
        flips = rng.choice(np.arange(40, 64), int(rng.integers(0, 8)), replace=False)
        codes[j, rng.integers(0, FINGERPRINT_HASHES)] = codes[i, 0] ^ np.uint64(sum(1 << int(b) for b in flips))
    expected = _brute(codes[:, 0], codes, MAX_BITS, True)
    assert 20 < len(expected) < n * n
    from covfeat.core import lazyjit

    monkeypatch.setattr(lazyjit, "usable_cores", lambda: 2)  # two threads even where one core is usable
    counts = []
    for parallel_from in (10**9, 0):
        monkeypatch.setattr(neardup_index, "PARALLEL_CODES", parallel_from)
        index = ChunkIndex(codes, MAX_BITS)
        assert index.parallel == (parallel_from == 0)
        rows, compared, probes = index.query(codes[:, 0], skip_self=True)
        assert [tuple(r) for r in rows.tolist()] == expected, parallel_from
        counts.append((compared, probes))
    assert counts[0] == counts[1]  # every chunk searched on both paths (any one finds these rows)


def test_a_probe_stops_at_its_buckets_end_when_the_padding_is_within_reach():
    """A probe reads 16 codes from its bucket's start and masks those past its end: the next
    bucket's codes, or the zero padding after the last.  Blank images hash to 0, so codes of a
    few set bits are within reach of that padding: the same rows as comparing all pairs, with
    and without an item's own codes, and no item number past the last (the mask is the only
    guard on reading past the index)."""
    rng = np.random.default_rng(7)
    n = 150
    codes = np.zeros((n, FINGERPRINT_HASHES), np.uint64)
    for i in range(n):
        for v in range(FINGERPRINT_HASHES):
            bits = rng.choice(64, int(rng.integers(0, 3)), replace=False)
            codes[i, v] = np.uint64(sum(1 << int(b) for b in bits))
    for skip_self in (True, False):
        rows, _ = near_codes(codes[:, 0], codes, MAX_BITS, skip_self=skip_self)
        assert rows[:, 1].max() < n
        assert [tuple(r) for r in rows.tolist()] == _brute(codes[:, 0], codes, MAX_BITS, skip_self)


def test_the_search_at_a_hundred_thousand_images_compares_fewer_codes_per_query():
    """Radii summing to what the pigeonhole needs (sum(r + 1) = max_bits + 1), not one bit more
    per chunk, and wider chunks where the radius is larger: at 10^5 images of random codes a
    query compared 1900 codes in 68 buckets (four chunks of 16 bits, radius 1 each), now 984 in
    55.  Counts, not times; the queries also run in key order (a time, not a count)."""
    bounds, radii, _ = plan_chunks(10**5 * FINGERPRINT_HASHES, MAX_BITS)
    assert (bounds, radii) == ([(0, 17), (17, 17), (34, 17), (51, 13)], [1, 1, 1, 0])
    n = 100_000
    codes = np.random.default_rng(0).integers(0, 2**63, (n, FINGERPRINT_HASHES), dtype=np.uint64)
    _, compared, probes = ChunkIndex(codes, MAX_BITS).query(codes[:, 0], skip_self=True)
    assert compared / n < 1000 and probes / n == 55, (compared / n, probes / n)


def test_the_index_sorts_no_codes_by_comparison(monkeypatch):
    """Building the index and querying it sort the codes by their chunk keys with counting and
    radix sorts, linear in the codes: argsort of the 1.5M keys of each chunk (n log n, and most
    of the cost at 10^5 images) is gone.  Counted: the elements handed to numpy's comparison
    sorts are only the few hits, whatever the number of codes."""
    sorted_elements = []
    for name in ("argsort", "sort", "lexsort"):
        real = getattr(np, name)

        def counted(a, *args, _real=real, **kw):
            sorted_elements.append(np.size(a[0] if isinstance(a, tuple) else a))
            return _real(a, *args, **kw)

        monkeypatch.setattr(np, name, counted)
    n = 20_000
    codes = np.random.default_rng(0).integers(0, 2**63, (n, FINGERPRINT_HASHES), dtype=np.uint64)
    codes[5, 4] = codes[9, 0] ^ np.uint64(0b10101)
    rows, _, _ = ChunkIndex(codes, MAX_BITS).query(codes[:, 0], skip_self=True)
    assert (9, 5, 4, 3) in [tuple(r) for r in rows.tolist()]
    assert sum(sorted_elements) <= 10 * (len(rows) + 1), sorted_elements


def test_a_thumbnail_is_flat_only_when_every_pixel_is_the_same():
    """Flat thumbnails (no fingerprint, a blank image) never match; a row is read only up to its
    first pixel unlike its first, so one differing in its last pixel alone is still usable."""
    from covfeat.trust.neardup import FINGERPRINT_THUMB_SHAPE, usable_thumbnails

    thumbs = np.full((4, *FINGERPRINT_THUMB_SHAPE), 7, np.uint8)
    thumbs[1, -1, -1] = 8
    thumbs[2, 0, 1] = 0
    thumbs[3] = 0
    assert usable_thumbnails(thumbs).tolist() == [False, True, True, False]
