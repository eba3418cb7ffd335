"""Where the near-duplicate index's settings come from: each chunk's build and query timed on
its own (the ns of covfeat.trust.neardup_index's cost model), and the whole search on one core
against both (its PARALLEL_CODES threshold).

    python benchmarks/bench_neardup_index.py

Random 64-bit codes, 15 views an image (as the fingerprints), max_bits 6.  Per chunk: its build
(``_bucket_one``, ns per code put in its buckets) and its query (``_query_chunk``, ns per query),
for widths and radii the plans use, at 10^3, 10^4 and 10^5 images, the best of 3.  The search:
``find_pairs`` at 10^3, 10^4, 3 x 10^4 and 10^5 images with the index kept on one core and on
every core, the median of 5 (3 at 10^5).  Writes benchmarks/results/neardup_index.json and .md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import machine, machine_line, table, write_results  # noqa: E402

CHUNKS = ((9, 0), (10, 0), (13, 0), (13, 1), (17, 0), (17, 1), (20, 1))


def chunk_rows() -> list[dict]:
    from covfeat.trust import neardup_index as ni

    ni.ChunkIndex(np.zeros((10, 15), np.uint64), 6)  # compiles the kernels (numba's cache) before timing
    rng = np.random.default_rng(0)
    rows = []
    for n_img in (1000, 10000, 100000):
        n = 15 * n_img
        flat = rng.integers(0, 2**64, n, dtype=np.uint64)
        q = flat[::15].copy()
        for w, r in CHUNKS:
            sc, od = np.zeros(n + ni.LANES, np.uint64), np.empty(n, np.int32)
            st = np.empty((1 << w) + 1, np.int32)
            build, query = [], []
            for _ in range(3):
                t = time.perf_counter()
                ni._bucket_one(flat, 0, w, sc, od, st)
                build.append(time.perf_counter() - t)
                t = time.perf_counter()
                _, compared, probes = ni._query_chunk(q, 0, w, r, sc, od, st, 15, 6, True)
                query.append(time.perf_counter() - t)
            rows.append({"images": n_img, "width": w, "radius": r, "build_ns_per_code": min(build) / n * 1e9,
                         "query_ns_per_query": min(query) / len(q) * 1e9, "probes_per_query": probes / len(q),
                         "compared_per_query": compared / len(q), "table_entries": 1 << w})
            print(rows[-1], flush=True)
    return rows


def core_rows() -> list[dict]:
    from covfeat.trust import neardup_index as ni
    from covfeat.trust.neardup import find_pairs

    every = ni.PARALLEL_CODES
    rows = []
    try:
        for n in (1000, 10000, 30000, 100000):
            rng = np.random.default_rng(0)
            hashes = rng.integers(0, 2**64, (n, 15), dtype=np.uint64)
            thumbs = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
            got = {}
            for label, threshold in (("one core", 1 << 62), ("every core", 0)):
                ni.PARALLEL_CODES = threshold
                find_pairs(hashes, thumbs)
                ts = []
                for _ in range(3 if n >= 100000 else 5):
                    t = time.perf_counter()
                    find_pairs(hashes, thumbs)
                    ts.append(time.perf_counter() - t)
                got[label] = float(np.median(ts)) / n * 1e6
            rows.append({"images": n, "codes": 15 * n, "us_per_image_one_core": got["one core"],
                         "us_per_image_every_core": got["every core"], "default": "every core" if 15 * n >= every
                         else "one core"})
            print(rows[-1], flush=True)
    finally:
        ni.PARALLEL_CODES = every
    return rows


def main():
    from covfeat.trust import neardup_index as ni

    chunks, cores = chunk_rows(), core_rows()
    m = machine()
    out = {"machine": m, "chunks": chunks, "cores": cores, "parallel_codes": ni.PARALLEL_CODES,
           "model_ns": {k: getattr(ni, k) for k in ("PROBE_NS", "CODE_NS", "TABLE_NS", "INSERT_NS", "PASS_NS")}}

    md = "\n".join([
        "# The near-duplicate index: its cost model's parts and its use of the cores", "",
        machine_line(m), "",
        "Each chunk alone, random codes, 15 views an image, best of 3 (build: ns per code put in the chunk's "
        "buckets; query: ns per query, its pass and its probes):", "",
        table(["images", "width", "radius", "build ns/code", "query ns/query", "probes/query", "codes compared/query"],
              [[r["images"], r["width"], r["radius"], f"{r['build_ns_per_code']:.2f}", f"{r['query_ns_per_query']:.0f}",
                f"{r['probes_per_query']:.0f}", f"{r['compared_per_query']:.1f}"] for r in chunks]), "",
        "The cost model in covfeat.trust.neardup_index (ns): " + ", ".join(f"{k} {v}" for k, v in out["model_ns"].items())
        + ". Read them off the table: a query's pass is the radius-0 rows at 17 bits (about one probe, almost no "
        "code); a probe, the radius-1 rows less that, over their probes; a code, the radius-0 rows of narrow chunks.", "",
        f"find_pairs on one core and on every core (median; an index of {ni.PARALLEL_CODES:,} codes or more uses "
        "every core by default):", "",
        table(["images", "codes", "µs/image, one core", "µs/image, every core", "default"],
              [[r["images"], f"{r['codes']:,}", f"{r['us_per_image_one_core']:.3f}",
                f"{r['us_per_image_every_core']:.3f}", r["default"]] for r in cores]), "",
        "Command: `python benchmarks/bench_neardup_index.py`", ""])
    write_results("neardup_index", out, md)


if __name__ == "__main__":
    main()
