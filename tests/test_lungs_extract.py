"""Lungs in extraction (issue 17): how a mask changes an image, the --lungs/--outside settings,
the cache key (the lungs model's hash, never its folder), resume, and the run's own pixels in
predict."""

import json
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest
from synthetic_lungs import write_set
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.core.errors import ConfigError
from covfeat.extraction.config import DriverConfig, ExtractConfig, LungsConfig, OcclusionConfig, key_config
from covfeat.extraction.plan import plan
from covfeat.extraction.run import extract
from covfeat.lungs.apply import blank_lungs, blank_outside, crop, lung_box, lung_share_covered


def _image_and_mask():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (40, 60, 3)).astype(np.float32)
    img[:5, :5] = 250.0  # a bright label in a corner, outside the lungs
    mask = np.zeros((40, 60), bool)
    mask[10:30, 12:25] = True
    mask[10:30, 35:48] = True
    return img, mask


def test_blank_outside_keeps_the_lungs_and_fills_with_their_own_mean():
    img, mask = _image_and_mask()
    out = blank_outside(img, mask)
    assert np.array_equal(out[mask], img[mask])
    want = img[mask].mean(axis=0)
    assert np.allclose(out[~mask], want, atol=1e-4)
    # the fill carries nothing of what lay outside: moving the corner label leaves the image unchanged
    other = img.copy()
    other[:5, :5] = 0.0
    assert np.array_equal(blank_outside(other, mask), out)
    assert out.dtype == img.dtype and out.shape == img.shape and img[0, 0, 0] == 250.0  # input untouched


def test_blank_lungs_keeps_the_outside_and_fills_with_its_mean():
    img, mask = _image_and_mask()
    out = blank_lungs(img, mask)
    assert np.array_equal(out[~mask], img[~mask])
    assert np.allclose(out[mask], img[~mask].mean(axis=0), atol=1e-4)
    other = img.copy()
    other[mask] = 0.0  # whatever the lungs hold, the result is the same
    assert np.array_equal(blank_lungs(other, mask), out)


def test_crop_is_the_lung_box_with_its_margin():
    img, mask = _image_and_mask()
    assert lung_box(mask, 0.0) == (10, 30, 12, 48)
    assert lung_box(mask, 0.05) == (8, 32, 9, 51)  # 2 rows (5% of 40) and 3 columns (5% of 60) more
    assert np.array_equal(crop(img, mask), img[8:32, 9:51])
    edge = np.zeros_like(mask)
    edge[0:3, 55:60] = True
    assert lung_box(edge, 0.1) == (0, 7, 49, 60)  # never beyond the image


def test_lung_share_covered():
    _, mask = _image_and_mask()
    assert lung_share_covered(mask, mask) == 1.0 and lung_share_covered(mask, ~mask) == 0.0
    left = np.zeros_like(mask)
    left[:, :30] = True
    assert lung_share_covered(mask, left) == pytest.approx(0.5)
    assert lung_share_covered(~mask, left) == pytest.approx((1200 - 260) / (2400 - 520))
    assert np.isnan(lung_share_covered(np.zeros_like(mask), left))


@pytest.mark.parametrize("fn", [blank_outside, blank_lungs, crop])
def test_a_mask_that_does_not_fit_is_refused(fn):
    img, mask = _image_and_mask()
    with pytest.raises(ValueError, match="does not fit"):
        fn(img, mask[:-1])
    with pytest.raises(TypeError, match="boolean"):
        fn(img, mask.astype(np.uint8))


def test_nothing_to_fill_from_is_refused():
    img, mask = _image_and_mask()
    with pytest.raises(ValueError, match="nothing would be kept"):
        blank_outside(img, np.zeros_like(mask))
    with pytest.raises(ValueError, match="nothing would be kept"):
        blank_lungs(img, np.ones_like(mask))
    with pytest.raises(ValueError, match="empty lung mask"):
        crop(img, np.zeros_like(mask))


# --------------------------------------------------------------------------- settings and the cache key

runner = CliRunner()
BASE = ExtractConfig(backbone="inception_v3", weights="none", augment=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Class folders of synthetic radiographs (10 per class)."""
    return write_set(tmp_path_factory.mktemp("syn"), 10, where="outside", seed=3)["covid"].parent


def _lungs(model, outside="blank"):
    return replace(BASE, lungs=LungsConfig(model=str(model), outside=outside))


@pytest.mark.parametrize("args, line", [
    (["--outside", "blank"], "error: --outside blank: needs --lungs MODEL, the lungs folder that finds the lung "
                             "fields (covfeat lungs fit)."),
    (["--outside", "crop"], "error: --outside crop: needs --lungs MODEL"),
    (["--lungs", "LUNGS"], "error: --lungs LUNGS: --outside keep leaves every pixel as it is: give --outside blank or "
                           "crop."),
    (["--lungs", "LUNGS", "--outside", "sideways"], "error: --outside: expected one of 'keep', 'blank', 'crop', got "
                                                    "'sideways'."),
])
def test_lungs_settings_that_cannot_work_are_one_line(args, line, tiny_lungs, data):
    args = [a.replace("LUNGS", str(tiny_lungs)) for a in args]
    line = line.replace("LUNGS", str(tiny_lungs))
    r = runner.invoke(app, ["extract", "-b", "inception_v3", "--weights", "none", "--data", str(data), *args])
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.output
    assert r.stderr.startswith(line), r.stderr


def test_a_folder_that_is_no_lungs_model_is_one_line(tmp_path, data):
    (tmp_path / "nolungs").mkdir()
    r = runner.invoke(app, ["extract", "-b", "inception_v3", "--weights", "none", "--data", str(data),
                            "--lungs", str(tmp_path / "nolungs"), "--outside", "crop"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "not a lungs model" in r.stderr and str(tmp_path / "nolungs") in r.stderr


def _other_model(src, dst):
    """A copy of a lungs folder whose weights differ (as after retraining), consistently hashed."""
    import numpy as np

    from covfeat.core.fsutil import sha256_file

    shutil.copytree(src, dst)
    with np.load(dst / "weights.npz") as z:
        arrays = {k: z[k] for k in z.files}
    first = sorted(arrays)[0]
    arrays[first] = arrays[first] * 1.01
    np.savez(dst / "weights.npz", **arrays)
    info = json.loads((dst / "lungs.json").read_text())
    info["weights"]["sha256"] = sha256_file(dst / "weights.npz")
    (dst / "lungs.json").write_text(json.dumps(info))
    return dst


def test_the_key_holds_the_lungs_models_hash_not_its_folder(tiny_lungs, data, tmp_path):
    moved = tmp_path / "elsewhere" / "lungs"
    shutil.copytree(tiny_lungs, moved)
    retrained = _other_model(tiny_lungs, tmp_path / "retrained")
    key = {name: plan([data], cfg, tmp_path / "c").key for name, cfg in (
        ("none", BASE), ("blank", _lungs(tiny_lungs)), ("moved", _lungs(moved)), ("crop", _lungs(tiny_lungs, "crop")),
        ("retrained", _lungs(retrained)))}
    assert key["blank"] == key["moved"]  # moving the folder keeps the key
    assert len({key[k] for k in ("none", "blank", "crop", "retrained")}) == 4  # the model and --outside change it
    # the lungs occlusion too: by hash, never by folder
    occ = {name: plan([data], replace(BASE, occlusion=OcclusionConfig.parse(str(m))), tmp_path / "c").key
           for name, m in (("a", tiny_lungs), ("b", moved), ("c", retrained))}
    assert occ["a"] == occ["b"] != occ["c"] and occ["a"] not in key.values()
    # and the recorded config names the folder beside the hash, for predict and the audit
    p = plan([data], _lungs(moved), tmp_path / "c")
    assert p.config["lungs"]["model"] == {"identity": p.pipeline.lungs_hashes[str(moved)], "folder": str(moved)}
    assert str(moved) not in json.dumps(key_config(_lungs(moved), "none:seed=0", p.pipeline.lungs_hashes))


def test_a_cache_without_lungs_keeps_the_key_it_had_before_lungs():
    """No lungs entry and no model in the occlusion without lungs: every earlier cache keeps its name."""
    out = key_config(replace(BASE, occlusion=OcclusionConfig(kind="box")), "none:seed=0")
    assert "lungs" not in out and set(out["occlusion"]) == {"kind", "box", "masks", "fill"}
    with pytest.raises(ValueError, match="was not resolved to its hash"):
        key_config(_lungs("/some/lungs"), "none:seed=0")


def test_a_lungs_extraction_resumes_to_the_same_cache(tiny_lungs, tmp_path):
    """Half the shards by one process (--shard 0/2), the rest by a plain run, equal to one uninterrupted run."""
    src = write_set(tmp_path / "big", 20, where="outside", seed=4)["covid"].parent  # 40 images, 2 shards
    cfg = _lungs(tiny_lungs)
    assert extract([src], cfg, tmp_path / "a", progress=False, driver=DriverConfig(shard=(0, 2))) is None
    resumed = extract([src], cfg, tmp_path / "a", progress=False)
    clean = extract([src], cfg, tmp_path / "b", progress=False)
    assert resumed.name == clean.name
    with h5py.File(resumed) as ha, h5py.File(clean) as hb:
        for k in ("features", "row", "view", "label", "aug_params"):
            np.testing.assert_array_equal(ha[k][:], hb[k][:])


def test_no_lungs_found_is_a_skip_with_its_reason_and_the_fingerprint_is_the_whole_images(tiny_lungs, data, tmp_path):
    import cv2

    from covfeat.extraction.images import InputPipeline
    from covfeat.imaging.decode import load
    from covfeat.store.reader import open_cache

    blank = tmp_path / "d"
    shutil.copytree(data, blank)
    cv2.imwrite(str(blank / "NORMAL" / "zz_blank.png"), np.zeros((256, 256), np.uint8))
    cache = open_cache(extract([blank], _lungs(tiny_lungs), tmp_path / "c", progress=False))
    assert [(p.rsplit("/", 1)[-1], r) for p, r in cache.skipped] == [
        ("zz_blank.png", f"the lungs model {tiny_lungs} finds no lung field in it")]
    pipe = InputPipeline.for_config(_lungs(tiny_lungs))
    some = next((data / "COVID-19").iterdir())
    whole, model = pipe.prepare(some)
    assert np.array_equal(whole, load(some, min_side=pipe.min_side))  # bit for bit the full-image cache's
    assert not np.array_equal(whole, model)


# --------------------------------------------------------------------------- a lungs run used


@pytest.fixture(scope="module")
def lungs_run(tmp_path_factory, tiny_lungs, data):
    from conftest import fit

    from covfeat.head.fit import fit_head

    root = tmp_path_factory.mktemp("lrun")
    model = root / "lungs"
    shutil.copytree(tiny_lungs, model)
    cache = extract([data], replace(_lungs(model), augment=0), root / "cache", progress=False)
    return fit_head(cache, fit(3), root / "runs", progress=False), model


def test_predict_sees_the_pixels_the_extraction_saw(lungs_run, data):
    from covfeat.extraction.images import InputPipeline
    from covfeat.use.predict import Predictor

    run, model = lungs_run
    pr = Predictor(run)
    some = next((data / "NORMAL").iterdir())
    assert pr.pipeline.lungs.model == str(model)
    want = InputPipeline.for_config(replace(_lungs(model), augment=0)).decode(some)
    assert np.array_equal(pr.pipeline.decode(some), want)


def test_a_lungs_run_refuses_a_lungs_folder_that_is_gone_or_another(lungs_run, data, tmp_path):
    run, model = lungs_run
    aside = model.with_name("aside")
    model.rename(aside)
    try:
        r = runner.invoke(app, ["predict", "--run", str(run), str(next((data / "NORMAL").iterdir()))])
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert f"The run's lungs model folder '{model}' is gone; put it back" in r.stderr
        _other_model(aside, model)
        r = runner.invoke(app, ["predict", "--run", str(run), str(next((data / "NORMAL").iterdir()))])
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert f"The lungs model in {model} is not the run's (its hash differs" in r.stderr
    finally:
        if aside.exists():
            shutil.rmtree(model, ignore_errors=True)
            aside.rename(model)


def test_a_lungs_run_is_not_exported(lungs_run, tmp_path):
    run, _ = lungs_run
    r = runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "m.keras")])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "an exported model would take the whole image, so it is not exported" in r.stderr
    assert not (tmp_path / "m.keras").exists()


def test_occlusion_settings_check_their_model():
    with pytest.raises(ConfigError, match="a lungs model folder exactly with kinds lungs and outside"):
        OcclusionConfig(kind="lungs")
    with pytest.raises(ConfigError, match="a lungs model folder exactly"):
        OcclusionConfig(kind="box", model="/x")
