"""Where covfeat differs from the paper, in one list, and which differences apply to a given run.

The README prints :data:`DEVIATIONS` whole (a test keeps them in step); ``report``
names the ones that apply to each run, so a reader of a result sees exactly how it was
not made the paper's way.  Whether one applies is read from the setting the run recorded
in its config.json, never from a default restated here (a changed default would make this
list describe runs wrongly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from covfeat.core.errors import RunError


def _always(_) -> bool:
    return True


@dataclass(frozen=True)
class Deviation:
    key: str
    text: str
    reads: tuple[str, ...] = ()  # where the deciding setting is in config.json; () for what every run does
    applies: Callable[[Any], bool] = _always  # the recorded setting -> does it apply?
    k_fold: bool = True  # does it apply to a cross-validation (config.json's folds > 0)?


DEVIATIONS = [
    Deviation("split", "Split: 60% train, 10% validation, 30% test by default; the paper split 70/30 and its "
              "'validation' curves are its test set. covfeat picks thresholds and draws curves on a separate "
              "validation share.", ("split", "val"), lambda val: val > 0, k_fold=False),
    Deviation("grouping", "Grouping: the split and the folds keep each patient on one side (the paper split by "
              "image, which leaks patients between train and test); `--split-by image` restores the paper's way.",
              ("split", "by"), lambda by: by == "patient"),
    Deviation("near-duplicates", "Near-duplicates: radiographs published twice (re-encoded, resized, re-cropped, "
              "padded, mirrored, contrast-changed or slightly rotated, under another patient ID) are kept on one "
              "side of every split; the paper did not look for them. `--near-duplicates ignore` turns this off.",
              ("split", "near_duplicates"), lambda nd: nd == "group"),
    Deviation("smote", "SMOTE runs in feature space, on the training rows' original feature maps; the paper "
              "generated new images. Its rows never reach validation or test.",
              ("head", "balance"), lambda balance: balance == "smote"),
    Deviation("jitter", "Jitter: K jittered views per image are extracted once and one is drawn per row every "
              "epoch; Keras's ImageDataGenerator drew a new random jitter every epoch. The ranges (rotation "
              "15 degrees, shift 0.1, zoom 0.1) are covfeat's: the paper gives none. Zoom is one isotropic scale, "
              "where ImageDataGenerator zooms x and y independently.", ("extract", "augment"), lambda k: k > 0),
    Deviation("evaluation-view", "Validation and test rows are scored on their original (unjittered) image only."),
    Deviation("resize", "Resizing: OpenCV's area interpolation when shrinking (the paper's cv2.resize default is "
              "bilinear); 16-bit images are stretched from their own range, not truncated."),
    Deviation("scaled-decode", "Large JPEGs are decoded at 1/2 to 1/8 scale by libjpeg (keeping at least 448 px) "
              "before the same resize to 224; `--full-decode` decodes them whole.",
              ("extract", "scaled_decode"), bool),
    Deviation("loss", "Loss: binary cross-entropy of the softmax probabilities. Early tf.keras 2 computed this "
              "for a softmax output; later tf.keras 2 and Keras 3 apply sigmoid cross-entropy to the softmax's "
              "logits instead. The paper does not say which version it ran, so its loss may have been either."),
    Deviation("weights", "Weights: with `--weights none` the backbone is randomly initialised (NOT PRETRAINED); "
              "such numbers say nothing about ImageNet transfer.",
              ("extract", "weights", "pretrained"), lambda pretrained: not pretrained),
    Deviation("preprocess", "Scaling: `--preprocess backbone` feeds each backbone its own preprocess_input "
              "instead of the paper's RGB / 255.", ("extract", "preprocess"), lambda p: p == "backbone"),
    Deviation("lungs", "Lung fields: with `extract --lungs MODEL --outside blank|crop` the backbone sees only the "
              "lung fields a segmenter trained by the user finds (the rest filled with the lungs' own mean, or "
              "cropped to their box); the paper fed the whole image.",
              ("extract",), lambda extract: bool(extract.get("lungs"))),  # a cache without lungs records none
    Deviation("threshold", "Operating point: the threshold was chosen on validation rows for a target COVID-19 "
              "recall; the paper used argmax.", ("target_recall",), lambda recall: recall is not None),
]


def recorded(run_config: dict, path: tuple[str, ...]):
    """The setting a run recorded at ``path`` of its config.json.

    Raises
    ------
    RunError
        The run did not record it (a config.json from another covfeat version).
    """
    v = run_config
    for k in path:
        if not isinstance(v, dict) or k not in v:
            raise RunError(f"A run's config.json has no {'.'.join(path)}, so covfeat cannot say how it differs from "
                           "the paper; fit it again with this covfeat.")
        v = v[k]
    return v


def applying(run_config: dict) -> list[Deviation]:
    """The deviations that apply to a run, from the settings recorded in its config.json; a
    cross-validation has no single 60/10/30 split, so the split's deviation is not its own."""
    k_fold = bool(recorded(run_config, ("folds",)))
    return [d for d in DEVIATIONS if (d.k_fold or not k_fold) and d.applies(recorded(run_config, d.reads))]
