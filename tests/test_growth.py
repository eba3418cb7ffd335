"""Costs that must grow linearly with the number of images (issue 20, item 2): the stages that
once did work per shard proportional to the number of shards."""

from __future__ import annotations

import time

import h5py
import numpy as np

from covfeat.store.index import TABLE, ShardTable


def test_the_rows_of_every_shard_cost_the_same_at_any_size(tmp_path):
    """``verify`` asks the shard table for the rows of every shard; each answer once summed the
    image counts of every shard before it, so a cache of 10^5 images (3125 shards) spent
    quadratic time there.  150,000 shards (about five million images): linear takes a fraction
    of a second, the quadratic sum about five."""
    n = 150_000
    path = tmp_path / "index.h5"
    with h5py.File(path, "w") as h:
        t = h.create_group(TABLE)
        names = np.array([f"s{i}.h5" for i in range(n)], dtype=h5py.string_dtype())
        for f in ("name", "features_sha256", "digest"):
            t.create_dataset(f, data=names)
        t.create_dataset("start", data=np.arange(n, dtype=np.int64) * 32)
        for f in ("samples", "images"):
            t.create_dataset(f, data=np.full(n, 32, np.int64))
        t.create_dataset("bytes", data=np.zeros(n, np.int64))
        t.create_dataset("members", data=np.arange(32 * n, dtype=np.int64)[::-1])
    with h5py.File(path, "r") as h:
        table = ShardTable(path, h)
    start = time.perf_counter()
    for i in range(n):
        table.rows(i)
    seconds = time.perf_counter() - start
    np.testing.assert_array_equal(table.rows(n - 1), np.arange(32)[::-1])
    np.testing.assert_array_equal(table.rows(0), np.arange(32 * n - 32, 32 * n)[::-1])
    assert seconds < 2.0, f"{n} shards' rows took {seconds:.1f} s"


def synthetic_cache(folder, n: int, shape=(2, 2, 8)):
    """A complete cache of ``n`` images written through the store's own writer (no backbone)."""
    from covfeat.store.index import assemble
    from covfeat.store.key import cache_name
    from covfeat.store.shards import ShardStore, plan_shards
    from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE

    rng = np.random.default_rng(0)
    key = "0123456789abcdef"
    rows = [{"path": f"/data/img{i}.png", "label": i % 2, "patient_id": f"p{i}", "source": "s", "view": "PA",
             "sha256": f"{i:064x}"} for i in range(n)]
    specs = plan_shards(rows, key)
    target = folder / cache_name("synthetic", "none", key)
    store = ShardStore(target, key)
    for spec in specs:
        k = len(spec.rows)
        fps = {p: (rng.integers(0, 2**63, FINGERPRINT_HASHES, dtype=np.uint64),
                   rng.integers(0, 256, FINGERPRINT_THUMB_SHAPE, dtype=np.uint8)) for p in range(k)}
        store.write(spec, [rows[i]["sha256"] for i in spec.rows], rng.standard_normal((k, *shape)).astype(np.float16),
                    np.arange(k), np.zeros(k), np.zeros((k, 4)), {}, fps)
    config = {"backbone": "synthetic", "weights": {"pretrained": False, "label": "none"}, "views": ["PA"]}
    assemble(target, store, specs, config=config, manifest=rows, feature_shape=shape, dtype="float16", extra={})
    return target


def test_opening_a_cache_reads_its_manifest_once(tmp_path, monkeypatch):
    """Opening checks the index's digest over every manifest string and then keeps the manifest:
    it read every string dataset twice, most of the 4 s it took to open 10^5 images."""
    from covfeat.store.catalog import verify_cache
    from covfeat.store.reader import open_cache

    target = synthetic_cache(tmp_path, 70)
    reads = []
    real = h5py.Dataset.__getitem__

    def counted(self, sel):
        reads.append(self.name)
        return real(self, sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    fc = open_cache(target)
    monkeypatch.undo()
    twice = sorted({r for r in reads if reads.count(r) > 1})
    assert not twice, f"read more than once on open: {twice}"
    assert list(fc.manifest["path"][:2]) == ["/data/img0.png", "/data/img1.png"]
    assert fc.manifest["label"].tolist() == [i % 2 for i in range(70)] and fc.skipped == []
    assert verify_cache(target)["images"] == 70


def python_plan(rows, key, size=32):
    """The plan as covfeat wrote it before numpy sorted it: existing caches' shard names."""
    import hashlib

    order = sorted(range(len(rows)), key=lambda i: rows[i]["sha256"])
    out = []
    for k, a in enumerate(range(0, len(order), size)):
        members = tuple(order[a:a + size])
        h = hashlib.sha256((key + "".join(rows[i]["sha256"] for i in members)).encode()).hexdigest()[:16]
        out.append((k, members, f"shard-{h}.h5"))
    return out


def test_the_plan_is_the_one_existing_caches_were_written_with():
    """plan_shards sorts with numpy (its Python sort grew from 0.5 to 2.2 µs an image between
    10^3 and 10^5 images): the same members, order and names as the Python plan, ties (one
    image twice) in manifest order, hashes equal in their first 8 bytes, a last shard short, and
    hashes that are not hex digests."""
    from covfeat.store.shards import plan_shards

    rng = np.random.default_rng(1)
    shas = [f"{int(v):016x}" * 4 for v in rng.integers(0, 2**63, 1000)]
    shas[7] = shas[500] = shas[901]  # duplicates: manifest order breaks the tie
    shas[10], shas[11], shas[12] = (shas[20][:8] + c * 56 for c in "f0f")  # ties in the first 8 bytes only
    odd = ["ab", "a", "", "é" * 3, "b", "zz", "ab", "Ab", "a" * 70]
    nul = odd + ["ab\x00", "b\x00\x00"]  # numpy's fixed-width strings would tie "ab" and "ab\x00"
    for rows in ([{"sha256": s} for s in shas], [{"sha256": s} for s in odd], [{"sha256": s} for s in nul],
                 [{"sha256": s} for s in shas[:33]], []):
        for size in (None, 3):
            got = [(s.index, s.rows, s.name) for s in plan_shards(rows, "k3y", size)]
            assert got == python_plan(rows, "k3y", size or 32)
            assert all(type(r) is int for s in got for r in s[1])


def test_every_mapped_shard_is_read_in_one_gather(tmp_path, monkeypatch):
    """A read of rows from many shards called the parallel copy kernel once per shard, each call a
    thread wake-up (at 10^5 images, 3125 calls: most of fit-head's in-memory load and of a read of
    every row).  Now one call gathers the rows of every mapped shard, in any order asked, into
    float16, float32 (converted exactly) or an ``out`` that is not contiguous."""
    from covfeat.store import reader
    from covfeat.store.reader import open_cache

    target = synthetic_cache(tmp_path, 70)  # 3 shards
    with h5py.File(target, "r") as h:
        want = h["features"][:]
    calls = []
    for name in ("gather_mapped", "gather_mapped_f16"):
        real = getattr(reader, name)
        monkeypatch.setattr(reader, name, lambda *a, real=real: (calls.append(1), real(*a)))
    fc = open_cache(target)
    idx = np.random.default_rng(0).permutation(70)[:50]
    got16 = fc.read_features(idx, np.float16)
    assert len(calls) == 1 and len(fc.table) == 3 and fc.reads == {"in_place": 0, "mapped": 50, "h5py": 0}
    np.testing.assert_array_equal(got16.view(np.uint16), want[idx].view(np.uint16))
    np.testing.assert_array_equal(fc.read_features(idx), want[idx].astype(np.float32))
    strided = np.zeros((50, *want.shape[1:], 2), np.float16)[..., 0]
    fc.read_features(idx, out=strided)
    np.testing.assert_array_equal(strided.view(np.uint16), want[idx].view(np.uint16))
    assert len(calls) == 3
