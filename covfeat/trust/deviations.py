"""Where covfeat differs from the paper, in one list, and which differences apply to a given run.

The README prints :data:`DEVIATIONS` whole (a test keeps them in step); ``report``
names the ones that apply to each run, so a reader of a result sees exactly how it was
not made the paper's way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Deviation:
    key: str
    text: str
    applies: Callable[[dict], bool]  # run config (config.json) -> does it apply?


def _ex(c: dict) -> dict:
    return c.get("extract", {})


DEVIATIONS = [
    Deviation("split", "Split: 60% train, 10% validation, 30% test by default; the paper split 70/30 and its "
              "'validation' curves are its test set. covfeat picks thresholds and draws curves on a separate "
              "validation share.", lambda c: c.get("split", {}).get("val", 0.1) > 0),
    Deviation("grouping", "Grouping: the split and the folds keep each patient on one side (the paper split by "
              "image, which leaks patients between train and test); `--split-by image` restores the paper's way.",
              lambda c: c.get("split", {}).get("by", "patient") == "patient"),
    Deviation("near-duplicates", "Near-duplicates: radiographs published twice (re-encoded, resized, lightly "
              "re-cropped, under another patient ID) are kept on one side of every split; the paper did not look "
              "for them. `--near-duplicates ignore` turns this off.",
              lambda c: c.get("split", {}).get("near_duplicates", "group") == "group"),
    Deviation("smote", "SMOTE runs in feature space, on the training rows' original feature maps; the paper "
              "generated new images. Its rows never reach validation or test.",
              lambda c: c.get("head", {}).get("balance", "smote") == "smote"),
    Deviation("jitter", "Jitter: K jittered views per image are extracted once and one is drawn per row every "
              "epoch; Keras's ImageDataGenerator drew a new random jitter every epoch. The ranges (rotation "
              "15 degrees, shift 0.1, zoom 0.1) are covfeat's: the paper gives none. Zoom is one isotropic scale, "
              "where ImageDataGenerator zooms x and y independently.", lambda c: _ex(c).get("augment", 4) > 0),
    Deviation("evaluation-view", "Validation and test rows are scored on their original (unjittered) image only.",
              lambda c: True),
    Deviation("resize", "Resizing: OpenCV's area interpolation when shrinking (the paper's cv2.resize default is "
              "bilinear); 16-bit images are stretched from their own range, not truncated.", lambda c: True),
    Deviation("scaled-decode", "Large JPEGs are decoded at 1/2 to 1/8 scale by libjpeg (keeping at least 448 px) "
              "before the same resize to 224; `--full-decode` decodes them whole.",
              lambda c: _ex(c).get("scaled_decode", True)),
    Deviation("loss", "Loss: binary cross-entropy of the softmax probabilities. Early tf.keras 2 computed this "
              "for a softmax output; later tf.keras 2 and Keras 3 apply sigmoid cross-entropy to the softmax's "
              "logits instead. The paper does not say which version it ran, so its loss may have been either.",
              lambda c: True),
    Deviation("weights", "Weights: with `--weights none` the backbone is randomly initialised (NOT PRETRAINED); "
              "such numbers say nothing about ImageNet transfer.",
              lambda c: not _ex(c).get("weights", {}).get("pretrained", True)),
    Deviation("preprocess", "Scaling: `--preprocess backbone` feeds each backbone its own preprocess_input "
              "instead of the paper's RGB / 255.", lambda c: _ex(c).get("preprocess", "paper") == "backbone"),
    Deviation("threshold", "Operating point: the threshold was chosen on validation rows for a target COVID-19 "
              "recall; the paper used argmax.", lambda c: c.get("target_recall") is not None),
]


def applying(run_config: dict) -> list[Deviation]:
    """The deviations that apply to a run, from its config.json."""
    return [d for d in DEVIATIONS if d.applies(run_config)]
