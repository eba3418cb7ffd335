"""Grad-CAM heat maps through the run's own preprocessing, backbone and head.

For each image: the gradient of P(COVID-19) with respect to the backbone's pre-pool map,
averaged over positions, weights the map's channels; the positive part of their sum,
upsampled to 224 x 224, is laid over the image the model saw.  A user can then see
whether the model looks at the lungs or at the corners and labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from covfeat.extraction.images import occlude
from covfeat.imaging.decode import UnreadableImage
from covfeat.use.card import warning
from covfeat.use.predict import Predictor, list_images


def grad_cam(backbone, head, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(h, w) heat map in [0, 1] and P(COVID-19) for one preprocessed image."""
    import tensorflow as tf

    inp = tf.constant(x[None])
    with tf.GradientTape() as tape:
        maps = backbone(inp, training=False)
        tape.watch(maps)
        p = head(maps, training=False)[:, 1]
    grads = tape.gradient(p, maps)[0].numpy()
    a = maps[0].numpy()
    cam = np.maximum((a * grads.mean(axis=(0, 1))).sum(-1), 0)
    if cam.max() > 0:
        cam = cam / cam.max()
    return cam, float(p.numpy()[0])


def explain(run: str | Path, items: list, out_dir: str | Path) -> list[dict]:
    """Write ``<stem>_gradcam.png`` per image into out_dir; unreadable images are reported, not fatal."""
    pr = Predictor(run)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "" if pr.spec.pretrained else " NOT PRETRAINED"
    rows = []
    for path in list_images(items):
        try:
            shown = pr.pipeline.decode(path, occluded=False)  # decoded once: shown and fed to the model
            x = pr.pipeline.scale(occlude(shown, path, pr.pipeline.occlusion))
        except (UnreadableImage, OSError) as exc:
            rows.append({"path": str(path), "png": None, "error": str(exc)})
            continue
        cam, p = grad_cam(pr.backbone, pr.head, x)
        heat = cv2.applyColorMap((cv2.resize(cam, shown.shape[1::-1], interpolation=cv2.INTER_CUBIC)
                                  .clip(0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        base = cv2.cvtColor(shown.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        over = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
        over = cv2.resize(over, (448, 448), interpolation=cv2.INTER_CUBIC)
        cv2.putText(over, f"p_covid {p:.2f}{tag}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1,
                    cv2.LINE_AA)
        png = out_dir / f"{Path(path).stem}_gradcam.png"
        cv2.imwrite(str(png), over)
        rows.append({"path": str(path), "png": str(png), "p_covid": p, "error": ""})
    line = warning(pr.run)  # the model card's line: NOT PRETRAINED, or flagged by its audit
    if line:
        print(line, file=sys.stderr)
    return rows
