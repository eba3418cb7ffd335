"""Masks for image files: one PNG per image at its own size, a table of what was written, and a
contact sheet a person can judge at a glance.

Files are decoded as extraction decodes them (covfeat.imaging.decode, with its limits), so a
mask fits the very pixels extraction will blank or crop.  An unreadable file is one line
with its reason, never the end of the run.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from covfeat.core.errors import DataError, FileUnavailable, SourceNotFound
from covfeat.core.fsutil import atomic_file
from covfeat.imaging.decode import IMAGE_SUFFIXES, ImageLimits, UnreadableImage, decode
from covfeat.lungs.segment import Segmenter

SHEET = "contact_sheet.png"

TABLE = "masks.csv"

SHEET_MAX = 100  # thumbnails on the contact sheet: the first ones, in the order the files were given

CELL = 192  # side of a thumbnail's cell, in pixels

BATCH = 16  # images decoded and segmented at a time (memory stays bounded on large folders)

CONTOUR = (0, 255, 0)  # RGB of the lung contour on the contact sheet


@dataclass
class Predicted:
    out: Path
    written: list[tuple[Path, Path]] = field(default_factory=list)  # (image, its mask file)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    empty: list[Path] = field(default_factory=list)  # images where no lung was found
    sheet: Path | None = None


def image_paths(inputs) -> list[Path]:
    """Files as given, folders searched (recursively) for image files, in order.

    Raises
    ------
    SourceNotFound, DataError
    """
    out = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                          and not q.name.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise SourceNotFound(f"{p}: no such file or folder.")
    if not out:
        raise DataError("No image files given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ").")
    return out


def mask_names(paths: list[Path]) -> list[str]:
    """``stem.png`` for each image; a stem met again gets ``stem-2.png``, ``stem-3.png``..."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        k = seen.get(p.stem, 0) + 1
        seen[p.stem] = k
        names.append(f"{p.stem}.png" if k == 1 else f"{p.stem}-{k}.png")
    return names


def predict_masks(segmenter: Segmenter, inputs, out: str | Path, limits: ImageLimits | None = None,
                  say=None) -> Predicted:
    """Write the lung mask of every image in ``inputs`` (files or folders) to ``out``: a PNG
    of 0 and 255 at the image's own size, post-processed; ``masks.csv`` (image, mask, size,
    lung share, or the reason it was skipped); and ``contact_sheet.png``.

    ``say`` receives one line per skipped file and per image without lungs.
    """
    say = say or (lambda _: None)
    limits = limits or ImageLimits()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = image_paths(inputs)
    names = mask_names(paths)
    result = Predicted(out)
    rows, thumbs = [], []
    for start in range(0, len(paths), BATCH):
        batch = []
        for p, name in zip(paths[start:start + BATCH], names[start:start + BATCH]):
            try:
                limits.check_file(p)
                batch.append((p, name, decode(p, limits=limits)))
            except (UnreadableImage, FileUnavailable) as exc:
                result.skipped.append((p, str(exc)))
                rows.append({"image": str(p), "mask": "", "height": "", "width": "", "lung_share": "",
                             "skipped": str(exc)})
                say(f"skipped {p}: {exc}")
        masks = segmenter.masks([img for _, _, img in batch])
        for (p, name, img), m in zip(batch, masks):
            write_png(out / name, m.astype(np.uint8) * 255)
            result.written.append((p, out / name))
            if not m.any():
                result.empty.append(p)
                say(f"no lungs found in {p} (its mask is empty)")
            rows.append({"image": str(p), "mask": name, "height": m.shape[0], "width": m.shape[1],
                         "lung_share": f"{m.mean():.4f}", "skipped": ""})
            if len(thumbs) < SHEET_MAX:
                thumbs.append(thumbnail(img, m, p.name))
    with atomic_file(out / TABLE) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "mask", "height", "width", "lung_share", "skipped"])
            w.writeheader()
            w.writerows(rows)
    if thumbs:
        result.sheet = out / SHEET
        write_png(result.sheet, cv2.cvtColor(contact_sheet(thumbs), cv2.COLOR_RGB2BGR))
    return result


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A PNG written atomically (a killed run leaves no half mask under a final name)."""
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.tobytes())


def thumbnail(img: np.ndarray, mask: np.ndarray, label: str) -> np.ndarray:
    """An image fitted into a CELL x CELL cell (uint8 RGB), its lung contour drawn, its name below."""
    h, w = mask.shape
    scale = (CELL - 16) / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    grey = np.clip(img.mean(axis=2), 0, 255).astype(np.uint8)
    small = cv2.cvtColor(cv2.resize(grey, (tw, th), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
    m = cv2.resize(mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(small, contours, -1, CONTOUR, 1)
    cell = np.zeros((CELL, CELL, 3), np.uint8)
    y0, x0 = (CELL - 16 - th) // 2, (CELL - tw) // 2
    cell[y0:y0 + th, x0:x0 + tw] = small
    text = label if len(label) <= 30 else label[:27] + "..."
    cv2.putText(cell, text, (3, CELL - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1, cv2.LINE_AA)
    return cell


def contact_sheet(cells: list[np.ndarray]) -> np.ndarray:
    cols = min(10, math.ceil(math.sqrt(len(cells))))
    rows = math.ceil(len(cells) / cols)
    sheet = np.full((rows * CELL, cols * CELL, 3), 40, np.uint8)
    for k, c in enumerate(cells):
        r, q = divmod(k, cols)
        sheet[r * CELL:(r + 1) * CELL, q * CELL:(q + 1) * CELL] = c
    return sheet
