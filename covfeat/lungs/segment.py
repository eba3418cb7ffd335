"""From a lungs model's probabilities to a lung mask at the image's own size.

The network sees a small square; its probabilities are resized (bilinear) to the image's own
height and width before the threshold, so the contour is as smooth as the probabilities
and the mask fits the image extraction decodes.  Post-processing keeps the two largest
connected components (the two lungs; a speck of false positive in the abdomen or the
shoulder goes) and fills their holes (a lung field is one region: an opacity the network
was unsure about does not punch a hole in it), as lungmask and torchxrayvision users
expect.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from covfeat.lungs.model import LungsModel, model_input


def postprocess(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(H, W) probabilities -> bool (H, W) mask: above ``threshold``, the two largest connected
    components (8-connected), holes filled.  An image with no pixel above the threshold
    gives an empty mask (the caller decides what no lungs means)."""
    fg = (np.asarray(prob) > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.zeros(fg.shape, bool)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")[:2] + 1
    kept = np.isin(labels, order).astype(np.uint8)
    return fill_holes(kept)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Every background region not connected to the image's border becomes foreground."""
    h, w = mask.shape
    outside = np.ones((h + 2, w + 2), np.uint8)  # background, with a frame of background around it
    outside[1:-1, 1:-1] = mask == 0
    # flood the background from the frame: what it cannot reach is a hole
    cv2.floodFill(outside, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
    return outside[1:-1, 1:-1] != 2


class Segmenter:
    """A lungs model applied to decoded images.  Thread-safe: extraction calls it from its
    decoding threads (the model serves one batch at a time; conversion and post-processing
    run in the callers' threads)."""

    def __init__(self, model: LungsModel):
        self.model = model

    @property
    def hash(self) -> str:
        return self.model.hash

    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded images, each (H, W, 3) float32 RGB in [0, 255] -> bool lung masks, each at
        its own image's (H, W)."""
        if not len(images):
            return []
        size = self.model.size
        prob = self.model.probabilities(np.stack([model_input(img, size) for img in images]))
        return [postprocess(at_size(p, img.shape[:2]), self.model.threshold) for p, img in zip(prob, images)]

    def mask(self, img: np.ndarray) -> np.ndarray:
        return self.masks([img])[0]


def at_size(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities (size, size) -> (H, W), bilinear."""
    h, w = shape
    return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)


_cache: dict[Path, Segmenter] = {}
_cache_lock = threading.Lock()


def load_segmenter(folder: str | Path) -> Segmenter:
    """The process's one segmenter for a lungs folder: loaded and checked once, then shared
    (its network is built once, on first use).

    Raises
    ------
    ConfigError
        Not a lungs folder, or damaged.
    """
    key = Path(folder).resolve()
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Segmenter(LungsModel.load(key))
        return _cache[key]
