"""Synthetic radiographs with known lung masks, for tests whose answer is known in advance.

Each image is a dark background, a brighter torso and two darker lung fields (ellipses whose
place and size vary a little), with noise.  Its mask is exactly the two ellipses.  The class
can be written where the test wants it:

- ``where="outside"``: a COVID-19 image carries a bright square in an upper corner, outside
  the lungs; inside the lungs the two classes are drawn from one distribution.
- ``where="inside"``: a COVID-19 image carries bright opacities inside the lung fields only;
  outside the lungs the two classes are drawn from one distribution.
- ``where=None``: no class signal at all (for the segmenter's own tests).

``write_set`` writes class folders (``ROOT/COVID-19``, ``ROOT/NORMAL``, the "class folders"
layout extraction reads) and ``ROOT/masks`` with one PNG mask per image, named like it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def draw(rng: np.random.Generator, size: int = 256, covid: bool = False, where: str | None = None):
    """One image (uint8, size x size) and its lung mask (bool, same size)."""
    s = size / 256.0
    img = np.full((size, size), 25.0, np.float32)
    cv2.ellipse(img, (size // 2, int(150 * s)), (int(115 * s), int(125 * s)), 0, 0, 360, 150.0, -1)
    mask = np.zeros((size, size), np.uint8)
    for side in (-1, 1):
        cx = size // 2 + side * int(rng.uniform(42, 52) * s)
        cy = int(rng.uniform(128, 140) * s)
        ax = (int(rng.uniform(28, 36) * s), int(rng.uniform(62, 76) * s))
        angle = side * rng.uniform(2, 10)
        cv2.ellipse(mask, (cx, cy), ax, angle, 0, 360, 1, -1)
    lungs = mask.astype(bool)
    img[lungs] = 60.0
    if covid and where == "inside":
        blobs = np.zeros_like(img)
        ys, xs = np.nonzero(lungs)
        for _ in range(6):
            k = rng.integers(len(ys))
            cv2.circle(blobs, (int(xs[k]), int(ys[k])), int(rng.uniform(8, 16) * s), 70.0, -1)
        img += cv2.GaussianBlur(blobs, (0, 0), 4 * s) * lungs
    if covid and where == "outside":
        side = int(rng.integers(2))
        x0 = int(rng.uniform(8, 24) * s) if side == 0 else size - int(rng.uniform(32, 48) * s)
        y0 = int(rng.uniform(8, 24) * s)
        marker = np.zeros((size, size), bool)
        marker[y0:y0 + int(24 * s), x0:x0 + int(24 * s)] = True
        img[marker & ~lungs] = 240.0
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def write_set(root: Path, n_per_class: int = 12, where: str | None = None, seed: int = 0, size: int = 256) -> dict:
    """Write ``n_per_class`` COVID-19 and NORMAL images and every image's mask under ``root``;
    returns the folders."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = {"covid": root / "COVID-19", "normal": root / "NORMAL", "masks": root / "masks"}
    for d in out.values():
        d.mkdir(parents=True, exist_ok=True)
    for label, folder in ((True, out["covid"]), (False, out["normal"])):
        for i in range(n_per_class):
            img, lungs = draw(rng, size, covid=label, where=where)
            stem = f"{'c' if label else 'n'}{i:03d}"
            cv2.imwrite(str(folder / f"{stem}.png"), img)
            cv2.imwrite(str(out["masks"] / f"{stem}.png"), lungs.astype(np.uint8) * 255)
    return out
