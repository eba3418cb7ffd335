"""The probes that train the run's head again on other features of the run's own images and split.

control: a random-init backbone's features.  If the head reaches the run's AUC on them, the
task is solvable without ImageNet features and the score says nothing about transfer
learning (a random-init run is its own control).

occlusion: the lung field blanked (a central box, or lung masks).  If the head still
separates the classes, it reads something outside the lungs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from covfeat.extraction.config import ExtractConfig, OcclusionConfig
from covfeat.extraction.run import extract
from covfeat.head.config import FitConfig
from covfeat.head.fit import fit_head
from covfeat.head.runs import Run
from covfeat.probes.common import (
    auc_text,
    config_from,
    extract_or_fail,
    group_bootstrap_auc,
    patient_groups,
    separation,
    what_would_change,
)
from covfeat.probes.probe import PROBES, Probe
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import classification_metrics


def _manifest_csv(fc, rows, path: Path) -> Path:
    man = fc.manifest
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        for r in rows:
            w.writerow([man["path"][r], "COVID-19" if man["label"][r] else "NORMAL",
                        man["patient_id"][r].split(":", 1)[-1], man["source"][r]])
    return path


def _retrain(run: Run, fc, fit: FitConfig, cfg: ExtractConfig, cache_dir, name: str, progress: bool):
    """Extract the run's own images with ``cfg`` and train the run's head on the run's split;
    returns the new run and its cache (whose rows its predictions index)."""
    split = run.split()
    rows = np.flatnonzero(split >= 0)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    src = _manifest_csv(fc, rows, Path(cache_dir) / f"audit-{fc.content_hash()}.csv")
    other = open_cache(extract_or_fail(extract([src], cfg, cache_dir, progress=progress)))
    by_hash = dict(zip(fc.manifest["sha256"], split))
    other_split = np.array([by_hash.get(h, -1) for h in other.manifest["sha256"]], np.int8)
    other_split[~other.has_features()] = -1  # unreadable after all (for example, no lung mask)
    return Run(fit_head(other.path, fit, run.path / "audit-runs", split=other_split, progress=progress, fc=other,
                        name=name)), other


def _run_auc(run: Run, fc) -> tuple[float, float, float]:
    pr = run.predictions()
    return group_bootstrap_auc(pr["label"], pr["p_covid"], patient_groups(fc, pr["row"]))


def control_probe(run: Run, fc, fit: FitConfig, cache_dir, progress=True) -> dict:
    """The same head on a random-init backbone's features of the same images and split."""
    own = _run_auc(run, fc)
    if not fc.pretrained:
        return {"status": "own control", "roc_auc_run": list(own), "verdict":
                f"own control: this run's backbone is itself random-init (NOT PRETRAINED) and reaches "
                f"{auc_text(*own)}; whatever it scores, it scores without ImageNet features. (A run with pretrained "
                "weights gets a random-init control here.)"}
    ctl, ctl_cache = _retrain(run, fc, fit, config_from(fc, weights="none"), cache_dir, "control", progress)
    pr = ctl.predictions()
    groups = patient_groups(ctl_cache, pr["row"]) if len(pr["row"]) else None
    auc = group_bootstrap_auc(pr["label"], pr["p_covid"], groups)
    solvable = auc[2] >= own[0]  # the control's interval reaches the run's own AUC
    text = (f"{'FLAGGED' if solvable else 'not flagged'}: a random-init backbone with the same head and split "
            f"reaches {auc_text(*auc)} against the run's {auc_text(*own)}; "
            + ("the task is solvable without ImageNet features, so this score says nothing about transfer learning"
               if solvable else f"ImageNet features add {own[0] - auc[0]:+.2f} AUC")
            + f". (It would {'clear' if solvable else 'be flagged'} if the control's upper bound "
            f"{'fell below' if solvable else 'reached'} {own[0]:.2f}.)")
    return {"status": "FLAGGED" if solvable else "not flagged", "verdict": text, "roc_auc": list(auc),
            "roc_auc_run": list(own), "run": str(ctl.path)}


def occlusion_probe(run: Run, fc, fit: FitConfig, occlusion: OcclusionConfig, cache_dir, progress=True) -> dict:
    """The lung field blanked, the same head retrained on the same split; AUC against the run's and chance."""
    occ, occ_cache = _retrain(run, fc, fit, config_from(fc, occlusion=occlusion), cache_dir, "occlusion", progress)
    pr = occ.predictions()
    own = _run_auc(run, fc)
    y, p = pr["label"], pr["p_covid"]
    auc, lo, hi = group_bootstrap_auc(y, p, patient_groups(occ_cache, pr["row"]) if len(y) else None)
    kind = separation(auc, lo, hi)
    what = "the lung field blanked" + (f" (masks from {occlusion.masks})" if occlusion.kind == "masks" else
                                       f" (central box {tuple(round(b, 2) for b in occlusion.box)})")
    if kind == "not testable":
        return {"status": "not testable", "verdict": f"not testable: with {what} the test rows hold one class "
                f"({len(y)} images); masks must exist for images of both classes.", "run": str(occ.path)}
    no_drop = lo >= own[1]
    flagged = kind in ("partial separation", "full separation")
    text = (f"{'FLAGGED' if flagged else 'not flagged'}: with {what}, the same head gives {kind}, "
            f"{auc_text(auc, lo, hi)}, against the run's own {auc_text(*own)}"
            + ("; no measurable drop: it reads something outside the lungs as well as the run reads the image"
               if flagged and no_drop else "; it still reads something outside the lungs (labels, borders, body size,"
               " the source)" if flagged else "; the signal is inside the blanked field" if kind == "near chance"
               else "; below chance: what remains points the other way")
            + f". ({what_would_change(kind)}.)")
    m = classification_metrics(y, p)
    return {"status": "FLAGGED" if flagged else "not flagged", "separation": kind, "verdict": text,
            "roc_auc": [auc, lo, hi], "roc_auc_run": list(own), "accuracy": m["accuracy"], "n_covid": m["n_covid"],
            "n_normal": m["n_normal"], "occlusion": occlusion.as_dict(), "run": str(occ.path)}


PROBES.register(Probe("control", lambda a: control_probe(a.run, a.fc, a.fit, a.cache_dir, a.progress)))
PROBES.register(Probe("occlusion", lambda a: occlusion_probe(a.run, a.fc, a.fit, a.occlusion, a.cache_dir,
                                                             a.progress)))
