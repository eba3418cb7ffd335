"""Lungs in extraction (issue 17): how a mask changes an image, the --lungs/--outside settings,
the cache key (the lungs model's hash, never its folder), resume, and the run's own pixels in
predict."""

import numpy as np
import pytest

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
