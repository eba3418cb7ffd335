"""How a radiograph file becomes a model input: decoding, the lung fields, resizing, occlusion,
jitter, scaling.

:class:`InputPipeline` is the one definition of "file -> model input" that extraction,
prediction, Grad-CAM and export all use; it is built from an extraction config.

Decoding itself, and the limits a file must meet first, are :mod:`covfeat.imaging.decode`'s;
finding the lung fields is :mod:`covfeat.lungs`'s, and what a mask does to an image is
:mod:`covfeat.lungs.apply`'s.

The jitter follows Keras's ImageDataGenerator (rotation, shift, zoom, nearest fill) but
with explicit parameters drawn from a seeded generator keyed on the image's content hash,
so every view is reproducible and its parameters can be stored beside its features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from covfeat.extraction.backbones import Scaling, get_backbone
from covfeat.extraction.config import ExtractConfig, JitterConfig, LungsConfig, OcclusionConfig, lungs_folders
from covfeat.imaging.decode import SCALED_DECODE_MIN_SIDE, ImageLimits, UnreadableImage, decode, load, read_file, resize
from covfeat.lungs.apply import blank_lungs, blank_outside, crop
from covfeat.lungs.segment import Segmenter, load_segmenter


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


def lung_mask(img: np.ndarray, segmenter: Segmenter) -> np.ndarray:
    """The lung fields ``segmenter`` finds in ``img``; an image where it finds none is unreadable
    for a lungs extraction or probe (a per-file skip with this reason), never taken whole."""
    mask = segmenter.mask(img)
    if not mask.any():
        raise UnreadableImage(f"the lungs model {segmenter.model.folder} finds no lung field in it")
    return mask


def occlude(img: np.ndarray, path: str | Path, occ: OcclusionConfig, segmenter: Segmenter | None = None) -> np.ndarray:
    """Blank the lung field: a central box, the mask named like the image (both with the constant
    ``occ.fill``), or the lung fields a lungs model predicts in ``img`` (kind ``lungs``: the
    fields blanked; ``outside``: everything but them; filled as :mod:`covfeat.lungs.apply` says).
    ``segmenter`` is the pipeline's, resolved once; without it the model's folder is loaded
    (once per process)."""
    if occ.kind == "none":
        return img
    if occ.kind in ("lungs", "outside"):
        mask = lung_mask(img, segmenter if segmenter is not None else load_segmenter(occ.model))
        return blank_lungs(img, mask) if occ.kind == "lungs" else blank_outside(img, mask)
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


def box_mask(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """The pixels :func:`occlude` blanks for a central box, as a bool (H, W) mask."""
    h, w = shape
    x0, y0, x1, y1 = box
    out = np.zeros((h, w), bool)
    out[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = True
    return out


@dataclass(frozen=True)
class InputPipeline:
    """File -> 224 x 224 RGB in [0, 255] (decoded, restricted to the lungs with --lungs, resized,
    occluded) -> scaled model input.

    Built from an extraction config, so extraction, ``predict``, ``explain`` and ``export``
    cannot drift apart: a model fed other pixels than it was trained on tends to call
    every image one class.  ``segmenters`` holds the lungs models the config uses, by folder,
    loaded once (their hashes are the ones in the cache key: :attr:`lungs_hashes`).
    """

    scaling: Scaling
    scaled_decode: bool = True
    occlusion: OcclusionConfig = OcclusionConfig()
    limits: ImageLimits = ImageLimits()
    lungs: LungsConfig = LungsConfig()
    segmenters: dict = field(default_factory=dict)

    @classmethod
    def for_config(cls, cfg: ExtractConfig, backbone=None) -> "InputPipeline":
        """The pipeline of ``cfg``; ``backbone`` is its registry entry when the caller has
        resolved it already (extraction's plan does), else it is looked up here.  Its lungs
        models are loaded here (one-line ConfigError for a folder that is not a sound one)."""
        limits = ImageLimits(cfg.max_pixels, cfg.max_file_mb, cfg.min_side, cfg.max_aspect)
        backbone = backbone if backbone is not None else get_backbone(cfg.backbone)
        segmenters = {folder: load_segmenter(folder) for folder in lungs_folders(cfg)}
        return cls(backbone.scaling_for(cfg.preprocess), cfg.scaled_decode, cfg.occlusion, limits, cfg.lungs,
                   segmenters)

    @property
    def lungs_hashes(self) -> dict[str, str]:
        """Folder -> hash of every lungs model the pipeline uses: what the cache key holds of them."""
        return {folder: seg.hash for folder, seg in self.segmenters.items()}

    @property
    def min_side(self) -> int | None:
        return SCALED_DECODE_MIN_SIDE if self.scaled_decode else None

    def decode(self, path: str | Path, occluded: bool = True) -> np.ndarray:
        """224 x 224 RGB in [0, 255], the input of an exported model (and of the jitter):
        restricted to the lung fields in a lungs run, occluded unless ``occluded`` is False.

        The file is read once; its size and its image's dimensions are checked against the
        limits before anything decodes it."""
        return self.prepare(path, occluded)[1]

    def prepare(self, path: str | Path, occluded: bool = True,
                sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(whole, model): the image as decoded and resized to 224, and what the model sees of it
        (:meth:`decode`).  The whole image is what near-duplicates are found on, so a lungs
        cache pairs exactly the images a full-image cache of the same files pairs, and its
        patient groups (hence its splits) are the same.

        The file is read once, and everything is decoded from those bytes; given ``sha256``
        (an extraction's, hashed when the file was listed) they must hash to it, or
        :class:`covfeat.core.errors.FileChanged` stops the caller: features are stored under
        that hash, so they must be of those very bytes, on whichever node decodes them.

        With lungs, the bytes are decoded a second time at the image's own size (libjpeg's
        scaled size when scaled decoding is on), segmented there, restricted, and only then
        resized: a crop taken at 224 would throw away most of the lungs' resolution.  Decoding
        twice keeps the whole image bit for bit the one a full-image cache fingerprints."""
        data = read_file(path, self.limits, sha256)
        whole = load(path, min_side=self.min_side, limits=self.limits, data=data)
        img = whole if self.lungs.model is None else self.restrict(path, data)
        return whole, (self.occlude(img, path) if occluded else img)

    def restrict(self, path: str | Path, data: bytes | None = None) -> np.ndarray:
        """The file (or its bytes ``data``, already read) restricted to its lung fields as
        --outside says, resized to 224."""
        native = decode(path, min_side=self.min_side, limits=self.limits, data=data)
        mask = lung_mask(native, self.segmenters[self.lungs.model])
        return resize(blank_outside(native, mask) if self.lungs.outside == "blank" else crop(native, mask))

    def occlude(self, img: np.ndarray, path: str | Path) -> np.ndarray:
        """:func:`occlude` with this pipeline's occlusion and its own segmenter."""
        return occlude(img, path, self.occlusion, self.segmenters.get(self.occlusion.model))

    def scale(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.scaling.apply(img, out=out)

    def __call__(self, path: str | Path) -> np.ndarray:
        """The scaled model input of one file (view 0)."""
        return self.scale(self.decode(path))
