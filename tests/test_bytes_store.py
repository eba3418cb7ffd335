"""Shards bound to their index, library versions recorded and compared, masks keyed by content
(issue 18, items 3 and 6, Fletcher-32's blind spot, HDF5_VDS_PREFIX and a symlinked index).

The caches here are cut into shards of 4 images (the CLI runs with that shard size, see
``CLI``), so one cache has shards of different sizes to swap.  Those tests start covfeat several
times and are behind ``-m slow``; the default suite keeps the key test and one reading through a
symlinked index with a decoy HDF5_VDS_PREFIX on the session's cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import make_mini

# `covfeat` with shards of 4 images: the same CLI, the same code, a smaller bucket.
CLI = [sys.executable, "-c", "import covfeat.store.shards as s; s.SHARD_IMAGES = 4; "
       "from covfeat.cli import main; import sys; sys.argv[0] = 'covfeat'; main()"]


def covfeat(*args, env=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def extract_args(data, cache_dir, *extra):
    return ["extract", "--backbone", "inception_v3", "--weights", "none", "--augment", "1",
            "--data", data["cohen"], "--data", data["normal"], "--cache-dir", cache_dir, *extra]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("bytes_data"), n_normal=7)  # 7 + 7 images: shards of 4, 4, 4 and 2


@pytest.fixture(scope="module")
def caches(tmp_path_factory, small):
    """Two caches of the same images, float16 and float32, in shards of 4 images, made in this
    process (its backbone graph is the session's)."""
    import covfeat.store.shards
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.run import extract

    root = tmp_path_factory.mktemp("bytes_caches")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(covfeat.store.shards, "SHARD_IMAGES", 4)
        for dtype in ("float16", "float32"):
            cfg = ExtractConfig(backbone="inception_v3", weights="none", augment=1, dtype=dtype)
            out[dtype] = extract([small["cohen"], small["normal"]], cfg, root / dtype, progress=False)
    return out


def copy_cache(index: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(index, dest / index.name)
    shutil.copytree(index.with_name(index.name + ".shards"), dest / (index.name + ".shards"))
    return dest / index.name


def shard_files(index: Path) -> list[Path]:
    with h5py.File(index, "r") as h:
        return [index.parent / rel for rel, _ in json.loads(h.attrs["shards"])]


def samples(shard: Path) -> int:
    with h5py.File(shard, "r") as h:
        return h["features"].shape[0]


def refused(r, *words):
    assert r.returncode != 0, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert str(w) in last, last
    assert "Traceback" not in r.stderr


def fit_head(cache, runs, env=None):
    return covfeat("fit-head", "--cache", cache, "--epochs", "1", "--val", "0.2", "--test", "0.3",
                   "--runs-dir", runs, env=env)


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
@pytest.mark.parametrize("source", ["same cache", "other cache"])
def test_a_shard_swapped_for_one_with_more_rows_is_refused_by_verify_and_fit_head(caches, tmp_path, source):
    """Item 3: a shard overwritten by a bigger shard, of the same cache or of another one,
    passed every check while the index only knew the shard's name."""
    index = copy_cache(caches["float16"], tmp_path / "c")
    shards = shard_files(index)
    small_one = min(shards, key=samples)
    donor = max(shards, key=samples) if source == "same cache" else max(shard_files(caches["float32"]), key=samples)
    assert samples(donor) > samples(small_one)
    shutil.copy(donor, small_one)
    refused(covfeat("verify", index), small_one, "--rebuild")
    refused(fit_head(index, tmp_path / "runs"), small_one, "--rebuild")


def forge_features(shard: Path, change) -> None:
    """Write 0xFFFF over one 16-bit word of a shard's first feature chunk, on disk, where
    ``change(first sample)`` says."""
    with h5py.File(shard, "r") as h:
        ds = h["features"]
        off = ds.id.get_chunk_info(0).byte_offset
        first = ds[0]
    pos = change(first)
    with open(shard, "r+b") as f:
        f.seek(off + pos)
        f.write(b"\xff\xff")


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
def test_fletcher32_blind_spot_in_a_float32_shard_is_caught_by_the_shard_sha256(caches, tmp_path):
    """Low: in float32, a 16-bit word 0x0000 turned 0xFFFF is invisible to Fletcher-32 (and
    makes a finite denormal, so the NaN check cannot see it either); reading the whole shard
    checks its bytes against the SHA-256 the index recorded."""
    index = copy_cache(caches["float32"], tmp_path / "c")
    shard = shard_files(index)[0]

    def a_zero_low_word(first):
        flat = np.ascontiguousarray(first).reshape(-1).view(np.uint32)
        j = int(np.flatnonzero(flat == 0)[0])
        return 4 * j  # little-endian: the low 16 bits come first
    forge_features(shard, a_zero_low_word)
    with h5py.File(shard, "r") as h:  # HDF5 itself reads it without complaint: the blind spot is real
        v = h["features"][0].reshape(-1)
        assert np.isfinite(v).all() and (v.view(np.uint32) == 0xFFFF).any()
    refused(fit_head(index, tmp_path / "runs"), shard, "SHA-256")
    refused(covfeat("verify", index), shard)


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
def test_a_symlinked_index_and_hdf5_vds_prefix_read_the_real_shards(caches, tmp_path):
    """Low: covfeat reads each shard beside the index's real file, never through the virtual
    dataset: a symlinked index elsewhere, with HDF5_VDS_PREFIX pointing at a decoy folder whose
    shards are junk, reads (and checks) the real shards."""
    real = copy_cache(caches["float16"], tmp_path / "real")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / real.name
    link.symlink_to(real)
    decoy = tmp_path / "decoy"
    (decoy / (real.name + ".shards")).mkdir(parents=True)
    for s in shard_files(real):
        (decoy / (real.name + ".shards") / s.name).write_bytes(b"junk" * 100)
        (elsewhere / (real.name + ".shards")).mkdir(exist_ok=True)
        (elsewhere / (real.name + ".shards") / s.name).write_bytes(b"junk" * 100)
    env = {"HDF5_VDS_PREFIX": str(decoy)}
    r = covfeat("verify", link, env=env)
    assert r.returncode == 0, r.stderr
    r = fit_head(link, tmp_path / "runs", env=env)
    assert r.returncode == 0, r.stderr


def test_verify_reads_the_shards_beside_the_real_index_not_through_the_vds(mini_cache, tmp_path):
    """The default suite's share of the symlink and HDF5_VDS_PREFIX test above, on the
    session's cache: `covfeat verify` through a symlink, with a prefix of junk shards, checks
    (and passes on) the real ones."""
    real = copy_cache(mini_cache, tmp_path / "real")
    link = tmp_path / "elsewhere" / real.name
    link.parent.mkdir()
    link.symlink_to(real)
    decoy = tmp_path / "decoy" / (real.name + ".shards")
    decoy.mkdir(parents=True)
    for s in shard_files(real):
        (decoy / s.name).write_bytes(b"junk" * 100)
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "verify", str(link)], capture_output=True, text=True,
                       env=dict(os.environ, HDF5_VDS_PREFIX=str(decoy.parent)))
    assert r.returncode == 0, r.stderr


def set_versions(h5: Path, change: dict, *, redigest) -> None:
    with h5py.File(h5, "r+") as h:
        v = json.loads(h.attrs["versions"])
        h.attrs["versions"] = json.dumps({**v, **change}, sort_keys=True)
        h.attrs["digest"] = redigest(h)


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
def test_shards_of_different_library_versions_are_not_merged(caches, tmp_path, small):
    """Item 6: a shard recording other versions (forged and re-digested, as an attacker would,
    or made on a node with another numpy) is refused at merge, naming a shard of each and the
    versions; when every shard is of other versions than this covfeat's, each is damaged."""
    from covfeat.store.shards import _shard_digest

    index = copy_cache(caches["float16"], tmp_path / "c")
    shards = shard_files(index)
    index.unlink()  # the shards are there, the index is not: the next run merges them
    set_versions(shards[-1], {"numpy": "0.0.1"}, redigest=_shard_digest)
    r = covfeat(*extract_args(small, tmp_path / "c"))
    refused(r, "different library versions", shards[-1].name, "numpy", "0.0.1", "--rebuild")
    for s in shards[:-1]:
        set_versions(s, {"numpy": "0.0.1"}, redigest=_shard_digest)
    r = covfeat(*extract_args(small, tmp_path / "c"))
    refused(r, "other library versions than this covfeat's", "numpy 0.0.1")
    assert not index.exists()


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
def test_a_finished_cache_of_other_versions_is_reused_with_a_note_naming_rebuild_all(caches, tmp_path, small):
    """Item 6: the cache's features are the user's numbers, so a finished cache is reused, but
    never silently: the run names the versions and --rebuild all; `covfeat info` shows them."""
    from covfeat.store.index import index_digest

    index = copy_cache(caches["float16"], tmp_path / "c")
    set_versions(index, {"keras": "2.0.0"}, redigest=index_digest)
    r = covfeat(*extract_args(small, tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    note = [ln for ln in r.stderr.splitlines() if ln.startswith("NOTE: this cache was made with other")]
    assert note and "keras 2.0.0 vs " in note[0] and "--rebuild all" in note[0], r.stderr
    info = covfeat("info", index)
    assert '"keras": "2.0.0"' in info.stdout, info.stdout
    copy_cache(caches["float16"], tmp_path / "c2")
    r = covfeat(*extract_args(small, tmp_path / "c2"))  # the same versions: no note
    assert r.returncode == 0 and "NOTE: this cache was made" not in r.stderr, r.stderr


@pytest.mark.slow  # caches of 4-image shards and covfeat started several times: about a minute
def test_an_index_of_an_earlier_covfeat_is_refused_then_reindexed_from_its_shards(caches, tmp_path, small):
    """An index without the record of its shards (every index before this covfeat) is not read
    blind: reading refuses it with the way out, and the same extract re-indexes it from its
    verified shards, computing nothing."""
    from covfeat.store.index import index_digest

    index = copy_cache(caches["float16"], tmp_path / "c")
    with h5py.File(index, "r+") as h:
        del h["shard_table"]
        h.attrs["digest"] = index_digest(h)
    refused(covfeat("verify", index), "earlier covfeat", "run the same `covfeat extract` again")
    r = covfeat(*extract_args(small, tmp_path / "c"))
    assert r.returncode == 0 and "Re-indexing" in r.stderr and "extract inception_v3" not in r.stderr, r.stderr
    assert covfeat("verify", index).returncode == 0


def test_occlusion_masks_enter_the_key_by_content_not_by_folder(tmp_path):
    """Item 6: editing a mask changes the key, moving or renaming the folder does not; every
    config without masks keeps its key (tests/test_fingerprint.py pins one)."""
    from covfeat.extraction.config import ExtractConfig, OcclusionConfig, key_config
    from covfeat.store.key import cache_key

    def key(folder):
        cfg = ExtractConfig(backbone="inception_v3", occlusion=OcclusionConfig(kind="masks", masks=str(folder)))
        return cache_key(key_config(cfg, "none:seed=0"), [{"sha256": "ab", "label": 1}])

    a = tmp_path / "a"
    a.mkdir()
    (a / "x.png").write_bytes(b"mask one")
    (a / "y.png").write_bytes(b"mask two")
    k = key(a)
    b = tmp_path / "moved" / "b"
    b.parent.mkdir()
    a.rename(b)
    assert key(b) == k
    (b / "y.png").write_bytes(b"mask 2")
    assert key(b) != k
    (b / "y.png").write_bytes(b"mask two")
    (b / "y.png").rename(b / "z.png")  # a mask now applies to another image
    assert key(b) != k


def test_a_mask_occluded_cache_finds_its_masks_again_only_while_they_are_the_same(tmp_path):
    """What predict and the probes rebuild from a mask-occluded cache's record: the folder the
    masks were in, taken only while its content is the one in the key."""
    from covfeat.core.errors import ConfigError
    from covfeat.extraction.backbones import get_backbone, resolve_weights
    from covfeat.extraction.config import ExtractConfig, OcclusionConfig
    from covfeat.extraction.plan import resolved_config

    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"mask one")
    cfg = ExtractConfig(backbone="inception_v3", weights="none",
                        occlusion=OcclusionConfig(kind="masks", masks=str(folder)))
    stored = json.loads(json.dumps(resolved_config(cfg, resolve_weights(get_backbone("inception_v3"), "none"))))
    again = ExtractConfig.from_stored(stored)
    assert again.occlusion.masks == str(folder.resolve()) and again.occlusion.kind == "masks"
    (folder / "x.png").write_bytes(b"mask 1")
    with pytest.raises(ConfigError, match=r"^The masks in .* are not the ones the cache was made with"):
        ExtractConfig.from_stored(stored)
