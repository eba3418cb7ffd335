"""How each stage of a cache's life grows with the number of images: seconds and seconds per
image at 10^3, 10^4 and 10^5 images (10^6 with --sizes, where the disk allows).

    python benchmarks/bench_growth.py [--sizes 1000 10000 100000] [--load-max 10000]

The caches are synthetic, written through the store's own writer (ShardStore.write and
index.assemble; no backbone), with random fingerprints, so every stage runs the code a real
cache runs.  Features are float16 maps of shape (4, 4, 32) (1 KiB an image): small enough that
10^5 images fit anywhere, so the per-image cost of the bookkeeping (shards, tables, manifests)
is what shows, not the disk.  fit-head's load is measured again with a real backbone's shape,
inception_v3's (8, 8, 2048) float16 (256 KiB an image), up to --load-max images: that is where
reading bytes dominates, and where streamed against in-memory epochs matters.

Planning and hashing runs covfeat's own load_sources on as many tiny files (64 bytes each, a
class-folder layout): hashing real radiographs is bound by the disk, so this measures covfeat's
own cost per file (listing, stat, hashing, de-duplication), not the disk's.

The HDF5 virtual dataset route (one read of the index's ``features``) is measured beside
covfeat's own shard-by-shard read of every row.

Sizes up to 10^3 images are measured 5 times and up to 10^5 3 times, each stage's median kept
(a stage of 10^3 images takes milliseconds: one draw is at the mercy of a timer tick); the
kernel's pending writeback is flushed before each timed stage.  The near-duplicate search also
reports the codes it compared per image, counted, so its growth can be checked without a clock.

Writes benchmarks/results/growth.json, growth.md and growth.png (seconds per image against
images, log-log, one line per stage).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("COVFEAT_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import RESULTS, cpu, table, write_results  # noqa: E402

SMALL_SHAPE = (4, 4, 32)
REAL_SHAPE = (8, 8, 2048)  # inception_v3's last feature map
STAGES = ("plan_hash", "plan_shards", "write_shards", "assemble", "open", "verify", "load_memory",
          "load_streamed_epoch", "load_memory_epoch", "train_memory_epoch", "train_streamed_epoch", "neardup",
          "neardup_one_core", "info", "clean", "read_shard_by_shard", "read_vds")


def tiny_files(root: Path, n: int) -> None:
    """``n`` distinct 64-byte files named as images, half COVID-19, half NORMAL."""
    for label in ("COVID-19", "NORMAL"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / ("COVID-19" if i % 2 else "NORMAL") / f"img{i:07d}.png").write_bytes(i.to_bytes(8, "little") * 8)


def synthetic_cache(folder: Path, n: int, shape: tuple, seed: int = 0) -> tuple[Path, dict]:
    """A complete cache of ``n`` images written through the store: its index, and the seconds
    of planning its shards, writing them and assembling the index."""
    from covfeat.store.index import assemble
    from covfeat.store.key import cache_name
    from covfeat.store.shards import ShardStore, plan_shards
    from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE

    rng = np.random.default_rng(seed)
    key = f"{rng.integers(2**63):016x}"[:16]
    rows = [{"path": f"/data/{'COVID-19' if i % 2 else 'NORMAL'}/img{i:07d}.png", "label": i % 2,
             "patient_id": f"p{i // 2}", "source": "synthetic", "view": "PA",
             "sha256": f"{rng.integers(2**63):016x}{i:048x}"} for i in range(n)]
    times = {}
    t = time.perf_counter()
    specs = plan_shards(rows, key)
    times["plan_shards"] = time.perf_counter() - t
    target = folder / cache_name("synthetic", "none", key)
    store = ShardStore(target, key)
    times["write_shards"] = 0.0
    settle()
    for spec in specs:  # only the writes are timed: making the synthetic maps and fingerprints is not the store's work
        k = len(spec.rows)
        feats = rng.standard_normal((k, *shape), dtype=np.float32).astype(np.float16)
        # every bit random (up to 2026-12-02 the codes came from [0, 2**63): their top bit was always 0)
        fps = {p: (rng.integers(0, 2**64, FINGERPRINT_HASHES, dtype=np.uint64),
                   rng.integers(0, 256, FINGERPRINT_THUMB_SHAPE, dtype=np.uint8)) for p in range(k)}
        shas = [rows[i]["sha256"] for i in spec.rows]
        t = time.perf_counter()
        store.write(spec, shas, feats, np.arange(k), np.zeros(k), np.zeros((k, 4)), {}, fps)
        times["write_shards"] += time.perf_counter() - t
    config = {"backbone": "synthetic", "weights": {"pretrained": False, "label": "none", "kind": "none"},
              "views": ["PA"], "augment": 0}
    settle()
    t = time.perf_counter()
    assemble(target, store, specs, config=config, manifest=rows, feature_shape=shape, dtype="float16", extra={},
             verified=True)
    times["assemble"] = time.perf_counter() - t
    return target, times


def settle() -> None:
    """Flush what earlier stages left for the kernel to write back (deleting 10^5 planning files
    leaves a journal's worth), so the next timed stage does not pay for it in its first fsync."""
    os.sync()


def timed(f, *a, **kw):
    settle()
    t = time.perf_counter()
    out = f(*a, **kw)
    return time.perf_counter() - t, out


def epochs(fc, rows, repeats: int = 3) -> dict:
    """Seconds of one epoch's dropout-pooled rows (the stage that reads maps each epoch), from
    memory and streamed from the cache, best of ``repeats``; and the in-memory load."""
    from covfeat.head.dropout import keep_q
    from covfeat.head.fit import LoadedMaps
    from covfeat.head.loop import MemorySource, StreamedSource, epoch_plan

    t_load, maps = timed(LoadedMaps, fc, rows)
    n = len(rows)
    plan = epoch_plan(0, repeats + 1, n, np.ones(n, np.int64))
    out = np.zeros((n, fc.feature_shape[-1]), np.float32)
    q = keep_q(0.5)
    res = {"load_memory": t_load}
    for name, src in (("load_memory_epoch", MemorySource(maps.pool, index=maps.pos[rows])),
                      ("load_streamed_epoch", StreamedSource(fc, rows))):
        best = float("inf")
        for e in range(repeats + 1):  # the first epoch also checks each shard's bytes once: not counted
            order, views = plan[e]
            s, _ = timed(src.pooled, e, order, views, q, 0, out)
            if e:
                best = min(best, s)
        res[name] = best
    res.update(train_epochs(fc, rows, maps))
    del maps
    return res


def train_epochs(fc, rows, maps, epochs: int = 4) -> dict:
    """Seconds per epoch of fit-head's whole training loop (dropout-pooling of the next epoch
    overlapped with this epoch's batch steps, numba engine), in memory and streamed; the first
    epoch (shards' bytes checked once) not counted."""
    from covfeat.head.config import HeadConfig
    from covfeat.head.loop import MemorySource, StreamedSource, train
    from covfeat.head.model import NumpyHead
    from covfeat.head.template import head_template

    cfg = HeadConfig(epochs=epochs, dropout=0.5)
    tmpl = head_template(fc.feature_shape, cfg)
    labels = fc.manifest["label"][rows]
    out = {}
    for name, src in (("train_memory_epoch", MemorySource(maps.pool, index=maps.pos[rows])),
                      ("train_streamed_epoch", StreamedSource(fc, rows))):
        marks = []
        train(src, labels, np.ones(len(rows), np.int64), None, None, NumpyHead(tmpl.initial_weights(), tmpl), cfg,
              progress=lambda rec: marks.append(time.perf_counter()))
        out[name] = (marks[-1] - marks[0]) / (len(marks) - 1)
    return out


def measure(n: int, work_dir: Path, shape: tuple, full: bool) -> dict:
    import h5py

    from covfeat.extraction.sources import load_sources
    from covfeat.store.catalog import clean_cache_dir, info, verify_cache
    from covfeat.store.reader import open_cache
    from covfeat.trust.neardup import candidates, find_pairs

    folder = work_dir / f"cache-{n}-{shape[-1]}"
    folder.mkdir(parents=True)
    res, counted = {}, {}
    if full:
        files = work_dir / f"files-{n}"
        tiny_files(files, n)
        res["plan_hash"], m = timed(load_sources, [files], on_conflict="skip")
        assert len(m.records) == n, m.summary()
        shutil.rmtree(files)
    target, times = synthetic_cache(folder, n, shape)
    res.update(times if full else {})
    res["open"], fc = timed(open_cache, target)
    rows = np.flatnonzero(fc.has_features())
    res.update(epochs(fc, rows))
    if full:
        res["verify"], _ = timed(verify_cache, target)
        hashes, thumbs = fc.fingerprints()
        res["neardup"], pairs = timed(find_pairs, hashes, thumbs)
        from covfeat.trust import neardup_index
        every_core, neardup_index.PARALLEL_CODES = neardup_index.PARALLEL_CODES, 1 << 62
        try:
            res["neardup_one_core"], same = timed(find_pairs, hashes, thumbs)
        finally:
            neardup_index.PARALLEL_CODES = every_core
        assert same == pairs, "one core and every core found different pairs"
        _, counted["neardup_compared_per_image"] = candidates(hashes, thumbs)  # counted, not timed
        counted["neardup_compared_per_image"] /= n
        res["info"], _ = timed(info, target)
        res["clean"], _ = timed(clean_cache_dir, folder)
        fresh = open_cache(target)
        res["read_shard_by_shard"], a = timed(fresh.read_features, None, np.float16)
        with h5py.File(target, "r") as h:
            res["read_vds"], b = timed(lambda: h["features"][:])
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), "the two routes read different bytes"
    shutil.rmtree(folder)
    return {"images": n, "shape": list(shape), "seconds": res, "per_image": {k: v / n for k, v in res.items()},
            "counted": counted}


def repeats_for(n: int) -> int:
    """Measurements of a size: a stage of 10^3 images takes milliseconds, where one draw is at
    the mercy of a timer tick or a writeback.  10^5 images are measured 3 times too: a streamed
    epoch of 10^5 images takes 0.1 s, and two single draws of it on one machine gave 1.14x and
    1.50x the per-image cost of 10^3 (2026-12-02).  Larger sizes once."""
    return 5 if n <= 1000 else 3 if n <= 100000 else 1


def median_of(runs: list[dict]) -> dict:
    """Each stage's median over repeated measurements of one size (every repeat kept in ``runs``)."""
    n = runs[0]["images"]
    sec = {k: float(np.median([r["seconds"][k] for r in runs])) for k in runs[0]["seconds"]}
    counted = {k: float(np.median([r["counted"][k] for r in runs])) for k in runs[0]["counted"]}
    return {"images": n, "shape": runs[0]["shape"], "seconds": sec, "per_image": {k: v / n for k, v in sec.items()},
            "counted": counted, "repeats": len(runs), "runs": [r["seconds"] for r in runs]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = plt.get_cmap("tab20").colors  # one colour and marker per stage: more stages than the default cycle
    for k, stage in enumerate(STAGES):
        pts = [(r["images"], r["per_image"][stage]) for r in results if stage in r["per_image"]]
        if len(pts) > 1:
            ax.loglog(*zip(*pts), marker="osD^v<>"[k % 7], color=colours[k % 20], label=stage)
    ax.set_xlabel("images")
    ax.set_ylabel("seconds per image")
    ax.set_title("covfeat: cost per image of each stage (flat = linear growth)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--load-max", type=int, default=10000, help="largest cache measured with the real map shape")
    ap.add_argument("--work", default=None, help="folder for the synthetic caches (default: a temporary one)")
    ap.add_argument("--note", default="", help="a line added to the results (say so when the machine was loaded)")
    ap.add_argument("--from-json", action="store_true",
                    help="write growth.md and growth.png again from growth.json, measuring nothing")
    args = ap.parse_args()
    if args.from_json:
        import json

        saved = json.loads((RESULTS / "growth.json").read_text())
        args.note = saved.get("note", "")
        report(saved["small"], saved["real"], args, machine=saved["machine"])
        return
    work = Path(tempfile.mkdtemp(prefix="bench-growth-", dir=args.work))
    small, real = [], []
    try:
        measure(64, work, SMALL_SHAPE, True)  # compiles the numba kernels (cached) before anything is timed
        measure(64, work, REAL_SHAPE, False)
        for n in args.sizes:
            free = shutil.disk_usage(work).free
            need = n * (np.prod(SMALL_SHAPE) * 2 + 2 * 4096 + 2000)
            if need > free / 2:
                print(f"skipping {n} images: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                continue
            small.append(median_of([measure(n, work, SMALL_SHAPE, True) for _ in range(repeats_for(n))]))
            print(n, {k: f"{v:.3g}" for k, v in small[-1]["seconds"].items()}, flush=True)
            if n <= args.load_max:
                real.append(measure(n, work, REAL_SHAPE, False))
                print(n, "real shape", {k: f"{v:.3g}" for k, v in real[-1]["seconds"].items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(small, real, args)


def growth(results: list[dict], stage: str) -> float | None:
    """Per-image cost at the largest size over the one at the smallest."""
    pts = [r["per_image"][stage] for r in results if stage in r["per_image"]]
    return pts[-1] / pts[0] if len(pts) > 1 and pts[0] > 0 else None


MILLION = 1_000_000

TARGET = 1.5  # the bound on a stage's per-image cost at the largest size over the smallest (10^5 over 10^3)

OUTSIDE = ("read_vds",)  # measured beside covfeat's own route, not a stage covfeat runs

ONE_CORE = ("neardup_one_core",)  # the same stage kept on one core: the growth of its work, shown beside it


def extrapolated(results: list[dict], stage: str, n: int) -> float | None:
    """Per-image cost at ``n`` images along the log-log slope of the two largest sizes measured."""
    pts = [(r["images"], r["per_image"][stage]) for r in results if stage in r["per_image"]]
    if len(pts) < 2 or min(p for _, p in pts[-2:]) <= 0:
        return None
    (n0, p0), (n1, p1) = pts[-2:]
    return p1 * (n / n1) ** (np.log(p1 / p0) / np.log(n1 / n0))


def report(small, real, args, machine: dict | None = None) -> None:
    """Write growth.json, .md and .png; ``machine``: the one a re-rendered result was measured on."""
    import h5py

    out = {"machine": machine or {"cpu": cpu(), "cpus": os.cpu_count(), "h5py": h5py.__version__,
                                  "hdf5": h5py.version.hdf5_version, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
           "note": args.note, "extrapolated_per_image_at_1e6": {
               st: extrapolated(small, st, MILLION) for st in STAGES} if MILLION not in [r["images"] for r in small]
           else None, "small_shape": list(SMALL_SHAPE), "real_shape": list(REAL_SHAPE),
           "small": small, "real": real}
    sizes = [r["images"] for r in small]
    extrapolate = MILLION not in sizes and len(sizes) > 1
    rows = []
    for stage in STAGES:
        if not any(stage in r["seconds"] for r in small):
            continue
        g = growth(small, stage)
        x = extrapolated(small, stage, MILLION) if extrapolate else None
        label = (" (outside readers' route)" if stage in OUTSIDE
                 else " (its work, on one core)" if stage in ONE_CORE else "")
        rows.append([stage + label]
                    + [f"{r['seconds'][stage]:.3g} s ({r['per_image'][stage] * 1e6:.3g} µs)" for r in small]
                    + ([f"{x * MILLION:.3g} s ({x * 1e6:.3g} µs)" if x else "-"] if extrapolate else [])
                    + [f"{g:.2f}" if g else "-", "- (not a covfeat stage)" if stage in OUTSIDE else "- (not how it runs)" if stage in ONE_CORE
                                              else "-" if g is None
                       else "yes" if g <= TARGET else "**no**"])
    rrows = []
    for r in real:
        s = r["seconds"]
        rrows.append([r["images"], f"{s['load_memory']:.3g}", f"{s['load_memory_epoch']:.3g}",
                      f"{s['load_streamed_epoch']:.3g}", f"{s['load_memory_epoch'] / s['load_streamed_epoch']:.2f}",
                      f"{s['train_memory_epoch']:.3g}", f"{s['train_streamed_epoch']:.3g}",
                      f"{s['train_memory_epoch'] / s['train_streamed_epoch']:.2f}"])
    c = out["machine"]["cpu"]
    md = "\n".join([
        "# Growth benchmark (cost per image from 10^3 images up)", "",
        f"Machine: {c['model']}, {out['machine']['cpus']} CPUs, vector extensions {' '.join(c['vector_extensions'])}; "
        f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}; {out['machine']['date']}.",
        *([f"**{args.note}**", ""] if args.note else [""]),
        f"Synthetic caches written through the store's own writer, float16 maps of shape {SMALL_SHAPE}, one view, "
        "random fingerprints; planning hashes as many 64-byte files (covfeat's cost per file, not the disk's). "
        "Each cell: seconds (seconds per image). The growth column is the per-image cost at the largest size over "
        "the smallest: 1.0 is linear growth.", "",
        table(["stage"] + [f"{n} images" for n in sizes] + (["10^6 images (extrapolated)"] if extrapolate else [])
              + ["growth", f"within {TARGET}x"], rows), "",
        "Measurements per size: " + ", ".join(f"{r['repeats']} at {r['images']} images" for r in small)
        + "; a cell of a size measured more than once is the median (every repeat is in growth.json). Before "
        "each timed stage the kernel's "
        "pending writeback is flushed (`os.sync`, not timed), so no stage pays for the files an earlier one "
        "wrote or deleted.", "",
        "Codes the near-duplicate search compared per image (counted, not timed): "
        + ", ".join(f"{r['counted']['neardup_compared_per_image']:.0f} at {r['images']}" for r in small)
        + ". Exact search within a radius in Hamming space is sublinear per query, not constant: the codes in a "
        "bucket grow with the index, and 64 bits cap how finely multi-index hashing can cut them "
        "(covfeat/trust/neardup_index.py). An index of 2^18 codes or more (about 17,500 images) builds and "
        "searches its chunks on every core; below that, on one.", "",
        *(["The 10^6 column is not measured: it extends each stage's per-image cost along the log-log slope of "
           "the two largest sizes measured.", ""] if extrapolate else []),
        f"fit-head's load with inception_v3's map shape {REAL_SHAPE} float16: the in-memory load, and one epoch's "
        "dropout-pooled rows from memory and streamed from the cache (page cache warm; pooling: the best of 3 "
        "epochs, fit-head: the mean of 3 epochs; in both the first epoch, which checks each shard's bytes, is "
        "not counted).", "",
        table(["images", "load in memory (s)", "pooling in memory (s)", "pooling streamed (s)", "ratio",
               "fit-head epoch in memory (s)", "fit-head epoch streamed (s)",
               "streamed / in-memory epochs per second"], rrows), "",
        "A fit-head epoch overlaps the next epoch's pooling with this epoch's batch steps (dense units 128, "
        "batch 8, numba engine); the pooling columns time that stage alone.", "",
        "`read_vds` reads every row through the index's HDF5 virtual dataset (the route outside readers take); "
        "`read_shard_by_shard` is covfeat's own read (each shard opened once, its bytes checked), the same bytes.",
        "", "Command: `python benchmarks/bench_growth.py`", ""])
    write_results("growth", out, md)
    plot(small, RESULTS / "growth.png")


if __name__ == "__main__":
    main()
