"""How a radiograph file becomes a model input: decoding, resizing, occlusion, jitter, scaling.

:class:`InputPipeline` is the one definition of "file -> model input" that extraction,
prediction, Grad-CAM and export all use; it is built from an extraction config.

Decoding itself, and the limits a file must meet first, are :mod:`covfeat.imaging.decode`'s.

The jitter follows Keras's ImageDataGenerator (rotation, shift, zoom, nearest fill) but
with explicit parameters drawn from a seeded generator keyed on the image's content hash,
so every view is reproducible and its parameters can be stored beside its features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covfeat.extraction.backbones import Scaling, get_backbone
from covfeat.extraction.config import ExtractConfig, JitterConfig, OcclusionConfig
from covfeat.imaging.decode import SCALED_DECODE_MIN_SIDE, ImageLimits, UnreadableImage, load


def view_params(sha256: str, view: int, seed: int, jitter: JitterConfig) -> np.ndarray:
    """Parameters (angle, tx, ty, zoom) of augmented view ``view`` (>= 1) of one image.

    Keyed on the file's content hash, not its position, so adding images to a data set
    does not change the views of the others.
    """
    rng = np.random.default_rng([seed, int(sha256[:16], 16), view])
    return np.array(
        [
            rng.uniform(-jitter.rotation, jitter.rotation),
            rng.uniform(-jitter.shift, jitter.shift),
            rng.uniform(-jitter.shift, jitter.shift),
            rng.uniform(1 - jitter.zoom, 1 + jitter.zoom),
        ],
        dtype=np.float32,
    )


def apply_view(img: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Rotate, zoom and shift a square image about its centre; edges filled by nearest."""
    angle, tx, ty, zoom = (float(v) for v in params)
    h, w = img.shape[:2]
    mat = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, zoom)
    mat[0, 2] += tx * w
    mat[1, 2] += ty * h
    return cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def occlude(img: np.ndarray, path: str | Path, occ: OcclusionConfig) -> np.ndarray:
    """Blank the lung field (a central box, or the mask named like the image) with a constant."""
    if occ.kind == "none":
        return img
    out = img.copy()
    h, w = img.shape[:2]
    if occ.kind == "box":
        x0, y0, x1, y1 = occ.box
        out[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = occ.fill
        return out
    stem = Path(path).stem
    cands = sorted(Path(occ.masks).glob(stem + ".*"))
    if not cands:
        raise UnreadableImage(f"no lung mask named {stem}.* in {occ.masks}")
    mask = cv2.imread(str(cands[0]), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise UnreadableImage(f"unreadable lung mask {cands[0].name}")
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST) > 0
    out[mask] = occ.fill
    return out


@dataclass(frozen=True)
class InputPipeline:
    """File -> 224 x 224 RGB in [0, 255] (decoded, resized, occluded) -> scaled model input.

    Built from an extraction config, so extraction, ``predict``, ``explain`` and ``export``
    cannot drift apart: a model fed other pixels than it was trained on tends to call
    every image one class.
    """

    scaling: Scaling
    scaled_decode: bool = True
    occlusion: OcclusionConfig = OcclusionConfig()
    limits: ImageLimits = ImageLimits()

    @classmethod
    def for_config(cls, cfg: ExtractConfig, backbone=None) -> "InputPipeline":
        """The pipeline of ``cfg``; ``backbone`` is its registry entry when the caller has
        resolved it already (extraction's plan does), else it is looked up here."""
        limits = ImageLimits(cfg.max_pixels, cfg.max_file_mb, cfg.min_side, cfg.max_aspect)
        backbone = backbone if backbone is not None else get_backbone(cfg.backbone)
        return cls(backbone.scaling_for(cfg.preprocess), cfg.scaled_decode, cfg.occlusion, limits)

    @property
    def min_side(self) -> int | None:
        return SCALED_DECODE_MIN_SIDE if self.scaled_decode else None

    def decode(self, path: str | Path, occluded: bool = True) -> np.ndarray:
        """224 x 224 RGB in [0, 255], the input of an exported model (and of the jitter).

        The file's size and its header's dimensions are checked against the limits first."""
        self.limits.check_file(Path(path))
        img = load(path, min_side=self.min_side, limits=self.limits)
        return occlude(img, path, self.occlusion) if occluded else img

    def scale(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.scaling.apply(img, out=out)

    def __call__(self, path: str | Path) -> np.ndarray:
        """The scaled model input of one file (view 0)."""
        return self.scale(self.decode(path))
