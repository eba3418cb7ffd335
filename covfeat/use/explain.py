"""Grad-CAM heat maps through the run's own preprocessing, backbone and head, and, with a lungs
model, how much of each map lies inside the lungs.

For each image: the gradient of P(COVID-19) with respect to the backbone's pre-pool map,
averaged over positions, weights the map's channels; the positive part of their sum,
upsampled to 224 x 224, is laid over the image the model saw (after the run's own pipeline: a
lungs-restricted run is explained on its restricted input).  A user can then see whether the
model looks at the lungs or at the corners and labels; with ``lungs``, the segmenter's lung
contour is drawn on the overlay and the in-lung share of the heat is measured and written
(:mod:`covfeat.probes.gradcam` says how: the map upsampled bilinearly to 224 x 224, the mask
of the 224 x 224 image the model saw).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import cv2
import numpy as np

from covfeat.lungs.segment import load_segmenter
from covfeat.probes.gradcam import MEASURED_AT, Measurer, grad_cam  # noqa: F401  (grad_cam: explain's own name)
from covfeat.use.card import warning
from covfeat.use.predict import Predictor, list_images

SHARE_FIELDS = ["path", "png", "p_covid", "in_lung_share", "lung_fraction", "error"]
SHARE_TABLE = "lung_share.csv"
OVERLAY = 448


def overlay(seen: np.ndarray, cam: np.ndarray, p: float, tag: str, mask: np.ndarray | None = None) -> np.ndarray:
    """The heat map over the image the model saw, at 448 x 448 (BGR), with the lung contour in
    white when a mask is given."""
    heat = cv2.applyColorMap((cv2.resize(cam, seen.shape[1::-1], interpolation=cv2.INTER_CUBIC)
                              .clip(0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(seen.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    over = cv2.resize(cv2.addWeighted(base, 0.6, heat, 0.4, 0), (OVERLAY, OVERLAY), interpolation=cv2.INTER_CUBIC)
    if mask is not None:
        big = cv2.resize(mask.astype(np.uint8), (OVERLAY, OVERLAY), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(over, contours, -1, (255, 255, 255), 1, cv2.LINE_8)
    cv2.putText(over, f"p_covid {p:.2f}{tag}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1,
                cv2.LINE_AA)
    return over


def explain(run: str | Path, items: list, out_dir: str | Path, lungs: str | Path | None = None) -> list[dict]:
    """Write ``<stem>_gradcam.png`` per image into out_dir; unreadable images are reported, not fatal.

    With ``lungs`` (a lungs model's folder), each row also has ``in_lung_share`` (nan when the
    map has no positive mass) and ``lung_fraction`` (the lungs' share of the image: what an
    even heat map would put inside them), and the rows are written to ``out_dir/lung_share.csv``.

    Raises
    ------
    RunError, WeightsUnavailable, ConfigError (not a lungs model's folder)
    """
    seg = load_segmenter(lungs) if lungs is not None else None  # a bad folder is refused before the backbone
    pr = Predictor(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "" if pr.spec.pretrained else " NOT PRETRAINED"
    rows = []
    for m in Measurer(pr.pipeline, pr.backbone, pr.head, seg).measure(list_images(items)):
        if m["error"]:
            rows.append({"path": m["path"], "png": None, "error": m["error"]})
            continue
        png = out_dir / f"{Path(m['path']).stem}_gradcam.png"
        cv2.imwrite(str(png), overlay(m["seen"], m["cam"], m["p_covid"], tag, m.get("mask")))
        row = {"path": m["path"], "png": str(png), "p_covid": m["p_covid"], "error": ""}
        if seg is not None:
            row.update(in_lung_share=m["in_lung_share"], lung_fraction=m["lung_fraction"])
        rows.append(row)
    if seg is not None:
        write_shares(rows, out_dir / SHARE_TABLE)
    line = warning(pr.run)  # the model card's line: NOT PRETRAINED, or flagged by its audit
    if line:
        print(line, file=sys.stderr)
    return rows


def write_shares(rows: list[dict], path: Path) -> Path:
    """The per-image in-lung shares as CSV (a map with no positive mass: an empty share)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SHARE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            share = r.get("in_lung_share")
            w.writerow({**r, "in_lung_share": "" if share is None or math.isnan(share) else f"{share:.4f}",
                        "lung_fraction": "" if r.get("lung_fraction") is None else f"{r['lung_fraction']:.4f}",
                        "p_covid": "" if r.get("p_covid") is None else f"{r['p_covid']:.4f}"})
    return path


def row_text(r: dict) -> str:
    """One printed line: the overlay, P(COVID-19) and, when measured, the in-lung share."""
    if r["error"]:
        return f"{r['path']}: skipped: {r['error']}"
    text = f"{r['png']}  p_covid {r['p_covid']:.4f}"
    if "in_lung_share" in r:
        share = r["in_lung_share"]
        text += ("  in-lung share: none (no positive heat)" if math.isnan(share) else
                 f"  in-lung share {share:.2f} (lungs {r['lung_fraction']:.2f} of the image)")
    return text
