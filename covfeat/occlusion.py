"""The lung-field occlusion used by the shortcut audit: what gets blanked before extraction.

If a head trained on radiographs whose lung field is replaced by a constant still
separates COVID-19 from NORMAL, it is reading something other than the lungs (text
labels, borders, body size, scanner), which is what the occlusion probe reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Occlusion:
    kind: str = "none"  # "none" | "box" | "masks"
    box: tuple[float, float, float, float] = (0.15, 0.1, 0.85, 0.9)  # x0, y0, x1, y1 as fractions
    masks: str = ""  # folder of masks named like the images; non-zero = lung
    fill: float = 127.5  # constant on the [0, 255] scale

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.kind not in ("none", "box", "masks"):
            raise ConfigError(f"Occlusion must be 'box' or a mask folder, got {self.kind!r}.")
        if self.kind == "masks" and not Path(self.masks).is_dir():
            raise ConfigError(f"Mask folder {self.masks!r} does not exist.")

    def apply(self, img: np.ndarray, path: str) -> np.ndarray:
        out = img.copy()
        h, w = img.shape[:2]
        if self.kind == "box":
            x0, y0, x1, y1 = self.box
            out[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = self.fill
            return out
        stem = Path(path).stem
        cands = sorted(Path(self.masks).glob(stem + ".*"))
        if not cands:
            from .images import UnreadableImage

            raise UnreadableImage(f"no lung mask named {stem}.* in {self.masks}")
        mask = cv2.imread(str(cands[0]), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            from .images import UnreadableImage

            raise UnreadableImage(f"unreadable lung mask {cands[0].name}")
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST) > 0
        out[mask] = self.fill
        return out
