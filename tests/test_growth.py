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
