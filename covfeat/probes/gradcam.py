"""Grad-CAM measured against the lungs: how much of a heat map lies inside the lung fields, per
image, and the ``gradcam`` probe that asks of a run's test images "does the model look at the
lungs" (issue 17, item 5).  It runs on request: when the audit is given a lungs model
(``covfeat audit --lungs MODEL``).

The heat map is Grad-CAM's (Selvaraju et al. 2017): the gradient of P(COVID-19) with respect
to the backbone's pre-pool map, averaged over positions, weights the map's channels, and the
positive part of their sum is the map (5 x 5 for inception_v3 at 224).  It is measured at the
model's input resolution: the map upsampled bilinearly to 224 x 224 (bilinear keeps it
non-negative, as cubic would not), against the segmenter's mask of the 224 x 224 image the
model saw (its own pipeline's, so a lungs-restricted run is measured on its restricted input).
The in-lung share is the map's mass inside the mask over its whole mass; a map with no
positive mass has no share, and is counted apart.

A heat map spread evenly would put the lungs' own share of the image inside them (the lung
fraction, a quarter to a third of a radiograph).  So the probe compares, image by image, the
in-lung share with the lung fraction, and reads the mean excess with its patient-level
interval (:mod:`covfeat.trust.means`) three ways against a stated margin.

The probe also measures how much the heat maps share: the mean cosine similarity of each
test image's map to the maps' average.  A random-init backbone's features are nearly the same
for every image, so its maps are one common pattern up to small variations (measured on the
synthetic sets of tests/test_gradcam_lungs.py: cosine 0.99 to 1.00 for all four backbones), and
where that pattern lies says more about the architecture than about the class.  For a NOT
PRETRAINED run the verdict says so: its in-lung share is weak evidence.

This module also holds the Grad-CAM computation itself, which ``covfeat explain``
(:mod:`covfeat.use.explain`) draws: the probe must compute it too, and cannot reach up.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
from covfeat.extraction.images import InputPipeline
from covfeat.extraction.precision import prepare_process
from covfeat.head.runs import Run
from covfeat.head.split import patient_groups
from covfeat.imaging.decode import UnreadableImage
from covfeat.lungs.segment import load_segmenter
from covfeat.probes.common import config_from
from covfeat.probes.probe import PROBES, Probe
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE
from covfeat.trust.means import Mean, means_by

SHARE_MARGIN = 0.05  # the excess of the in-lung share over the lung fraction that counts as looking at the lungs
BATCH = 16
MEASURED_AT = ("heat map upsampled bilinearly to 224 x 224; lung mask of the 224 x 224 image the model saw "
               "(after its own pipeline)")


def grad_cams(backbone, head, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w) heat maps in [0, 1] and P(COVID-19) for a batch of preprocessed images.

    One tape serves the batch: the backbone and head run in inference mode, so each image's
    P(COVID-19) depends on its own map only, and the gradient of their sum is each one's own."""
    import tensorflow as tf

    inp = tf.constant(x)
    with tf.GradientTape() as tape:
        maps = backbone(inp, training=False)
        tape.watch(maps)
        p = head(maps, training=False)[:, 1]
        total = tf.reduce_sum(p)
    grads = tape.gradient(total, maps).numpy()
    a = maps.numpy()
    cam = np.maximum(np.einsum("nhwc,nc->nhw", a, grads.mean(axis=(1, 2))), 0)
    top = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)
    return cam, p.numpy().astype(float)


def grad_cam(backbone, head, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(h, w) heat map in [0, 1] and P(COVID-19) for one preprocessed image."""
    cam, p = grad_cams(backbone, head, x[None])
    return cam[0], float(p[0])


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The heat map at ``shape`` (h, w), bilinear: non-negative wherever the map is."""
    return cv2.resize(cam.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def in_lung_share(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of the heat map's mass inside ``mask`` (bool, at the image's resolution, to
    which the map is upsampled); nan when the map has no positive mass."""
    heat = upsample(cam, mask.shape)
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else math.nan


def cache_route(fc) -> str:
    """How the cache's backbone computed (:mod:`covfeat.extraction.precision`): float32 unless recorded."""
    return fc.config.get("precision_route", "float32")


class Measurer:
    """A run's pipeline, backbone and head, and a segmenter: heat maps and their in-lung share
    for image files, in batches (``covfeat explain --lungs`` and the gradcam probe)."""

    def __init__(self, pipeline: InputPipeline, backbone, head, segmenter=None):
        self.pipeline, self.backbone, self.head, self.segmenter = pipeline, backbone, head, segmenter

    @classmethod
    def for_run(cls, run: Run, fc, segmenter=None) -> "Measurer":
        """The run rebuilt from its cache's own config and weights (a changed weights file is refused),
        computing in the arithmetic its features were extracted in (``--precision``): heat maps of a
        bfloat16 cache's run come from the bfloat16 backbone that made its features."""
        cfg = config_from(fc, augment=0)
        entry = get_backbone(cfg.backbone)
        route = cache_route(fc)
        prepare_process(route)
        backbone = build_backbone(entry, resolve_weights(entry, cfg.weights, seed=cfg.seed), seed=cfg.seed,
                                  route=route)
        return cls(InputPipeline.for_config(cfg, entry), backbone, run.load_head(), segmenter)

    def measure(self, paths) -> list[dict]:
        """Per file: ``seen`` (the 224 x 224 RGB image the model saw), ``cam``, ``p_covid``, and
        with a segmenter ``mask``, ``in_lung_share`` and ``lung_fraction``; or ``error``."""
        rows = [{"path": str(p), "error": ""} for p in paths]
        for s in range(0, len(rows), BATCH):
            batch = []
            for r in rows[s:s + BATCH]:
                try:
                    r["seen"] = self.pipeline.decode(r["path"])
                    batch.append(r)
                except UnreadableImage as exc:
                    r["error"] = str(exc)
                except OSError as exc:
                    r["error"] = f"cannot read file ({exc})"
            if not batch:
                continue
            cams, ps = grad_cams(self.backbone, self.head, np.stack([self.pipeline.scale(r["seen"]) for r in batch]))
            masks = self.segmenter.masks([r["seen"] for r in batch]) if self.segmenter is not None else None
            for i, r in enumerate(batch):
                r.update(cam=cams[i], p_covid=float(ps[i]))
                if masks is not None:
                    r.update(mask=masks[i], in_lung_share=in_lung_share(cams[i], masks[i]),
                             lung_fraction=float(masks[i].mean()))
        return rows


# --------------------------------------------------------------------------- the probe


def reading(excess: Mean, margin: float) -> str:
    """One category's answer: CLEAR when the interval of the excess lies wholly above the
    margin (it looks at the lungs), FLAGGED when it lies wholly below it (it is shown not to:
    no more of the heat inside the lungs than the margin above an even spread, or less than
    an even spread), else INCONCLUSIVE (or no interval)."""
    if not excess.has_interval:
        return INCONCLUSIVE
    return CLEAR if excess.lo > margin else FLAGGED if excess.hi < margin else INCONCLUSIVE


def patients_for(excess: Mean, margin: float) -> int | None:
    """Patient groups that would tell an INCONCLUSIVE reading at the observed spread (a
    half-width shrinks as 1 / sqrt(patients)); None when the estimate sits on the margin or
    there is no interval."""
    gap = abs(excess.estimate - margin)
    if not excess.has_interval or gap < 1e-9:
        return None
    return int(math.ceil(excess.n_groups * ((excess.hi - excess.lo) / 2 / gap) ** 2))


def table(shares, fractions, groups, labels, sources, margin: float, seed: int) -> list[dict]:
    """Per class and per source: the mean in-lung share, the mean lung fraction and the mean
    excess, each with its patient-level interval, and the reading of the excess."""
    kw = dict(categories={"source": sources}, seed=seed)
    parts = [means_by(shares, groups, labels, what="in-lung share", bounds=(0, 1), **kw),
             means_by(fractions, groups, labels, what="lung fraction", bounds=(0, 1), **kw),
             means_by(shares - fractions, groups, labels, what="excess", bounds=(-1, 1), **kw)]
    out = []
    for category in ("overall", "class", "source"):
        names = [""] if category == "overall" else list(parts[0][category])
        for name in names:
            share, frac, exc = (p[category] if category == "overall" else p[category][name] for p in parts)
            status = reading(exc, margin)
            out.append({"category": category, "name": name or "all test images", "share": share.as_dict(),
                        "lung_fraction": frac.as_dict(), "excess": exc.as_dict(), "reading": status,
                        "needed_patients": patients_for(exc, margin) if status == INCONCLUSIVE else None})
    return out


def row_text(r: dict) -> str:
    s, f, e = (Mean(**r[k]) for k in ("share", "lung_fraction", "excess"))
    return (f"{r['name']}: {s.text()} of the heat inside the lungs, which are {f.estimate:.2f} of the image "
            f"(excess {e.estimate:+.2f}" + (f" [95% CI {e.lo:+.2f}, {e.hi:+.2f}])" if e.has_interval else
                                            f", no interval: {e.method})"))


def gradcam_verdict(rows: list[dict], margin: float, n_without: int) -> tuple[str, str]:
    """The probe's answer, from the classes: FLAGGED when some class is shown not to look at the
    lungs, CLEAR when every class is shown to, else INCONCLUSIVE; sources are named when they
    read otherwise than their class."""
    classes = [r for r in rows if r["category"] == "class"]
    said = {s: [r for r in classes if r["reading"] == s] for s in (CLEAR, FLAGGED, INCONCLUSIVE)}
    rule = (f"the heat looks at the lungs when its in-lung share exceeds the lungs' own share of the image (what an "
            f"even spread would put there) by more than the margin {margin:.2f}, on the interval's whole width")
    apart = [r for r in rows if r["category"] == "source" and r["reading"] == FLAGGED]
    tail = (" Sources shown not to look at the lungs: " + "; ".join(map(row_text, apart)) + "." if apart else "")
    tail += (f" {n_without} image(s) had no positive heat at all and are left out." if n_without else "")
    if said[FLAGGED]:
        low = [r for r in said[FLAGGED] if r["excess"]["hi"] < 0]
        where = ("outside the lungs: less of it lies inside than an even spread would put there" if low else
                 "no more on the lungs than an even spread, within the margin")
        return FLAGGED, (f"FLAGGED: the model does not look at the lungs: its Grad-CAM heat lies {where} "
                         f"({'; '.join(map(row_text, said[FLAGGED]))}). Its evidence for COVID-19 sits elsewhere "
                         f"in the image ({rule}).{tail}")
    if classes and len(said[CLEAR]) == len(classes):
        return CLEAR, (f"CLEAR: the model looks at the lungs: more of its Grad-CAM heat lies inside them than an even "
                       f"spread would put there, by more than the margin ({'; '.join(map(row_text, classes))}; "
                       f"{rule}).{tail}")
    need = [f"{r['name']}: about {r['needed_patients']} patients" for r in said[INCONCLUSIVE] if r["needed_patients"]]
    return INCONCLUSIVE, (f"INCONCLUSIVE: the Grad-CAM heat is neither shown to look at the lungs nor shown not to "
                          f"({'; '.join(map(row_text, classes)) or 'no image had heat'}; {rule})."
                          + (" At the observed spread, " + ", ".join(need) + " would tell." if need else "") + tail)


def common_pattern(cams: list[np.ndarray]) -> dict:
    """How alike the heat maps are: each map's cosine similarity to the maps' average, its mean
    and minimum (1 when every map is the same pattern, whatever its scale)."""
    flat = np.stack([c.ravel() for c in cams]).astype(float)
    mean = flat.mean(axis=0)
    norms = np.linalg.norm(flat, axis=1) * np.linalg.norm(mean)
    cos = np.divide(flat @ mean, norms, out=np.zeros(len(flat)), where=norms > 0)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n_maps": len(flat)}


def random_init_caveat(common: dict) -> str:
    """The verdict's warning for a NOT PRETRAINED run, with its own measured likeness of the maps."""
    return (f" NOT PRETRAINED: random-init features are nearly the same for every image, so the heat maps are "
            f"dominated by one pattern common to every image (mean cosine similarity of a map to the average map "
            f"{common['mean_cosine']:.3f}, lowest {common['min_cosine']:.3f}, over {common['n_maps']} maps); "
            f"where that pattern lies says more about the architecture than about the class, so this in-lung "
            f"share is weak evidence.")


def gradcam_probe(run: Run, fc, lungs: str | Path, margin: float = SHARE_MARGIN, seed: int = 0) -> dict:
    """Grad-CAM on the run's test images, measured against the segmenter's lungs, read per class
    and per source (see the module's docstring)."""
    prepare_process(cache_route(fc))  # before the segmenter starts TensorFlow: the onednn route must
    seg = load_segmenter(lungs)
    pr = run.predictions()
    groups = pr["group"] if "group" in pr else patient_groups(fc, pr["row"])
    measured = Measurer.for_run(run, fc, seg).measure(list(pr["path"]))
    per_image, keep = [], []
    for i, m in enumerate(measured):
        per_image.append({"path": m["path"], "label": int(pr["label"][i]), "source": str(pr["source"][i]),
                          "group": str(groups[i]), "p_covid": m.get("p_covid"), "error": m["error"],
                          "in_lung_share": m.get("in_lung_share"), "lung_fraction": m.get("lung_fraction")})
        if not m["error"] and not math.isnan(m["in_lung_share"]):
            keep.append(i)
    keep = np.asarray(keep, int)
    n_without = sum(1 for r in per_image if not r["error"] and r["in_lung_share"] is not None
                    and math.isnan(r["in_lung_share"]))
    unreadable = [r["path"] for r in per_image if r["error"]]
    base = {"margin": margin, "measured_at": MEASURED_AT, "lungs": {"folder": str(lungs), "hash": seg.hash},
            "n_test": len(per_image), "n_measured": int(len(keep)), "n_without_heat": n_without,
            "unreadable": unreadable, "per_image": per_image}
    if not len(keep):
        return {"status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "table": [], **base,
                "verdict": "INCONCLUSIVE: no test image gave a heat map to measure against the lungs"
                + (f": all {n_without} of the run's {len(per_image)} test images' maps are zero after Grad-CAM's "
                   "ReLU (the gradient-weighted features are negative at every position)" if n_without else "")
                + (f"; {len(unreadable)} could not be read" if unreadable else "")
                + ("; random-init features give nearly one map for every image, so this says little about the "
                   "model" if not fc.pretrained else "") + "."}
    col = lambda k: np.array([per_image[i][k] for i in keep])  # noqa: E731
    rows = table(col("in_lung_share").astype(float), col("lung_fraction").astype(float), col("group"), col("label"),
                 col("source"), margin, seed)
    status, text = gradcam_verdict(rows, margin, n_without)
    if unreadable:
        text += f" {len(unreadable)} test image(s) could not be read again and are left out."
    common = common_pattern([measured[i]["cam"] for i in keep])
    if not fc.pretrained:
        text += random_init_caveat(common)
    return {"status": status, "verdict3": status, "verdict": text, "table": rows, "common_pattern": common, **base}


PROBES.register(Probe("gradcam", lambda a: gradcam_probe(a.run, a.fc, a.lungs, seed=a.seed),
                      help="(with --lungs) Grad-CAM's in-lung share", on_request=lambda a: bool(a.lungs)))
