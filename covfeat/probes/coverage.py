"""How much of the lungs an occlusion probe blanks: the run's test images segmented by a lungs
model (``audit --lungs``), and for each occlusion the share of lung pixels and of other pixels
it covers, as a mean and a range over those images.

A central box is not the lung field (on openist's masks a median 6% of lung pixels lie
outside the default box), so "the signal lies outside what was blanked" says something about
the lungs only as far as the blanking covered them; these shares say how far.
"""

from __future__ import annotations

import math

import numpy as np

from covfeat.extraction.config import OcclusionConfig
from covfeat.extraction.images import InputPipeline, box_mask
from covfeat.imaging.decode import UnreadableImage
from covfeat.lungs.apply import lung_share_covered
from covfeat.lungs.segment import load_segmenter
from covfeat.probes.common import config_from

BATCH = 16  # images segmented at once

_masks: dict[tuple[str, str], tuple[list[np.ndarray], int]] = {}  # (run, lungs folder) -> masks, images without lungs


def lung_masks_of_test_images(run, fc, lungs: str) -> tuple[list[np.ndarray], int]:
    """The lung masks of the run's test images, as the model sees them (decoded, and restricted
    when the run itself is a lungs run, as its extraction did; never occluded), found by the
    lungs model in ``lungs``; and how many readable images had none.  Kept for the process:
    the audit's three occlusion probes share them."""
    key = (str(run.path), str(lungs))
    if key not in _masks:
        pipeline = InputPipeline.for_config(config_from(fc))
        seg = load_segmenter(lungs)
        images = []
        for path in fc.manifest["path"][run.predictions()["row"]]:
            try:
                images.append(pipeline.decode(path, occluded=False))
            except UnreadableImage:
                continue  # the run scored it, so it was readable then; a file changed since says nothing here
        masks = [m for s in range(0, len(images), BATCH) for m in seg.masks(images[s:s + BATCH])]
        _masks[key] = ([m for m in masks if m.any()], sum(1 for m in masks if not m.any()))
    return _masks[key]


def blanked_mask(lungs: np.ndarray, occlusion: OcclusionConfig) -> np.ndarray | None:
    """The pixels ``occlusion`` blanks in an image whose lung fields are ``lungs`` (its kinds
    lungs and outside blank exactly the model's lung fields or the rest, as
    :func:`covfeat.extraction.images.occlude` does); None for masks from files."""
    if occlusion.kind == "box":
        return box_mask(lungs.shape, occlusion.box)
    if occlusion.kind == "lungs":
        return lungs
    if occlusion.kind == "outside":
        return ~lungs
    return None


def coverage(run, fc, lungs: str | None, occlusion: OcclusionConfig) -> dict | None:
    """Mean, minimum and maximum over the run's test images of the share of lung pixels
    (``lungs``) and of other pixels (``other``) that ``occlusion`` blanks; None without a lungs
    model, or for masks from files."""
    if lungs is None or occlusion.kind not in ("box", "lungs", "outside"):
        return None
    masks, none = lung_masks_of_test_images(run, fc, lungs)
    shares = {"lungs": [], "other": []}
    for m in masks:
        blanked = blanked_mask(m, occlusion)
        shares["lungs"].append(lung_share_covered(m, blanked))
        shares["other"].append(lung_share_covered(~m, blanked))

    def summary(v):
        v = [x for x in v if not math.isnan(x)]
        return ({"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} if v else
                {"mean": math.nan, "min": math.nan, "max": math.nan})

    return {"model": str(lungs), "lungs": summary(shares["lungs"]), "other": summary(shares["other"]),
            "n_images": len(masks), "n_without_lungs": none}
