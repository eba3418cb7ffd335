"""How a lung mask changes an image: the one definition extraction (``--lungs MODEL --outside``)
and the audit's occlusion probes share, so "only the lungs kept" means the same pixels in both.

* :func:`blank_outside` -- everything outside the lungs filled (the lungs kept);
* :func:`blank_lungs` -- the lung fields filled (what lies outside them kept);
* :func:`crop` -- the lungs' bounding box, widened by a margin;
* :func:`lung_share_covered` -- the share of lung pixels a blanking covers.

A fill is the mean of the pixels that are KEPT, never of the whole image.  Issue 17 said
"the image's mean" for ``--outside blank``; but the whole image's mean carries what lies
outside the lungs (a burnt-in label, a bright border, the exposure of one hospital's
scanner) into every filled pixel, so the source could still be read from the fill.  Filling
with the mean of the lung pixels themselves adds nothing the lungs do not already show.
"""

from __future__ import annotations

import numpy as np


def _checked(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"a lung mask must be boolean, got {mask.dtype}")
    if mask.shape != img.shape[:2]:
        raise ValueError(f"a lung mask of shape {mask.shape} does not fit an image of shape {img.shape}")
    return mask


def _fill(img: np.ndarray, blank: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``img`` with the pixels of ``blank`` set to the mean (per channel) of those of ``keep``."""
    out = np.array(img, copy=True)
    if not blank.any():
        return out
    if not keep.any():
        raise ValueError("nothing would be kept: the mask leaves no pixel to take a fill from")
    out[blank] = img[keep].mean(axis=0, dtype=np.float64).astype(out.dtype)
    return out


def blank_outside(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The lungs kept: every pixel outside ``mask`` filled with the mean of the lung pixels
    (per channel), so nothing outside the lungs leaks through the fill.

    Parameters
    ----------
    img
        (H, W) or (H, W, C) image.
    mask
        bool (H, W), True on the lungs; it must hold at least one pixel.

    Raises
    ------
    ValueError
        An empty mask (there is nothing to keep), or a mask of another size.
    """
    mask = _checked(img, mask)
    return _fill(img, ~mask, mask)


def blank_lungs(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The lung fields blanked: every pixel of ``mask`` filled with the mean of the pixels
    outside it (per channel), so nothing of the lungs leaks through the fill.

    Raises
    ------
    ValueError
        A mask that covers the whole image (nothing outside to keep), or of another size.
    """
    mask = _checked(img, mask)
    return _fill(img, mask, ~mask)


def lung_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the bounding box of ``mask``'s pixels, widened on each side by
    ``margin`` of the image's side (height for rows, width for columns), within the image.

    Raises
    ------
    ValueError
        An empty mask, or a margin outside [0, 1].
    """
    if not 0 <= margin <= 1:
        raise ValueError(f"crop margin: expected a fraction in [0, 1], got {margin!r}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise ValueError("an empty lung mask has no bounding box")
    h, w = mask.shape
    dy, dx = int(round(margin * h)), int(round(margin * w))
    return max(0, rows[0] - dy), min(h, rows[-1] + 1 + dy), max(0, cols[0] - dx), min(w, cols[-1] + 1 + dx)


def crop(img: np.ndarray, mask: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """The lungs' bounding box, widened by ``margin`` of the image's side on each side (so the
    costophrenic angles and the apices are not cut at the mask's edge); pixels are not changed.
    The box is not square: resizing it to the model's input stretches it, as resizing the
    whole radiograph does."""
    mask = _checked(img, mask)
    y0, y1, x0, x1 = lung_box(mask, margin)
    return np.array(img[y0:y1, x0:x1], copy=True)


def lung_share_covered(lungs: np.ndarray, blanked: np.ndarray) -> float:
    """The share of the lung pixels (``lungs``) that a blanking (``blanked``, bool, same shape)
    covers: 1 when every lung pixel was blanked; nan for an image with no lung pixel.  The
    share of the other pixels it covers is ``lung_share_covered(~lungs, blanked)``."""
    lungs, blanked = np.asarray(lungs, bool), np.asarray(blanked, bool)
    if lungs.shape != blanked.shape:
        raise ValueError(f"masks of shapes {lungs.shape} and {blanked.shape} do not match")
    n = int(lungs.sum())
    return float((lungs & blanked).sum() / n) if n else float("nan")
