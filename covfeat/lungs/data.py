"""Image/mask pairs for training a lungs model: found by file stem, decoded as extraction
decodes, and every mask checked before any training.

A mask is accepted when it is binary (anti-aliased or JPEG-noisy edges allowed: public mask
sets are often resized, and openist's masks carry grey pixels along the contour), the size
of its image, not empty and not the whole image.  Every problem of every file is found
first and reported in one line naming the files, so a user fixes them all in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covfeat.core.errors import DataError, SourceNotFound
from covfeat.imaging.decode import IMAGE_SUFFIXES, UnreadableImage, decode

GREY = (0.25, 0.75)  # a mask pixel between these shares of the mask's top value is neither lung nor background

EDGE_PX = 2  # grey pixels within this distance of the mask's contour are anti-aliasing, not doubt

MAX_GREY = 0.001  # share of a mask's pixels that may be grey away from the contour (openist: at most 3 in 100,000)

SHOWN = 5  # files named in one error line


@dataclass(frozen=True)
class Pair:
    stem: str
    image: Path
    mask: Path


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not hidden), sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def listing(paths, shown: int = SHOWN) -> str:
    names = [str(p) for p in paths]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def match(images: str | Path, masks: str | Path) -> list[Pair]:
    """Pairs of an image and its mask, by file stem (``x.jpg`` and ``x.png``), sorted by stem.

    Raises
    ------
    SourceNotFound
        A folder does not exist.
    DataError
        No images; an image without a mask or a mask without an image; two files of one stem
        in one folder.  One line naming the files.
    """
    found = {}
    for what, folder in (("images", Path(images)), ("masks", Path(masks))):
        if not folder.is_dir():
            raise SourceNotFound(f"--{what} {folder}: no such folder.")
        by_stem: dict[str, list[Path]] = {}
        for p in image_files(folder):
            by_stem.setdefault(p.stem, []).append(p)
        twice = [p for ps in by_stem.values() if len(ps) > 1 for p in ps]
        if twice:
            raise DataError(f"--{what} {folder}: files share a stem, so which one is meant is unclear: {listing(twice)}; "
                            "keep one file per stem.")
        found[what] = {s: ps[0] for s, ps in by_stem.items()}
    imgs, msks = found["images"], found["masks"]
    if not imgs:
        raise DataError(f"--images {images}: no image files (searched for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    lone_images = [imgs[s] for s in sorted(set(imgs) - set(msks))]
    lone_masks = [msks[s] for s in sorted(set(msks) - set(imgs))]
    if lone_images or lone_masks:
        parts = []
        if lone_images:
            parts.append(f"{len(lone_images)} image(s) without a mask in {masks}: {listing(lone_images)}")
        if lone_masks:
            parts.append(f"{len(lone_masks)} mask(s) without an image in {images}: {listing(lone_masks)}")
        raise DataError("; ".join(parts) + ". Every image needs a mask of the same file stem, and every mask an image.")
    return [Pair(s, imgs[s], msks[s]) for s in sorted(imgs)]


def mask_problem(mask: np.ndarray, image_shape: tuple[int, int]) -> str | None:
    """Why a decoded mask (H, W, 3) float32 in [0, 255] cannot be used with an image of
    ``image_shape`` (H, W); None when it can."""
    h, w = mask.shape[:2]
    if (h, w) != tuple(image_shape):
        return f"is {w} x {h}, its image {image_shape[1]} x {image_shape[0]}"
    if mask.ndim == 3 and np.ptp(mask, axis=2).max() > 0:
        return "has colour (channels differ), a mask is one grey level per pixel"
    g = mask[..., 0] if mask.ndim == 3 else mask
    top = float(g.max())
    if top <= 0:
        return "is empty (no lung pixel)"
    fg = (g > top / 2).astype(np.uint8)
    if fg.all():
        return "covers the whole image"
    grey = (g > top * GREY[0]) & (g < top * GREY[1])
    if grey.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * EDGE_PX + 1, 2 * EDGE_PX + 1))
        far = int((grey & (cv2.dilate(fg, k) == cv2.erode(fg, k))).sum())
        if far > MAX_GREY * g.size:
            return (f"is not binary: {far} pixels ({far / g.size:.1%}) are grey away from the contour (an image or a "
                    "probability map?)")
    return None


def binary(mask: np.ndarray) -> np.ndarray:
    """A checked mask as bool (H, W): above half its top value."""
    g = mask[..., 0] if mask.ndim == 3 else mask
    return g > float(g.max()) / 2


def read_pairs(pairs: list[Pair], convert=None) -> list:
    """Decode every image and mask (as extraction decodes) and check every mask; returns
    ``convert(image, mask)`` of each pair (default: the pair itself), the image (H, W, 3)
    float32 RGB in [0, 255] and the mask bool (H, W).  ``convert`` lets a caller keep only
    what it needs of each image (a data set of 4,000-pixel radiographs does not fit in memory
    at full size).

    Raises
    ------
    DataError
        One line naming every unreadable file and every unusable mask (the first few, and
        how many more), after all were read.
    """
    convert = convert or (lambda img, mask: (img, mask))
    out, problems = [], []
    for p in pairs:
        try:
            img = decode(p.image)
        except UnreadableImage as exc:
            problems.append(f"{p.image}: {exc}")
            continue
        try:
            m = decode(p.mask)
        except UnreadableImage as exc:
            problems.append(f"{p.mask}: {exc}")
            continue
        why = mask_problem(m, img.shape[:2])
        if why:
            problems.append(f"{p.mask} {why}")
            continue
        if not problems:  # after the first problem only the check goes on: nothing will be trained
            out.append(convert(img, binary(m)))
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{len(problems)} of {len(pairs)} image/mask pairs cannot be used: "
                        + "; ".join(problems[:SHOWN]) + more + ". A mask is a binary image of its image's size.")
    return out


def load_pairs(pairs: list[Pair]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The images and masks of ``pairs``, at full size (see :func:`read_pairs`)."""
    both = read_pairs(pairs)
    return [img for img, _ in both], [m for _, m in both]
