"""Decoding real file kinds: colour layouts, 16-bit range, DICOM, and every bad-input kind."""

import cv2
import numpy as np
import pytest

from covfeat.extraction.config import JitterConfig
from covfeat.extraction.images import apply_view, view_params
from covfeat.imaging.decode import UnreadableImage, decode, resize


def _grad(h=60, w=80):
    return np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))


def test_grey_rgb_rgba_become_same_rgb(tmp_path):
    g = (_grad() * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), g)
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(g, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(g, cv2.COLOR_GRAY2BGRA))
    outs = [decode(tmp_path / n) for n in ("g.png", "c.png", "a.png")]
    for o in outs:
        assert o.shape == (60, 80, 3) and o.dtype == np.float32
        np.testing.assert_array_equal(o, outs[0])
    assert outs[0].max() == 255


def test_bgr_is_swapped_to_rgb(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 200  # blue in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "b.png"), img)
    out = decode(tmp_path / "b.png")
    assert out[0, 0, 2] == 200 and out[0, 0, 0] == 0


def test_16bit_uses_its_real_range(tmp_path):
    img = (_grad() * 4095).astype(np.uint16)  # 12-bit data in a 16-bit file
    cv2.imwrite(str(tmp_path / "d.png"), img)
    out = decode(tmp_path / "d.png")
    assert out.max() == pytest.approx(255) and out.min() == 0
    assert len(np.unique(out[0, :, 0])) > 60  # not truncated to a few levels


def test_dicom_monochrome1_is_inverted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    def write(name, photometric):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds = FileDataset(str(tmp_path / name), {}, file_meta=meta, preamble=b"\0" * 128)
        arr = (_grad(16, 16) * 1000).astype(np.uint16)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = arr.tobytes()
        ds.save_as(str(tmp_path / name), enforce_file_format=True)
        return decode(tmp_path / name)

    m2, m1 = write("a.dcm", "MONOCHROME2"), write("b.dcm", "MONOCHROME1")
    assert m2[0, 0, 0] == 0 and m2[0, -1, 0] == pytest.approx(255)
    np.testing.assert_allclose(m1, 255 - m2, atol=1e-3)


def _real_jpeg(tmp_path):
    from conftest import SAMPLE

    return next((SAMPLE / "kermany" / "NORMAL").iterdir()).read_bytes()


@pytest.mark.parametrize("kind,reason", [
    ("zero", "zero-byte file"),
    ("truncated_jpeg", "truncated JPEG"),
    ("truncated_png", "not a decodable image"),
    ("text", "not a decodable image"),
    ("garbage_jpeg_header", "truncated JPEG"),
])
def test_bad_files_raise_with_reason(tmp_path, kind, reason):
    if kind == "zero":
        data = b""
    elif kind == "truncated_jpeg":
        data = _real_jpeg(tmp_path)
        data = data[: len(data) // 2]
    elif kind == "truncated_png":
        ok, buf = cv2.imencode(".png", (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
        data = buf.tobytes()[:200]
    elif kind == "text":
        data = b"patient notes, not an image\n"
    else:
        data = b"\xff\xd8\xff\xe0" + b"\x00garbage" * 10
    p = tmp_path / ("f.png" if "png" in kind else "f.jpg")
    p.write_bytes(data)
    with pytest.raises(UnreadableImage, match=reason):
        decode(p)


def test_views_are_deterministic_and_differ(tmp_path):
    j = JitterConfig()
    a, b = view_params("ab" * 32, 1, 0, j), view_params("ab" * 32, 1, 0, j)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, view_params("ab" * 32, 2, 0, j))
    assert not np.array_equal(a, view_params("ab" * 32, 1, 1, j))
    assert abs(a[0]) <= 15 and abs(a[1]) <= 0.1 and 0.9 <= a[3] <= 1.1
    img = resize(np.random.default_rng(0).random((300, 200, 3)).astype(np.float32) * 255)
    assert img.shape == (224, 224, 3)
    np.testing.assert_allclose(apply_view(img, np.array([0, 0, 0, 1], np.float32)), img, atol=1e-4)
    assert not np.allclose(apply_view(img, a), img)


KERAS_MODULE = {"inception_v3": "inception_v3", "inception_resnet_v2": "inception_resnet_v2",
                "densenet201": "densenet", "resnet101_v2": "resnet_v2"}


@pytest.mark.parametrize("name", list(KERAS_MODULE))
def test_each_backbones_scaling_is_its_keras_preprocess_input_in_numpy_and_as_layers(name):
    """One Scaling serves extraction (numpy) and export (Keras layers); both equal Keras's own."""
    import keras

    from covfeat.extraction.backbones import get_backbone

    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    want = getattr(keras.applications, KERAS_MODULE[name]).preprocess_input(x.copy())
    scaling = get_backbone(name).scaling_for("backbone")
    np.testing.assert_allclose(scaling.apply(x), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scaling.layers()(x)), want, atol=1e-6)
    paper = get_backbone(name).scaling_for("paper")
    np.testing.assert_array_equal(paper.apply(x), np.multiply(x, np.float32(1 / 255)))


def test_lung_masks_blank_exactly_their_pixels_and_a_missing_mask_is_a_reason(tmp_path):
    from covfeat.extraction.config import OcclusionConfig
    from covfeat.extraction.images import occlude

    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((100, 80), np.uint8)
    mask[20:60, 10:30] = 255  # drawn at the original size; resized to the image's
    cv2.imwrite(str(masks / "lungs.png"), mask)
    img = np.full((224, 224, 3), 10.0, np.float32)
    occ = OcclusionConfig(kind="masks", masks=str(masks), fill=200.0)
    out = occlude(img, tmp_path / "lungs.jpg", occ)
    want = cv2.resize(mask, (224, 224), interpolation=cv2.INTER_NEAREST) > 0
    assert (out[want] == 200).all() and (out[~want] == 10).all()
    with pytest.raises(UnreadableImage, match=r"no lung mask named other\.\* in "):
        occlude(img, tmp_path / "other.png", occ)
