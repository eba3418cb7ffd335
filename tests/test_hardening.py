"""Integrity and hostile input, as a user meets them: every case ends in one clear line or a
skip with a reason the user can find later; a damaged cache is never trained on."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import make_mini
from typer.testing import CliRunner

from covfeat.cli import app

runner = CliRunner()
EX = ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0"]


def last(r) -> str:
    return r.stdout.strip().splitlines()[-1]


def err(r) -> str:
    """The error line (fit-head names its cache on stderr first)."""
    return r.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = make_mini(tmp_path_factory.mktemp("small"), n_covid=6, n_normal=6)
    return d


@pytest.fixture
def cache(small, tmp_path):
    r = runner.invoke(app, EX + ["--data", str(small["cohen"]), "--data", str(small["normal"]), "--cache-dir",
                                 str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    return Path(last(r))


def _flip_byte_in_features(index: Path) -> None:
    """One byte of one feature map, changed inside the shard file that holds it."""
    with h5py.File(index, "r") as h:
        shard = index.parent / json.loads(h.attrs["shards"])[0][0]
    with h5py.File(shard, "r") as h:
        info = h["features"].id.get_chunk_info(3)
    with open(shard, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        b = f.read(1)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([b[0] ^ 0x55]))


# 1. a corrupted byte: never trained on, and extract does not call it complete
def test_a_corrupted_cache_is_never_trained_on(small, cache, tmp_path):
    _flip_byte_in_features(cache)
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--epochs", "1", "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code == 1 and not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    assert err(r).startswith(f"error: {cache} is damaged (a checksum does not match: ")
    assert err(r).endswith("run the same `covfeat extract` with --rebuild to recompute the damaged parts and write the "
                           "index again (--rebuild all: move everything aside and extract it all again).")
    r = runner.invoke(app, ["verify", str(cache)])
    assert r.exit_code == 1 and "is damaged (a checksum does not match" in r.stderr
    args = EX + ["--data", str(small["cohen"]), "--data", str(small["normal"]), "--cache-dir", str(cache.parent)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--rebuild" in r.stderr and "nothing to do" not in r.stderr
    # 5. the way out: --rebuild moves it aside and extracts again; nothing is deleted
    r = runner.invoke(app, args + ["--rebuild"])
    assert r.exit_code == 0, r.output
    assert "Moved aside: " in r.stderr and list(cache.parent.glob("*.damaged-*"))
    assert runner.invoke(app, ["verify", str(cache)]).exit_code == 0


def test_a_changed_attribute_is_caught_by_the_digest(cache):
    with h5py.File(cache, "r+") as h:
        cfg = json.loads(h.attrs["config"])
        cfg["augment"] = 9
        h.attrs["config"] = json.dumps(cfg)
    r = runner.invoke(app, ["info", str(cache)])
    assert r.exit_code == 1
    assert "is damaged (its attributes or manifest do not match their digest)" in r.stderr


def test_an_index_under_another_caches_name_is_refused(cache):
    """The index stores its own key: a copy under the name of another cache is not taken for it."""
    with h5py.File(cache, "r") as h:
        assert h.attrs["key"] == cache.stem.rsplit("-", 1)[-1]
    other = cache.with_name(f"{cache.stem.rsplit('-', 1)[0]}-0123456789abcdef.h5")
    other.write_bytes(cache.read_bytes())
    r = runner.invoke(app, ["info", str(other)])
    assert r.exit_code == 1
    assert err(r) == (f"error: {other} is damaged (it is the cache of key {cache.stem.rsplit('-', 1)[-1]}, its name "
                      "says 0123456789abcdef); run the same `covfeat extract` with --rebuild to recompute the damaged "
                      "parts and write the index again (--rebuild all: move everything aside and extract it all "
                      "again).")
    assert runner.invoke(app, ["info", str(cache)]).exit_code == 0
    mine = cache.with_name("mine.h5")  # a name covfeat did not give claims no key
    mine.write_bytes(cache.read_bytes())
    assert runner.invoke(app, ["info", str(mine)]).exit_code == 0


def test_a_cache_of_an_older_format_says_how_to_get_a_new_one(cache):
    """A format-3 cache (the four-crop near-duplicate fingerprint) is not reused, and the advice is
    one that works: a new extraction writes a cache under a new name (the format is in the key),
    so --rebuild, which moves the cache at the new name aside, would not help."""
    with h5py.File(cache, "r+") as h:
        h.attrs["format_version"] = 3
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--epochs", "1"])
    assert r.exit_code == 1
    assert err(r) == (f"error: {cache} has format version 3, this covfeat reads 4; run `covfeat extract` again (the "
                      "new cache gets a new name) and fit-head on it; runs fitted on this cache cannot be used with "
                      "this covfeat, and the file can be deleted.")


@pytest.mark.parametrize("damage", ["complete cleared", "truncated"])
def test_a_damaged_cache_is_not_a_dead_end(small, cache, damage):
    if damage == "complete cleared":
        with h5py.File(cache, "r+") as h:
            h.attrs["complete"] = False
    else:
        with open(cache, "r+b") as f:
            f.truncate(cache.stat().st_size // 2)
    args = EX + ["--data", str(small["cohen"]), "--data", str(small["normal"]), "--cache-dir", str(cache.parent)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "is damaged (" in r.stderr and "--rebuild" in r.stderr
    r = runner.invoke(app, args + ["--rebuild"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--epochs", "1", "--runs-dir", "runs"])
    assert r.exit_code == 0, r.output


# 2. fit-head names its cache and never guesses between several
def test_fit_head_names_its_cache_and_refuses_to_guess(small, tmp_path):
    a = make_mini(tmp_path / "a", n_covid=5, n_normal=5)
    c = tmp_path / "c"
    for d in (small, a):
        r = runner.invoke(app, EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--cache-dir", str(c)])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit-head", "-b", "inception_v3", "--cache-dir", str(c), "--epochs", "1"])
    assert r.exit_code == 1 and err(r).startswith(f"error: 2 complete caches of inception_v3 in {c}: ")
    assert "Pass --cache FILE, or --data SRC to pick the one made from those images." in r.stderr
    r = runner.invoke(app, ["fit-head", "-b", "inception_v3", "--cache-dir", str(c), "--epochs", "1", "--data",
                            str(a["cohen"]), "--data", str(a["normal"])])
    assert r.exit_code == 0, r.output
    assert "Cache: " in r.stderr and "10 images: 5 COVID-19, 5 NORMAL" in r.stderr


# 3 and 6. limits a user can raise; degenerate images
def test_bombs_strips_and_dots_are_skipped_with_the_limit_and_flag(small, tmp_path):
    bad = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    n = bad["normal"]
    cv2.imwrite(str(n / "IM-9100-0001.png"), np.zeros((9000, 9000), np.uint8))  # 81 Mpx, a few KB
    cv2.imwrite(str(n / "IM-9101-0001.png"), np.full((50, 5000), 128, np.uint8))
    cv2.imwrite(str(n / "IM-9102-0001.png"), np.full((1, 1), 128, np.uint8))
    with open(n / "IM-9103-0001.png", "wb") as f:  # a sparse 300 MB "image"
        f.truncate(300 * 2**20)
    r = runner.invoke(app, EX + ["--data", str(bad["cohen"]), "--data", str(n), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(app, ["info", last(r)])
    reasons = {Path(line.split(": ")[0].strip()).name: line.split(": ", 1)[1] for line in r2.stdout.splitlines()
               if "IM-91" in line}
    assert reasons == {
        "IM-9100-0001.png": "9000 x 9000 = 81 Mpx exceeds --max-pixels 64000000",
        "IM-9101-0001.png": "5000 x 50: shorter side below --min-side 64",
        "IM-9102-0001.png": "1 x 1: shorter side below --min-side 64",
        "IM-9103-0001.png": "file of 300 MB exceeds --max-file-mb 256",
    }
    r = runner.invoke(app, EX + ["--data", str(bad["cohen"]), "--data", str(n), "--cache-dir", str(tmp_path / "c2"),
                                 "--min-side", "40", "--max-aspect", "200"])
    skipped = runner.invoke(app, ["info", last(r)]).stdout
    assert "IM-9101-0001.png" not in skipped.split("skipped at extraction")[1]  # raised limits let the strip in


# 4. conflicts are errors
def test_the_same_bytes_under_two_labels_stop_the_run(small, tmp_path):
    img = next(small["normal"].iterdir())
    man = tmp_path / "m.csv"
    rows = [[str(p), "NORMAL", p.stem, "k"] for p in sorted(small["normal"].iterdir())]
    rows += [[str(p), "COVID-19", p.stem, "c"] for p in sorted((small["cohen"] / "images").iterdir())]
    rows.append([str(img), "COVID-19", "x", "c"])
    with open(man, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "source"], *rows])
    r = runner.invoke(app, EX + ["--data", str(man)])
    assert r.exit_code == 1 and Path("cache").exists() is False or not any(Path("cache").glob("*.h5"))
    assert r.stderr == (f"error: 1 image(s) have the same bytes under both labels: {img} (NORMAL) = {img} (COVID-19). "
                        "Fix the labels, or pass --on-conflict skip to drop every copy of them.\n")
    r = runner.invoke(app, EX + ["--data", str(man), "--on-conflict", "skip"])
    assert r.exit_code == 0, r.output
    assert "2 listings dropped for conflicting labels" in r.stderr and "Data: 11 images (6 COVID-19, 5 NORMAL)" in r.stderr


# 7. every skip is findable
def test_every_skip_is_counted_and_listed(small, tmp_path):
    bad = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    (bad["normal"] / "IM-9200-0001.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    for k in range(13):
        (bad["normal"] / f"IM-93{k:02d}-0001.png").write_bytes(b"not an image %d" % k)
    r = runner.invoke(app, EX + ["--data", str(bad["cohen"]), "--data", str(bad["normal"])])
    assert r.exit_code == 0, r.output
    assert "1 broken links" in r.stderr and "Skipped 13 unreadable file(s):" in r.stderr
    assert f"... and 3 more; `covfeat info {last(r)}` lists every one with its reason" in r.stderr
    out = runner.invoke(app, ["info", last(r)]).stdout
    assert "broken links: 1" in out and "skipped at extraction: 13" in out and out.count("not a decodable image") == 13
    run = runner.invoke(app, ["fit-head", "--cache", last(r), "--epochs", "1", "--test", "0.4"])
    rep = runner.invoke(app, ["report", last(run)]).stdout
    assert "images not used" in rep and "13 skipped at extraction, 1 missing, 1 broken links" in rep


# 8. input files with a surprise
@pytest.mark.parametrize("drop,message", [
    ("filename", "needs the column(s) filename; found "), ("patientid", "needs the column(s) patientid; found "),
    ("finding", "needs the column(s) finding; found "),
])
def test_a_cohen_metadata_without_a_column_names_it(tmp_path, drop, message):
    d = make_mini(tmp_path / "d", n_covid=3, n_normal=3)
    rows = list(csv.DictReader(open(d["cohen"] / "metadata.csv")))
    with open(d["cohen"] / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != drop])
        w.writeheader()
        w.writerows([{k: v for k, v in r.items() if k != drop} for r in rows])
    r = runner.invoke(app, EX + ["--data", str(d["cohen"]), "--data", str(d["normal"])])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"metadata.csv: Cohen's metadata.csv {message}" in r.stderr


@pytest.mark.parametrize("encoding", ["utf-8-sig", "latin-1"])
def test_manifest_encodings(small, tmp_path, encoding):
    rows = [[str(p), "NORMAL", "Müller" + p.stem, "k"] for p in sorted(small["normal"].iterdir())]
    rows += [[str(p), "COVID-19", p.stem, "c"] for p in sorted((small["cohen"] / "images").iterdir())]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "source"], *rows])
    r = runner.invoke(app, EX + ["--data", str(man)])
    if encoding == "utf-8-sig":
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 1
        assert r.stderr.startswith(f"error: {man}: a manifest CSV (path,label[,patient_id,source]) is not UTF-8 text")


# 9. outputs checked before any work
def test_unwritable_outputs_fail_before_work(cache, tmp_path, mini_run, mini):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--runs-dir", str(locked / "runs")])
        assert r.exit_code == 1 and err(r).startswith("error: --runs-dir: expected a folder covfeat can write")
        r = runner.invoke(app, ["predict", "--run", str(mini_run), str(mini["normal"]), "--out", str(locked / "p.csv")])
        assert r.exit_code == 1 and err(r).startswith("error: --out: expected a folder covfeat can write")
    finally:
        os.chmod(locked, 0o700)


def test_a_file_where_a_folder_should_be_fails_before_work(cache, tmp_path, mini_run, mini):
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--runs-dir", str(tmp_path / "afile" / "runs")])
    assert r.exit_code == 1 and err(r).startswith("error: --runs-dir: expected a folder covfeat can write")
    r = runner.invoke(app, ["export", "--run", str(mini_run), "--out", str(tmp_path / "afile" / "m.keras")])
    assert r.exit_code == 1 and err(r).startswith("error: --out: expected a folder covfeat can write")


# 10. manifests read only image files
def test_a_manifest_opens_only_image_files(small, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    rows = [[str(p), "NORMAL", p.stem, "k"] for p in sorted(small["normal"].iterdir())]
    rows += [[str(p), "COVID-19", p.stem, "c"] for p in sorted((small["cohen"] / "images").iterdir())]
    rows += [["../../../../etc/shadow", "NORMAL", "x", "k"], ["/proc/self/environ", "NORMAL", "y", "k"],
             [str(secret), "NORMAL", "z", "k"]]
    man = tmp_path / "sub" / "m.csv"
    man.parent.mkdir()
    with open(man, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "source"], *rows])
    r = runner.invoke(app, EX + ["--data", str(man)])
    assert r.exit_code == 0, r.output
    assert "3 non-image files not opened" in r.stderr and "12 manifest paths outside its folder" in r.stderr
    out = runner.invoke(app, ["info", last(r)]).stdout
    assert "not opened (not an image file name, not a regular file, or over --max-file-mb): 3" in out
    assert "environ" in out


# 11. leftovers and locks
def test_leftovers_are_cleaned_and_the_lock_file_stays(small, tmp_path):
    c, runs = tmp_path / "c", tmp_path / "runs"
    (c / "inception_v3-none-deadbeef.h5.shards").mkdir(parents=True)  # shards of a cache never finished
    stale = runs / ".inception_v3-20200101-000000.tmp"
    stale.mkdir(parents=True)
    import socket

    (stale / ".covfeat-owner").write_text(f"{socket.gethostname()} 999999")  # a writer that no longer exists
    elsewhere = runs / ".inception_v3-20200101-000001.tmp"
    elsewhere.mkdir()
    (elsewhere / ".covfeat-owner").write_text("another-host 999999")  # maybe alive on its own host
    mine = runs / ".not-covfeat.tmp"
    mine.mkdir()
    r = runner.invoke(app, ["clean", "--cache-dir", str(c), "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    assert not (c / "inception_v3-none-deadbeef.h5.shards").exists() and not stale.exists() and mine.exists()
    assert elsewhere.exists()
    r = runner.invoke(app, EX + ["--data", str(small["cohen"]), "--data", str(small["normal"]), "--cache-dir", str(c)])
    assert list(c.glob("*.h5.lock"))  # the lock file is never deleted


# 12. a quiet start
def test_no_tensorflow_start_up_lines(cache, tmp_path):
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "fit-head", "--cache", str(cache), "--epochs", "1",
                        "--runs-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "oneDNN" not in r.stderr and "absl" not in r.stderr and "cpu_feature_guard" not in r.stderr
    assert r.stderr.splitlines()[0].startswith("Cache: ")


def test_a_file_that_cannot_be_read_now_stops_the_run_instead_of_a_lasting_skip(small, tmp_path, monkeypatch):
    """Listed, then gone (an unmounted share, a permission change): not a bad image. The run
    stops with one line and no shard records it as skipped; a rerun with the file back works."""
    import covfeat.extraction.plan as ex

    d = make_mini(tmp_path / "d", n_covid=4, n_normal=4)
    victim = sorted(d["normal"].iterdir())[-1]
    kept = victim.read_bytes()
    real = ex.load_sources

    def listed_then_gone(*a, **k):
        m = real(*a, **k)
        victim.unlink()
        return m

    monkeypatch.setattr(ex, "load_sources", listed_then_gone)
    args = EX + ["--data", str(d["cohen"]), "--data", str(d["normal"]), "--cache-dir", str(tmp_path / "c")]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    assert err(r) == (f"error: {victim}: cannot be read now (No such file or directory); nothing was recorded for it. "
                      "Make it readable (or remove it from the data) and run again: finished shards are kept.")
    assert not list((tmp_path / "c").glob("*.h5"))
    monkeypatch.setattr(ex, "load_sources", real)
    victim.write_bytes(kept)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "skipped at extraction: 0" in runner.invoke(app, ["info", last(r)]).stdout
