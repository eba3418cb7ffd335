"""The metadata probe: can file metadata alone (sizes, aspect ratio, channels, bit depth,
format, bytes per pixel; no pixels) tell the classes apart?  If a patient-grouped
cross-validated logistic regression separates them by more than a margin above chance, the
data carry a shortcut no pixel model needs to look for."""

from __future__ import annotations

import numpy as np

from covfeat.core.errors import FileChanged
from covfeat.head.split import patient_groups
from covfeat.imaging.decode import UnreadableImage, file_metadata
from covfeat.probes.common import (
    auc_interval,
    auc_text,
    cv_folds_for,
    cv_probabilities,
    needed_text,
    verdict_fields,
    versus_chance,
)
from covfeat.probes.probe import PROBES, Probe
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE, MARGIN


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


def metadata_verdict(X, y, groups, margin: float = MARGIN, seed: int = 0) -> dict:
    """The metadata probe's reading of features ``X``: out-of-fold probabilities of a
    patient-grouped CV, their ROC AUC with its patient-level interval, and a verdict by effect
    size: FLAGGED only when the lower bound exceeds 0.5 plus the margin (a bound of 0.52 is
    significant but too small to call a shortcut), CLEAR when the interval lies within the
    margin of chance, else INCONCLUSIVE.  Too few patients of a class for two folds is an
    INCONCLUSIVE with the reason, not a crash."""
    y = np.asarray(y, int)
    folds = cv_folds_for(y, groups)
    if folds < 2:
        g = np.asarray(groups).astype(str)
        fewest = min((len(set(g[y == c])), name) for c, name in ((1, "COVID-19"), (0, "NORMAL")))
        return {"status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "folds": folds, "margin": margin,
                "verdict": f"INCONCLUSIVE: {fewest[1]} has {fewest[0]} patient group(s); a patient-grouped "
                           "cross-validation of file metadata needs at least 2 per class, so it cannot be measured."}
    p = cv_probabilities(X, y, groups, seed)
    iv = auc_interval(y, p, groups, seed=seed)
    v = versus_chance(iv, margin)
    head = (f"file metadata alone (sizes, aspect, channels, bit depth, format, bytes per pixel; no pixels), in a "
            f"patient-grouped {folds}-fold CV of a logistic regression, gives {auc_text(iv)}, margin {margin:.2f}")
    if v.status == FLAGGED:
        text = (f"FLAGGED: {head}: it separates COVID-19 from NORMAL by more than the margin above chance. A model "
                "can reach its score from how the files were made. (It would not be flagged if the lower bound fell "
                f"to {0.5 + margin:.2f}.)")
    elif v.status == CLEAR:
        text = (f"CLEAR: {head}: the interval lies within the margin of chance, so file metadata separates the classes "
                f"by less than {margin:.2f} AUC. (It would be INCONCLUSIVE if the interval left "
                f"[{0.5 - margin:.2f}, {0.5 + margin:.2f}].)")
    else:
        text = (f"INCONCLUSIVE: {head}: it neither exceeds chance by more than the margin nor lies within it, so "
                f"whether file metadata is a shortcut cannot be told; {needed_text(v.needed, v.needed_for)}.")
    return {"status": v.status, "verdict": text, "roc_auc": [iv.estimate, iv.lo, iv.hi], "folds": folds,
            **verdict_fields(v), "n": [int((y == 0).sum()), int((y == 1).sum())],
            "n_patients": [iv.n_groups[1], iv.n_groups[0]]}


def metadata_probe(fc, seed: int = 0, margin: float = MARGIN) -> dict:
    """Patient-grouped cross-validated logistic regression from file metadata to the class.

    Each file is read again, and measured only if its bytes are still the cached ones (the
    SHA-256 the cache holds): a file changed since extraction is counted as changed, never
    measured in the place of the one whose features were cached."""
    rows = np.flatnonzero(fc.usable())  # as fit-head's split: no label-conflicted copies
    meta, keep, unreadable, changed = [], [], 0, 0
    for r in rows:
        try:
            meta.append(file_metadata(fc.manifest["path"][r], sha256=fc.manifest["sha256"][r]))
            keep.append(r)
        except FileChanged:
            changed += 1
        except UnreadableImage:
            unreadable += 1
    rows = np.array(keep, np.int64)
    y = fc.manifest["label"][rows]
    if len(np.unique(y)) < 2:
        return {"status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "margin": margin, "unreadable": unreadable,
                "changed": changed,
                "verdict": f"INCONCLUSIVE: the files of both classes are needed ({len(rows)} readable, of one class; "
                           f"{unreadable} unreadable or gone since extraction, {changed} changed since extraction)."}
    X, cols = metadata_features(meta)
    out = metadata_verdict(X, y, patient_groups(fc, rows), margin, seed)
    formats = {name: sorted({f"{m['format']} {m['bit_depth']}-bit {m['channels']}ch" for m, lab in zip(meta, y)
                             if lab == c}) for c, name in ((1, "COVID-19"), (0, "NORMAL"))}
    if changed:
        out["verdict"] += (f" {changed} file(s) changed since extraction (their bytes no longer hash to the cached "
                           "SHA-256) were left out, not measured.")
    return {**out, "features": cols, "unreadable": unreadable, "changed": changed, "kinds_by_class": formats}


PROBES.register(Probe("metadata", lambda a: metadata_probe(a.fc, seed=a.seed, margin=a.margin)))
