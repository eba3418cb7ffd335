"""decode_images (TensorFlow ops, for an export's image_bytes signature) lands within the
measured bound of covfeat's own InputPipeline pixels: on the bundled sample, on synthetic files
of every kind covfeat handles (16-bit, RGBA, grey + alpha, large JPEGs decoded at reduced scale,
upscaled), and, slow, on the shared radiographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from covfeat.imaging.decode import SCALED_DECODE_MIN_SIDE
from covfeat.use import serving_decode as sd
from covfeat.use.serving_decode import DECODING, PIXELS, SAMPLE_BOUND, SHARED_BOUND, by_kind, pixel_gap

SAMPLE = Path(__file__).resolve().parents[1] / "covfeat" / "data" / "sample"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"
SUFFIXES = (".png", ".jpg", ".jpeg")


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and "masks" not in p.parts)


def radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise, in [0, 1]: detail at every scale, as a radiograph has."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(x / (w / 7.0)) * np.cos(y / (h / 5.0)) + 0.1 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    """One small file of each kind covfeat's decode treats apart, written with OpenCV."""
    d = tmp_path_factory.mktemp("kinds")
    g = radiograph(600, 500)
    files = {
        "png16_rgba": (np.dstack([g, g[::-1], g[:, ::-1], np.ones_like(g)]) * 39000 + 1000).astype(np.uint16),
        "png16_grey": (g * 20000 + 3000).astype(np.uint16),
        "png8_rgba": (np.dstack([g, g, g, g[::-1]]) * 255).astype(np.uint8),
        "png8_grey_upscaled": (radiograph(150, 200, 1) * 255).astype(np.uint8),
        "png8_mixed": (radiograph(150, 300, 2) * 255).astype(np.uint8),
    }
    out = {}
    for name, arr in files.items():
        out[name] = d / f"{name}.png"
        cv2.imwrite(str(out[name]), arr)
    big = (radiograph(1800, 2000, 3) * 255).astype(np.uint8)  # shorter side 1800: decoded at 1/4
    out["jpeg_grey_quarter"] = d / "jpeg_grey_quarter.jpg"
    cv2.imwrite(str(out["jpeg_grey_quarter"]), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    col = (np.dstack([radiograph(1000, 900, s) for s in (4, 5, 6)]) * 255).astype(np.uint8)  # 900: at 1/2
    out["jpeg_colour_half"] = d / "jpeg_colour_half.jpg"
    cv2.imwrite(str(out["jpeg_colour_half"]), col, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return out


def test_rule_and_contract_match_covfeat():
    """The reduced-scale rule is covfeat's, and the contracts are JSON for serving.json."""
    assert sd.MIN_SIDE == SCALED_DECODE_MIN_SIDE
    assert json.loads(json.dumps(DECODING))["max_abs_pixel_difference"]["bundled_sample"] == SAMPLE_BOUND
    assert json.loads(json.dumps(PIXELS))["range"] == [0.0, 255.0]
    assert "full size" in sd.decoding_for(False)["jpeg"] and sd.decoding_for(True) == DECODING


def test_full_decode_run(kinds):
    """A --full-decode run's pipeline decodes large JPEGs at full size: so does decode_images."""
    from covfeat.extraction.backbones import get_backbone
    from covfeat.extraction.images import InputPipeline

    pipe = InputPipeline(get_backbone("inception_v3").scaling_for("paper"), scaled_decode=False)
    rows = pixel_gap([kinds["jpeg_grey_quarter"], kinds["jpeg_colour_half"]], pipe)
    assert all("scale" not in r["kind"] and r["max"] <= SAMPLE_BOUND for r in rows), rows


def test_bundled_sample_within_bound():
    rows = pixel_gap(images(SAMPLE))
    assert len(rows) == len(images(SAMPLE)) > 0
    worst = max(rows, key=lambda r: r["max"])
    assert worst["max"] <= SAMPLE_BOUND, worst
    assert np.mean([r["mean"] for r in rows]) < 0.05


def test_every_kind_within_bound(kinds):
    """16-bit stretched by its own range, alpha dropped, reduced-scale JPEGs, upscaled images,
    and one shrinking along one side while growing along the other (OpenCV's INTER_AREA does
    not average then: TensorFlow's area resize lands 68 grey levels away on it)."""
    rows = {Path(r["path"]).stem: r for r in pixel_gap(list(kinds.values()))}
    assert "1/4 scale" in rows["jpeg_grey_quarter"]["kind"] and "1/2 scale" in rows["jpeg_colour_half"]["kind"]
    assert rows["png16_rgba"]["kind"].startswith("png 16-bit 4ch")
    for name, r in rows.items():
        assert r["max"] <= SAMPLE_BOUND, (name, r)
        assert r["mean"] < 0.2, (name, r)  # upscaled: OpenCV's fixed-point bilinear rounds apart (0.13)


def test_batch_of_mixed_sizes_and_kinds(kinds):
    """One call, files of different sizes and kinds: each as decoded alone."""
    import tensorflow as tf

    paths = list(kinds.values())
    batch = sd.decode_images(tf.constant([p.read_bytes() for p in paths])).numpy()
    assert batch.shape == (len(paths), 224, 224, 3) and batch.dtype == np.float32
    for p, img in zip(paths, batch):
        np.testing.assert_array_equal(img, sd.decode_images(tf.constant([p.read_bytes()])).numpy()[0])
    assert batch.min() >= 0 and batch.max() <= 255


NO_COVFEAT = """
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
files = [open(p, 'rb').read() for p in sys.argv[2:]]
out = m.f(tf.constant(files)).numpy()
assert 'covfeat' not in sys.modules, 'covfeat was imported'
np.save(sys.argv[1] + '.npy', out)
"""


@pytest.mark.slow
def test_lives_in_a_savedmodel_without_covfeat(tmp_path, kinds):
    """No py_function and no numpy: a SavedModel of decode_images runs where covfeat is not."""
    import tensorflow as tf

    mod = tf.Module()
    mod.f = tf.function(sd.decode_images, input_signature=[tf.TensorSpec((None,), tf.string)])
    tf.saved_model.save(mod, str(tmp_path / "sm"))
    paths = [str(p) for p in kinds.values()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", NO_COVFEAT, str(tmp_path / "sm"), *paths], check=True, env=env,
                   cwd=tmp_path)
    got = np.load(str(tmp_path / "sm") + ".npy")
    np.testing.assert_array_equal(got, sd.decode_images(tf.constant([Path(p).read_bytes() for p in paths])).numpy())


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/covid-cxr")
def test_shared_radiographs_within_bound():
    """cohen (PNG and JPEG; 8-bit grey, RGB, RGBA; one 16-bit RGBA PNG; large JPEGs at reduced
    scale), kermany and openist: every file within the bound."""
    rows = pixel_gap(images(SHARED))
    kinds = by_kind(rows)
    print(json.dumps(kinds, indent=1))
    assert any(k.startswith("png 16-bit") for k in kinds) and any("scale" in k for k in kinds)
    worst = max(rows, key=lambda r: r["max"])
    assert worst["max"] <= SHARED_BOUND, worst
