"""The metadata probe: can file metadata alone (sizes, aspect ratio, channels, bit depth,
format, bytes per pixel; no pixels) tell the classes apart?  If a patient-grouped
cross-validated logistic regression separates them, the data carry a shortcut no pixel
model needs to look for."""

from __future__ import annotations

import numpy as np

from covfeat.extraction.images import UnreadableImage, file_metadata
from covfeat.probes.common import (
    auc_text,
    cv_probabilities,
    group_bootstrap_auc,
    patient_groups,
    separation,
    what_would_change,
)
from covfeat.probes.probe import PROBES, Probe


def metadata_features(meta: list[dict]) -> tuple[np.ndarray, list[str]]:
    """The metadata probe's features: log sizes, aspect ratio, channels, bit depth, log bytes
    per pixel, and one column per file format."""
    formats = sorted({m["format"] for m in meta})
    cols = ["log_height", "log_width", "aspect", "channels", "bit_depth", "log_bytes_per_pixel"] + \
        [f"format={f}" for f in formats]
    X = np.array([[np.log(m["height"]), np.log(m["width"]), m["width"] / m["height"], m["channels"], m["bit_depth"],
                   np.log(m["file_bytes"] / (m["height"] * m["width"]))] + [float(m["format"] == f) for f in formats]
                  for m in meta], float)
    return X, cols


def metadata_probe(fc, seed: int = 0) -> dict:
    """Patient-grouped cross-validated logistic regression from file metadata to the class."""
    rows = np.flatnonzero(fc.has_features())
    meta, keep, unreadable = [], [], 0
    for r in rows:
        try:
            meta.append(file_metadata(fc.manifest["path"][r]))
            keep.append(r)
        except UnreadableImage:
            unreadable += 1
    rows = np.array(keep, np.int64)
    y = fc.manifest["label"][rows]
    if len(rows) < 10 or len(np.unique(y)) < 2:
        return {"status": "not testable", "verdict": "not testable: the files of both classes are needed "
                f"({len(rows)} readable, {unreadable} gone since extraction)."}
    X, cols = metadata_features(meta)
    groups = patient_groups(fc, rows)
    p = cv_probabilities(X, y, groups, seed)
    auc, lo, hi = group_bootstrap_auc(y, p, groups, seed=seed)
    kind = separation(auc, lo, hi)
    flagged = kind in ("partial separation", "full separation")
    formats = {name: sorted({f"{m['format']} {m['bit_depth']}-bit {m['channels']}ch" for m, lab in zip(meta, y)
                             if lab == c}) for c, name in ((1, "COVID-19"), (0, "NORMAL"))}
    text = (f"{'FLAGGED' if flagged else 'not flagged'}: file metadata alone (sizes, aspect, channels, bit depth, "
            f"format, bytes per pixel; no pixels) gives {kind} of COVID-19 from NORMAL, {auc_text(auc, lo, hi)}, "
            f"patient-grouped {min(5, int(np.bincount(y).min()))}-fold CV of a logistic regression. "
            + ("A model can reach its score from how the files were made. " if flagged else "")
            + f"({what_would_change(kind)}.)")
    return {"status": "FLAGGED" if flagged else "not flagged", "separation": kind, "verdict": text,
            "roc_auc": [auc, lo, hi], "n": [int((y == 0).sum()), int((y == 1).sum())], "features": cols,
            "unreadable": unreadable, "kinds_by_class": formats}


PROBES.register(Probe("metadata", lambda a: metadata_probe(a.fc, seed=a.seed)))
