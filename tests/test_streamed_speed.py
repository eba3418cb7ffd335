"""Streamed fit-head reads checked shards' rows in place from their mapped files (issue 20,
item 2): the same numbers as in memory, bit for bit; the mapped route used once a shard is
checked (a counter says which route read each row); a shard changed after its check stops
the run; a layout covfeat does not map is read through h5py, visibly."""

import os
from dataclasses import replace

import h5py
import numpy as np
import pytest
from conftest import fit

from covfeat.core.errors import CacheError
from covfeat.head.dropout import keep_q
from covfeat.head.fit import LoadedMaps, fit_head
from covfeat.head.loop import MemorySource, StreamedSource, epoch_plan
from covfeat.store import reader
from covfeat.store.rawread import row_layout
from covfeat.store.reader import open_cache


def _sources(cache):
    """An in-memory and a streamed source over every row, with two SMOTE rows, on one cache."""
    fc = open_cache(cache)
    rows = np.flatnonzero(fc.has_features())
    parents, weights = np.array([[0, 3], [5, 1]]), np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    maps = LoadedMaps(open_cache(cache), rows)  # another FeatureCache: its reads do not count here
    return fc, rows, MemorySource(maps.pool, parents, weights, index=maps.pos[rows]), StreamedSource(
        fc, rows, parents, weights)


def _epoch(src, e, n, n_views, C):
    order, views = epoch_plan(7, e + 1, n, n_views)[e]
    out = np.zeros((n, C), np.float32)
    src.pooled(e, order, views, keep_q(0.5), 7, out)
    return out


def test_streamed_epochs_equal_in_memory_ones_bit_for_bit_and_read_mapped_rows(mini_cache):
    fc, rows, mem, st = _sources(mini_cache)
    n, C = len(rows) + 2, fc.feature_shape[-1]
    n_views = np.full(n, fc.n_views, np.int64)
    fds = len(os.listdir("/proc/self/fd"))
    for e in range(3):
        a, b = _epoch(mem, e, n, n_views, C), _epoch(st, e, n, n_views, C)
        assert a.tobytes() == b.tobytes()
    # every row came from the mapped files: no HDF5 read of features, no shard refused
    assert fc.reads == {"in_place": 3 * (len(rows) + 4), "mapped": 0, "h5py": 0} and fc.unmapped == {}
    assert fc.checked == set(fc.maps) == set(range(len(fc.table.bounds) - 1))
    assert len(os.listdir("/proc/self/fd")) == fds  # a mapped shard keeps no file descriptor open
    # read_features on mapped shards gives what h5py gives
    idx = np.array([5, 0, 3, 3, len(fc.view) - 1])
    with h5py.File(mini_cache, "r") as h:
        want = h["features"][np.sort(np.unique(idx))].astype(np.float32)
    got = fc.read_features(idx)
    assert fc.reads["mapped"] == len(idx) and fc.reads["h5py"] == 0
    assert got.tobytes() == want[np.searchsorted(np.unique(idx), idx)].tobytes()


def test_streamed_fit_head_equals_in_memory_bit_for_bit(mini_cache, tmp_path):
    fc = open_cache(mini_cache)
    mem = fit_head(mini_cache, fit(3), tmp_path / "m", progress=False)
    st = fit_head(mini_cache, replace(fit(3), memory_budget_gb=1e-6), tmp_path / "s", progress=False, fc=fc)
    assert fc.reads["in_place"] > 0 and fc.reads["h5py"] == 0
    for name in ("history.csv", "predictions.csv"):
        assert (mem / name).read_text() == (st / name).read_text()


def _flip_in_place(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def test_a_shard_changed_after_its_check_stops_the_next_epoch(mini_cache, tmp_path):
    """The mapping reads the file's current bytes: a change after the check is seen by its
    times at the next read, the rows re-hashed, and damage is an error, never trained on.  A
    change of times alone (the same bytes) is not damage."""
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(mini_cache.parent, copy, symlinks=True)
    cache = copy / mini_cache.name
    fc, rows, mem, st = _sources(cache)
    n, C = len(rows) + 2, fc.feature_shape[-1]
    n_views = np.full(n, fc.n_views, np.int64)
    _epoch(st, 0, n, n_views, C)
    shard = fc.table.path(0)
    os.utime(shard, ns=(1, 1))  # times moved, bytes the same: re-hashed, and on it goes
    assert _epoch(st, 1, n, n_views, C).tobytes() == _epoch(mem, 1, n, n_views, C).tobytes()
    _flip_in_place(shard, int(fc.maps[0].offsets[1]) * 2 + 10)
    with pytest.raises(CacheError, match=f"shard {shard}: its features no longer match the SHA-256 its index "
                       r"recorded \(the file changed after this process checked it\)"):
        _epoch(st, 2, n, n_views, C)


def test_a_layout_covfeat_does_not_map_is_read_through_h5py_visibly(mini_cache, tmp_path, monkeypatch):
    with h5py.File(tmp_path / "x.h5", "w") as h:
        gz = h.create_dataset("gz", data=np.ones((3, 4), np.float16), chunks=(1, 4), compression="gzip")
        two = h.create_dataset("two", data=np.ones((4, 4), np.float16), chunks=(2, 4), fletcher32=True)
        plain = h.create_dataset("plain", data=np.ones((3, 4), np.float16), chunks=(1, 4), fletcher32=True)
        size = 10**9
        assert row_layout(gz, size).startswith("filters [1]")
        assert row_layout(two, size) == "chunks (2, 4), not one row"
        assert isinstance(row_layout(plain, size), np.ndarray)
    monkeypatch.setattr(reader, "row_layout", lambda ds, size: "a layout refused for this test")
    fc, rows, mem, st = _sources(mini_cache)
    n, C = len(rows) + 2, fc.feature_shape[-1]
    n_views = np.full(n, fc.n_views, np.int64)
    for e in range(2):
        assert _epoch(st, e, n, n_views, C).tobytes() == _epoch(mem, e, n, n_views, C).tobytes()
    assert fc.reads == {"in_place": 0, "mapped": 0, "h5py": 2 * (len(rows) + 4)} and not fc.maps
    assert set(fc.unmapped.values()) == {"a layout refused for this test"}


def _cache_of_shards(path, n=40, shard_images=8):
    """A cache of ``n`` images in shards of ``shard_images``, written straight through the store
    from synthetic maps with zeros in them (as a ReLU's), no backbone."""
    import covfeat.store.shards as shards_mod
    from covfeat.store.index import assemble
    from covfeat.store.shards import ShardStore, plan_shards

    rng = np.random.default_rng(0)
    shape, V = (3, 3, 16), 2
    feats = np.maximum(rng.standard_normal((n, V, *shape)), 0).astype(np.float16)
    rows = [{"path": f"/img/{i:03d}.png", "label": i % 2, "patient_id": f"p{i}", "source": "syn", "view": "",
             "sha256": f"{i:064x}"} for i in range(n)]
    config = {"backbone": "fake", "seed": 0,
              "weights": {"identity": "none:seed=0", "kind": "none", "pretrained": False, "label": "random"}}
    store = ShardStore(path, "k")
    old, shards_mod.SHARD_IMAGES = shards_mod.SHARD_IMAGES, shard_images
    try:
        specs = plan_shards(rows, "k")
    finally:
        shards_mod.SHARD_IMAGES = old
    for spec in specs:
        m = len(spec.rows)
        store.write(spec, [rows[i]["sha256"] for i in spec.rows], feats[list(spec.rows)].reshape(m * V, *shape),
                    np.repeat(np.arange(m), V), np.tile(np.arange(V), m), np.zeros((m * V, 4), np.float32), {}, {})
    assemble(path, store, specs, config=config, manifest=rows, feature_shape=shape, dtype="float16", extra={})
    return path, feats


def test_the_first_read_checks_shards_on_every_core_and_names_the_first_damaged_one(tmp_path, monkeypatch):
    """The SHA-256 checks of a first read run in parallel (a bounded queue of mapped shards) and
    give the maps written; with two shards damaged where HDF5's own checksum is blind
    (0x0000 -> 0xFFFF), the read stops on the first of them in the cache's order, as one shard at
    a time did, and names it."""
    from covfeat.store import rawread

    monkeypatch.setattr(rawread, "usable_cores", lambda: 2)
    calls = []
    real = rawread.mapped_and_hashed
    monkeypatch.setattr(reader, "mapped_and_hashed", lambda jobs: calls.append(len(jobs)) or real(jobs))
    index, feats = _cache_of_shards(tmp_path / "c.h5")
    fc = open_cache(index)
    shards = [fc.table.path(i) for i in range(len(fc.table))]
    assert len(shards) >= 4
    got = fc.read_features(dtype=np.float16).reshape(len(feats), 2, *feats.shape[2:])
    np.testing.assert_array_equal(got, feats)
    assert calls == [len(shards)]  # every shard went to the parallel checks in one call
    for shard in (shards[1], shards[3]):
        with h5py.File(shard, "r") as h:
            ds = h["features"]
            off = ds.id.get_chunk_info(0).byte_offset
            words = np.ascontiguousarray(ds[0]).reshape(-1).view(np.uint16)
        with open(shard, "r+b") as f:
            f.seek(off + 2 * int(np.flatnonzero(words == 0)[0]))
            f.write(b"\xff\xff")
    with pytest.raises(CacheError, match=f"shard {shards[1]}: its features do not match the SHA-256 its index recorded"):
        open_cache(index).read_features()
