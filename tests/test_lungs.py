"""The lung segmenter: its masks fit the lungs of images it never saw, a lungs folder is
checked before it is trusted, every training mask is checked before any training, and the
post-processing keeps two lungs without holes.

The default tests use ``tiny_lungs`` (conftest.py: trained in seconds on synthetic images);
the slow one trains on openist and holds the issue's target, a held-out Dice of 0.93."""

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from covfeat.core.errors import ConfigError, DataError
from covfeat.imaging.decode import decode
from covfeat.lungs.data import load_pairs, mask_problem, match
from covfeat.lungs.model import INFO, WEIGHTS, LungsModel, model_input
from covfeat.lungs.segment import Segmenter, load_segmenter, postprocess

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"


def _heldout(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    info = json.loads((folder / INFO).read_text())
    stems = [d["stem"] for d in info["training"]["data"] if d["part"] == "held out"]
    pairs = [p for p in match(info["training"]["images"], info["training"]["masks"]) if p.stem in stems]
    images, masks = load_pairs(pairs)
    return images, masks, stems


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --------------------------------------------------------------------------- the tiny model


def test_tiny_model_segments_held_out_images(tiny_lungs):
    """The fixture's masks, predicted on its held-out images at their own size, overlap the
    true lungs (Dice >= 0.9), and lungs.json records the same Dice the segmenter gives."""
    model = LungsModel.load(tiny_lungs)
    images, masks, stems = _heldout(tiny_lungs)
    assert len(stems) >= 3
    predicted = Segmenter(model).masks(images)
    dice = [_dice(p, m) for p, m in zip(predicted, masks)]
    assert min(dice) >= 0.9, dice
    recorded = model.info["heldout"]
    assert recorded["images"] == len(stems)
    assert recorded["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert recorded["dice"]["worst"]["value"] == pytest.approx(min(dice), abs=1e-6)
    assert 0 < recorded["iou"]["mean"] <= recorded["dice"]["mean"]


def test_lungs_folder_holds_settings_hashes_and_no_data(tiny_lungs):
    assert sorted(p.name for p in tiny_lungs.iterdir()) == [INFO, WEIGHTS]
    info = LungsModel.load(tiny_lungs).info
    assert info["settings"]["size"] == 64
    assert {"covfeat", "keras", "tensorflow"} <= set(info["versions"])
    data = info["training"]["data"]
    assert len(data) == 24 and all(len(d["image_sha256"]) == 64 and len(d["mask_sha256"]) == 64 for d in data)
    assert {d["part"] for d in data} == {"train", "validation", "held out"}
    assert info["training"]["seconds"]["wall"] > 0


def test_masks_are_at_each_images_own_size_and_thread_safe(tiny_lungs):
    seg = load_segmenter(tiny_lungs)
    assert load_segmenter(str(tiny_lungs)) is seg  # one per process per folder
    assert seg.hash == LungsModel.load(tiny_lungs).hash and len(seg.hash) == 64
    images, _, _ = _heldout(tiny_lungs)
    sized = [cv2.resize(images[0], (90, 70)), cv2.resize(images[1], (50, 120)), images[2]]
    want = seg.masks(sized)
    assert [m.shape for m in want] == [(70, 90), (120, 50), images[2].shape[:2]]
    assert all(m.dtype == bool for m in want)
    got = [None] * 8

    def work(k):
        got[k] = seg.masks(sized)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        assert all(np.array_equal(a, b) for a, b in zip(g, want))
    assert np.array_equal(seg.mask(sized[0]), want[0])


def test_model_input_is_grey_in_unit_range_at_size():
    img = np.random.default_rng(0).uniform(0, 255, (37, 53, 3)).astype(np.float32)
    x = model_input(img, 32)
    assert x.shape == (32, 32) and x.dtype == np.float32 and x.min() == 0 and x.max() == 1
    assert np.array_equal(model_input(np.zeros((10, 10, 3), np.float32), 16), np.zeros((16, 16), np.float32))


# --------------------------------------------------------------------------- a folder checked before it is trusted


@pytest.fixture
def copy_of(tiny_lungs, tmp_path):
    dst = tmp_path / "lungs"
    shutil.copytree(tiny_lungs, dst)
    return dst


def test_damaged_weights_are_refused_in_one_line(copy_of):
    data = bytearray((copy_of / WEIGHTS).read_bytes())
    data[-100] ^= 1
    (copy_of / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"damaged lungs model: the SHA-256 of weights\.npz .* is not the one "
                                          r"lungs\.json records") as exc:
        LungsModel.load(copy_of)
    assert "\n" not in str(exc.value)


def test_weights_of_another_architecture_are_refused(copy_of):
    info = json.loads((copy_of / INFO).read_text())
    info["settings"]["filters"] = 4
    (copy_of / INFO).write_text(json.dumps(info))
    model = LungsModel.load(copy_of)  # the hash matches: the mismatch shows when the network is built
    with pytest.raises(ConfigError, match="does not fit the architecture"):
        model.probabilities(np.zeros((1, 64, 64), np.float32))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / INFO).unlink(), r"not a lungs model \(no lungs\.json in it\); make one with `covfeat lungs fit"),
    (lambda d: (d / INFO).write_text("{"), r"not a lungs model \(lungs\.json cannot be read"),
    (lambda d: (d / INFO).write_text('{"kind": "other"}'), "not a covfeat lungs file"),
    (lambda d: (d / WEIGHTS).unlink(), r"damaged lungs model \(weights\.npz cannot be read"),
])
def test_not_a_lungs_folder_is_one_line(copy_of, damage, message):
    damage(copy_of)
    with pytest.raises(ConfigError, match=message):
        LungsModel.load(copy_of)


# --------------------------------------------------------------------------- post-processing


def test_postprocess_keeps_the_two_largest_components_and_fills_their_holes():
    p = np.zeros((40, 60), np.float32)
    p[5:35, 5:25] = 0.9  # left lung, with a hole
    p[15:20, 10:15] = 0.1
    p[5:30, 35:55] = 0.8  # right lung, touching nothing
    p[0:3, 57:60] = 0.95  # a speck in the corner
    p[38:40, 0:2] = 0.7  # another speck, on the border
    m = postprocess(p)
    assert m[17, 12] and m[20, 45] and m[10, 10]
    assert not m[1, 58] and not m[39, 0]
    assert m.sum() == 30 * 20 + 25 * 20
    assert not postprocess(np.zeros((8, 8))).any()
    one = np.zeros((8, 8))
    one[2:6, 2:6] = 1
    assert postprocess(one).sum() == 16


# --------------------------------------------------------------------------- training data checked first


def _pairs(tmp_path, n=3, size=(40, 50)):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for k in range(n):
        cv2.imwrite(str(images / f"a{k}.jpg"), np.full(size, 100, np.uint8))
        m = np.zeros(size, np.uint8)
        m[10:30, 10:40] = 255
        cv2.imwrite(str(masks / f"a{k}.png"), m)
    return images, masks


def test_pairs_are_matched_by_stem_and_lone_files_named(tmp_path):
    images, masks = _pairs(tmp_path)
    assert [p.stem for p in match(images, masks)] == ["a0", "a1", "a2"]
    (images / "b.png").write_bytes((images / "a0.jpg").read_bytes())
    (masks / "a1.png").rename(masks / "c.png")
    with pytest.raises(DataError, match=rf"^2 image\(s\) without a mask in {masks}: {images}/a1.jpg, {images}/b.png; "
                                        rf"1 mask\(s\) without an image in {images}: {masks}/c.png\. Every image needs a "
                                        "mask of the same file stem"):
        match(images, masks)


def _mask_file(path, array):
    cv2.imwrite(str(path), array)
    return decode(path)


def _grey_patch(m):
    m = m.copy()
    m[1:5, 1:5] = 100  # below half: background, but grey, far from the lungs
    return m


@pytest.mark.parametrize("make, why", [
    (lambda m: m[:39], r"is 50 x 39, its image 50 x 40"),
    (lambda m: np.zeros_like(m), r"is empty \(no lung pixel\)"),
    (lambda m: np.full_like(m, 255), "covers the whole image"),
    (lambda m: np.tile(np.linspace(0, 255, m.shape[1]), (m.shape[0], 1)).astype(np.uint8),  # an image, not a mask
     r"is not binary: \d+ pixels \(\d+\.\d%\) are grey away from the contour \(an image or a probability map\?\)"),
    (lambda m: cv2.GaussianBlur(m, (0, 0), 6), "is not binary: .* grey away from the contour"),
    (lambda m: np.dstack([m, m, m * 0]), "has colour"),
    (lambda m: _grey_patch(m), r"is not binary: 16 pixels \(0\.8%\) are grey away from the contour"),
])
def test_an_unusable_mask_is_named_with_its_reason(tmp_path, make, why):
    images, masks = _pairs(tmp_path)
    bad = make(cv2.imread(str(masks / "a1.png"), cv2.IMREAD_UNCHANGED))
    cv2.imwrite(str(masks / "a1.png"), bad)
    with pytest.raises(DataError, match=rf"^1 of 3 image/mask pairs cannot be used: {masks}/a1.png {why}"):
        load_pairs(match(images, masks))


def test_soft_edges_and_zero_one_masks_are_binary(tmp_path):
    m = np.zeros((40, 50), np.uint8)
    m[10:30, 10:40] = 255
    soft = cv2.GaussianBlur(m, (0, 0), 0.8)  # an anti-aliased (resized) contour
    assert mask_problem(_mask_file(tmp_path / "soft.png", soft), (40, 50)) is None
    assert mask_problem(_mask_file(tmp_path / "one.png", m // 255), (40, 50)) is None


def test_a_re_cropped_copy_stays_on_the_side_of_its_original():
    """openist holds re-cropped copies of one radiograph: the split keeps them together, or a
    copy in the held-out share would be scored on an image the network trained on."""
    from covfeat.lungs.fit import near_duplicate_groups, split

    paths = sorted((Path(__file__).resolve().parents[1] / "covfeat" / "data" / "sample" / "kermany" / "NORMAL").iterdir())
    images = [decode(p) for p in paths[:8]]
    h, w = images[0].shape[:2]
    images.append(np.ascontiguousarray(images[0][int(0.06 * h):, int(0.04 * w):w - int(0.03 * w)]))
    stems = [p.stem for p in paths[:8]] + ["copy"]
    groups, pairs = near_duplicate_groups(images, stems)
    assert [(i, j) for i, j, *_ in pairs] == [(0, 8)]
    assert len(set(groups)) == 8 and groups[0] == groups[8]
    for seed in range(20):
        part = split(groups, 0.3, 0.2, seed)
        assert part[0] == part[8] and set(part) == {0, 1, 2}, (seed, part)
    with pytest.raises(DataError, match="in 2 near-duplicate group"):
        split(np.array(["a", "a", "b"]), 0.3, 0.2, 0)


def test_augmentation_keeps_image_and_mask_aligned():
    """An image that is its own mask (two grey levels) stays its mask's picture after the
    geometric changes; brightness, contrast and gamma are monotone and cannot undo that."""
    from synthetic_lungs import draw

    from covfeat.lungs.fit import augment

    _, lungs = draw(np.random.default_rng(0), 64)
    y = lungs.astype(np.float32)
    x = 0.3 + 0.4 * y
    xa, ya = augment(np.stack([x] * 6), np.stack([y] * 6), np.random.default_rng(2))
    assert xa.min() >= 0 and xa.max() <= 1
    assert not np.array_equal(ya[0], y) and not np.allclose(xa[0], x)
    for a, m in zip(xa, ya):
        assert np.corrcoef(a.ravel(), m.ravel())[0, 1] > 0.97


# --------------------------------------------------------------------------- the target, on real masks


@pytest.mark.slow
def test_openist_held_out_dice_is_at_least_093(tmp_path):
    """The issue's quality target, as a new user runs it: `covfeat lungs fit` with its defaults
    on openist gives a held-out Dice of at least 0.93.  Its time target (under 15 minutes on
    2 cores) is benchmarks/bench_lungs.py's: a speed target is never a timed test."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "covfeat.cli", "lungs", "fit", "--images", SHARED / "openist" / "NORMAL",
                        "--masks", SHARED / "openist" / "masks", "--out", tmp_path / "lungs"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = LungsModel.load(tmp_path / "lungs").info
    assert info["heldout"]["images"] >= 50
    assert info["heldout"]["dice"]["mean"] >= 0.93, info["heldout"]["dice"]


# --------------------------------------------------------------------------- the command line


def _cli(*args):
    from typer.testing import CliRunner

    import covfeat.cli as cli

    return CliRunner().invoke(cli.app, ["lungs", *map(str, args)], env={"COLUMNS": "200"})


def test_predict_writes_masks_a_table_and_a_contact_sheet_and_names_unreadable_files(tiny_lungs, tmp_path):
    info = json.loads((tiny_lungs / INFO).read_text())
    src = Path(info["training"]["images"])
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(src.iterdir())[:3]:
        shutil.copy(p, folder / p.name)
    big = cv2.resize(cv2.imread(str(sorted(src.iterdir())[0])), (150, 130))  # another size: its mask has it too
    cv2.imwrite(str(folder / "big.jpg"), big)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    r = _cli("predict", "--model", tiny_lungs, folder, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert f"skipped {folder}/empty.png: zero-byte file" in lines
    assert any(ln.startswith(f"skipped {folder}/text.jpg: ") for ln in lines)
    assert lines[-1] == f"4 mask(s) in {tmp_path / 'out'}, 2 file(s) skipped; contact sheet: {tmp_path / 'out'}/contact_sheet.png"
    m = cv2.imread(str(tmp_path / "out" / "big.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (130, 150) and set(np.unique(m)) == {0, 255}
    assert np.array_equal(m > 0, load_segmenter(tiny_lungs).mask(decode(folder / "big.jpg")))
    rows = (tmp_path / "out" / "masks.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0] == "image,mask,height,width,lung_share,skipped"
    sheet = cv2.imread(str(tmp_path / "out" / "contact_sheet.png"))
    assert sheet.shape == (2 * 192, 2 * 192, 3)
    assert (np.all(sheet == (0, 255, 0), axis=2)).sum() > 50  # the contours are drawn


def test_fit_from_the_command_line_reports_held_out_scores(tmp_path):
    from synthetic_lungs import write_set

    d = write_set(tmp_path / "data", n_per_class=5, seed=3, size=64)
    r = _cli("fit", "--images", d["covid"], "--masks", d["masks"], "--out", tmp_path / "lungs", "--size", 64,
             "--filters", 4, "--depth", 2, "--epochs", 2, "--batch-size", 2)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: 5 mask(s) without an image in {d['covid']}: {d['masks']}/n000.png, ")
    for p in d["normal"].iterdir():
        shutil.move(p, d["covid"] / p.name)
    r = _cli("fit", "--images", d["covid"], "--masks", d["masks"], "--out", tmp_path / "lungs", "--size", 64,
             "--filters", 4, "--depth", 2, "--epochs", 2, "--batch-size", 2, "--no-augment")
    assert r.exit_code == 0, r.output
    assert "image/mask pairs" in r.stdout and "epoch 2:" in r.stdout
    assert any(ln.startswith("held-out Dice on 2 images: mean ") for ln in r.stdout.splitlines())
    assert r.stdout.splitlines()[-1] == f"lungs model: {tmp_path / 'lungs'}"
    assert LungsModel.load(tmp_path / "lungs").info["training"]["config"]["augment"] is False
    r = _cli("fit", "--images", d["covid"], "--masks", d["masks"], "--size", 60)
    assert r.exit_code == 1 and r.stderr == "error: lungs settings: size 60 must be a multiple of 2^depth = 16 and at least 64.\n"
