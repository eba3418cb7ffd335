"""Near-duplicates: the same radiograph re-encoded, resized, cropped, padded, flipped, rotated or
contrast-enhanced is found, a different one is not, the search is not all-pairs, and fit-head
keeps every pair on one side of every split and fold."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE, SHARED
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.imaging.decode import load
from covfeat.store.reader import open_cache
from covfeat.trust import neardup
from covfeat.trust.neardup import FINGERPRINT_HASHES, FINGERPRINT_THUMB_SHAPE, find_pairs, fingerprint, join_groups
from covfeat.trust.neardup_index import near_codes, plan_chunks

runner = CliRunner()
COHEN = sorted((SAMPLE / "cohen" / "images").glob("*.jp*g"))
KERMANY = sorted((SAMPLE / "kermany" / "NORMAL").iterdir())


def _variants(src: Path, out: Path) -> list[Path]:
    """The same radiograph re-encoded as JPEG q70, resized to 60%, and cropped 4% per side."""
    img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
    h, w = img.shape
    files = {"reencoded.jpg": img, "resized.png": cv2.resize(img, (int(w * 0.6), int(h * 0.6)), interpolation=cv2.INTER_AREA),
             "cropped.png": img[int(h * 0.04):int(h * 0.96), int(w * 0.04):int(w * 0.96)]}
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in files.items():
        p = out / name
        cv2.imwrite(str(p), arr, [cv2.IMWRITE_JPEG_QUALITY, 70])
        paths.append(p)
    return paths


def _fp(paths):
    fps = [fingerprint(load(p, min_side=448)) for p in paths]
    return np.stack([f[0] for f in fps]), np.stack([f[1] for f in fps])


def test_copies_are_found_and_different_radiographs_are_not(tmp_path):
    copies = _variants(COHEN[0], tmp_path / "v")
    paths = [COHEN[0], *copies] + COHEN[1:8] + KERMANY[:12]
    pairs = find_pairs(*_fp(paths))
    found = {(i, j) for i, j, *_ in pairs}
    assert {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)} <= found  # the original and its three copies
    assert all(i < 4 and j < 4 for i, j in found), [(paths[i].name, paths[j].name) for i, j in found]


def test_cross_set_pairs_and_union_find(tmp_path):
    """Copies (re-encoded, resized, cropped: other bytes, other fingerprints) of two radiographs
    searched among five originals find exactly their own original; a set is never matched
    against itself here, where any fingerprint would find its own row."""
    h, t = _fp(KERMANY[:5])
    queries = _variants(KERMANY[1], tmp_path / "a")[1:2] + _variants(KERMANY[3], tmp_path / "b")[2:3]
    pairs = find_pairs(*_fp(queries), h, t)
    assert [(i, j) for i, j, *_ in pairs] == [(0, 1), (1, 3)]
    groups = join_groups(np.array(["a", "b", "c", "d", "e"]), [(0, 3), (3, 4)])
    assert list(groups) == ["a", "b", "c", "a", "a"]
    flat = np.zeros((2, *FINGERPRINT_THUMB_SHAPE), np.uint8)  # blank thumbnails (no fingerprint) never match
    assert find_pairs(np.zeros((2, FINGERPRINT_HASHES), np.uint64), flat) == []


def _republished(img: np.ndarray, kind: str) -> np.ndarray:
    """A uint8 grey radiograph as another publication might show it (on the file's own pixels)."""
    h, w = img.shape
    if kind == "clahe":
        return cv2.createCLAHE(3.0, (8, 8)).apply(img)
    if kind == "gamma":
        return np.clip(255 * (img / 255.0) ** 1.8, 0, 255).astype(np.uint8)
    if kind == "window":
        lo, hi = np.percentile(img, [5, 95])
        return np.clip((img - lo) * 255.0 / (hi - lo), 0, 255).astype(np.uint8)
    if kind == "crop":  # 9% off the left
        return img[:, int(0.09 * w):]
    if kind == "pad":  # 5% white on every side
        py, px = int(0.05 * h), int(0.05 * w)
        return cv2.copyMakeBorder(img, py, py, px, px, cv2.BORDER_CONSTANT, value=255)
    if kind == "flip":
        return np.ascontiguousarray(img[:, ::-1])
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 4.5, 1.0)  # rotate
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)


KINDS = ("clahe", "gamma", "window", "crop", "pad", "flip", "rotate")


@pytest.fixture(scope="module")
def republished(tmp_path_factory):
    """Four sample radiographs, each republished every way, and eight other radiographs."""
    out = tmp_path_factory.mktemp("republished")
    originals = [COHEN[1], COHEN[4], KERMANY[0], KERMANY[3]]
    copies = {}
    for k, src in enumerate(originals):
        img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        for kind in KINDS:
            p = out / f"{k}-{kind}.jpg"
            cv2.imwrite(str(p), _republished(img, kind), [cv2.IMWRITE_JPEG_QUALITY, 90])
            copies[(k, kind)] = p
    others = COHEN[7:11] + KERMANY[5:9]
    return originals, copies, others


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_republished_copy_is_found(republished, kind):
    originals, copies, others = republished
    h, t = _fp(originals + others)
    hv, tv = _fp([copies[(k, kind)] for k in range(len(originals))])
    found = {(i, j) for i, j, *_ in find_pairs(hv, tv, h, t)}
    assert found == {(k, k) for k in range(len(originals))}, (kind, found)


def test_different_radiographs_of_one_patient_are_not_paired():
    """Several sample patients have two radiographs (patient 164 on day 1 and day 2, patient 97
    on admission and day 1) that look alike at a glance; every sample image is its own."""
    paths = COHEN + KERMANY
    assert find_pairs(*_fp(paths)) == []


def test_the_search_compares_far_fewer_codes_than_all_pairs():
    """Multi-index hashing: hundreds of times fewer codes compared than all pairs, and a work
    per query that grows far slower than the index, because the chunks widen as it grows.
    Random codes and a fixed seed: the counts are exact, not timed."""
    rng = np.random.default_rng(0)
    compared = {}
    for n in (10_000, 100_000):
        codes = rng.integers(0, 2**63, (n, FINGERPRINT_HASHES), dtype=np.int64).astype(np.uint64) << np.uint64(1)
        codes |= rng.integers(0, 2, (n, FINGERPRINT_HASHES)).astype(np.uint64)
        codes[7, 3] = codes[n - 1, 0] ^ np.uint64(0b1011011)  # one planted near code: 5 bits
        rows, compared[n] = near_codes(codes[:, 0], codes, neardup.MAX_BITS, skip_self=True)
        assert (n - 1, 7, 3, 5) in [tuple(r) for r in rows]  # (random codes meet by chance too, rarely)
        assert compared[n] < n * n * FINGERPRINT_HASHES / 500  # all pairs compare n^2 codes per view
    # The work per query: as the index grows 1000-fold the chunks widen and it grows < 100-fold.
    per_query = [plan_chunks(n, neardup.MAX_BITS)[2] for n in (10**5, 10**8)]
    assert per_query[1] < 100 * per_query[0], per_query


def test_pairs_stay_together_with_a_validation_share(tmp_path):
    """The split keeps a near-duplicate pair on one side when validation takes a share too."""
    man = _duplicated_manifest(tmp_path)
    r = runner.invoke(app, ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0", "--data", str(man)])
    assert r.exit_code == 0, r.output
    cache = r.stdout.strip().splitlines()[-1]
    (i, j, *_), = open_cache(cache).near_duplicate_pairs()
    for seed in range(4):
        r = runner.invoke(app, ["fit-head", "--cache", cache, "--epochs", "1", "--test", "0.3", "--val", "0.3",
                                "--split-seed", str(seed), "--runs-dir", "runs"])
        assert r.exit_code == 0, r.output
        split = np.load(Path(r.stdout.strip().splitlines()[-1]) / "split.npy")
        assert split[i] == split[j], seed


def _duplicated_manifest(tmp_path) -> Path:
    """Six COVID-19 and twelve NORMAL radiographs, one COVID-19 image published again
    (re-encoded, under another patient ID)."""
    rows = [[str(p), "COVID-19", f"c{i}", "cohen"] for i, p in enumerate(COHEN[:6])]
    rows += [[str(p), "NORMAL", f"n{i}", "kermany"] for i, p in enumerate(KERMANY[:12])]
    copy = tmp_path / "republished.jpg"
    cv2.imwrite(str(copy), cv2.imread(str(COHEN[0])), [cv2.IMWRITE_JPEG_QUALITY, 75])
    rows.append([str(copy), "COVID-19", "another-id", "cohen"])
    man = tmp_path / "manifest.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        w.writerows(rows)
    return man


def test_extract_reports_the_pair_and_fit_head_keeps_it_together(tmp_path):
    man = _duplicated_manifest(tmp_path)
    r = runner.invoke(app, ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0", "--data", str(man)])
    assert r.exit_code == 0, r.output
    assert "Near-duplicates: 1 pair(s) of images, 1 of them under two patient IDs" in r.stderr
    assert f"{COHEN[0].name} (cohen:c0) ~ republished.jpg (cohen:another-id): " in r.stderr
    cache = r.stdout.strip().splitlines()[-1]
    fc = open_cache(cache)
    (i, j, bits, corr), = fc.near_duplicate_pairs()
    assert bits <= neardup.MAX_BITS and corr >= neardup.MIN_CORR
    together = apart = 0
    for seed in range(8):
        for mode in ("group", "ignore"):
            r = runner.invoke(app, ["fit-head", "--cache", cache, "--epochs", "1", "--test", "0.4", "--val", "0",
                                    "--split-seed", str(seed), "--near-duplicates", mode, "--runs-dir", "runs"])
            assert r.exit_code == 0, r.output
            split = np.load(Path(r.stdout.strip().splitlines()[-1]) / "split.npy")
            if mode == "group":
                assert split[i] == split[j], seed
                together += 1
            else:
                apart += split[i] != split[j]
    assert apart > 0  # without grouping, some split separates the copies: the test can fail
    m = json.loads((Path(r.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    assert m["near_duplicates"]["n_pairs"] == 1 and m["near_duplicates"]["mode"] == "ignore"


def test_cross_validation_keeps_pairs_in_one_fold(tmp_path):
    man = _duplicated_manifest(tmp_path)
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.run import extract
    from covfeat.head.config import FitConfig, HeadConfig, SplitConfig
    from covfeat.head.fit import fit_head
    from covfeat.head.runs import Run

    cache = extract([man], ExtractConfig(backbone="inception_v3", weights="none", augment=0), "c", progress=False)
    (i, j, *_), = open_cache(cache).near_duplicate_pairs()
    cv = Run(fit_head(cache, FitConfig(head=HeadConfig(epochs=1), split=SplitConfig(val=0), folds=3), "runs",
                      progress=False))
    for fold in cv.folds():
        s = fold.split()
        assert s[i] == s[j]


@pytest.mark.slow
def test_cohens_patients_97_and_178_are_joined_on_the_real_data(tmp_path):
    paths = sorted((SHARED / "cohen" / "images").glob("*ards*")) + sorted((SHARED / "cohen" / "images").glob("16660_*"))
    pairs = find_pairs(*_fp(paths))
    names = {(paths[i].name, paths[j].name) for i, j, *_ in pairs}
    for k, day in enumerate(("admission", "day-1", "day-2", "day-3"), start=2):
        assert any(f"syndrome-ards-{day}" in a and b == f"16660_{k}_1.jpg" or
                   f"syndrome-ards-{day}" in b and a == f"16660_{k}_1.jpg" for a, b in names), day


def test_copies_of_one_radiograph_under_both_labels_are_a_conflict(tmp_path):
    """A COVID-19 radiograph filed again, mirrored and re-encoded, in the NORMAL folder: not the
    same bytes, so only the near-duplicate search sees it. The extraction stops naming both
    files (its shards are kept); with --on-conflict skip the index is written, `info` lists
    the pair, and fit-head leaves both copies out of every split."""
    from conftest import make_mini

    d = make_mini(tmp_path / "d", n_covid=6, n_normal=6)
    covid = sorted((d["cohen"] / "images").iterdir())[0]
    img = cv2.imread(str(covid), cv2.IMREAD_COLOR)
    copy = d["normal"] / "IM-9999-0001.jpeg"
    cv2.imwrite(str(copy), cv2.flip(img, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])
    args = ["extract", "-b", "inception_v3", "--weights", "none", "--augment", "0", "--data", str(d["cohen"]),
            "--data", str(d["normal"]), "--cache-dir", str(tmp_path / "c")]
    r = runner.invoke(app, args)
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: 1 radiograph(s) appear as near-duplicates under both labels: ")
    assert f"{covid} (COVID-19)" in err and f"{copy} (NORMAL)" in err
    assert err.endswith("Fix the labels, or pass --on-conflict skip to leave every copy out of every split (the "
                        "extracted shards are kept).")
    assert not list((tmp_path / "c").glob("*.h5")) and list((tmp_path / "c").glob("*.shards/shard-*.h5"))
    r = runner.invoke(app, args + ["--on-conflict", "skip"])
    assert r.exit_code == 0, r.output
    cache = Path(r.stdout.strip().splitlines()[-1])
    fc = open_cache(cache)
    rows = {str(p): k for k, p in enumerate(fc.manifest["path"])}
    assert fc.near_duplicate_conflicts() == [sorted([rows[str(covid)], rows[str(copy)]])]
    info = runner.invoke(app, ["info", str(cache)]).stdout
    assert "near-duplicates under both labels (left out of every split): 1" in info
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--epochs", "1", "--val", "0", "--test", "0.3",
                            "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    split = np.load(Path(r.stdout.strip().splitlines()[-1]) / "split.npy")
    assert split[rows[str(covid)]] == -1 and split[rows[str(copy)]] == -1
    assert (split[[k for k in range(len(split)) if k not in (rows[str(covid)], rows[str(copy)])]] >= 0).all()
