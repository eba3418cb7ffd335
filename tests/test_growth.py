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
