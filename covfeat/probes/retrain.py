"""The probes that train the run's head again on other features of the run's own images and split,
and compare it with the run on the same test rows.

control: a random-init backbone's features.  The verdict rests on the paired difference of
ROC AUC, run minus control, on the same test patients: within the margin, the task is solved
as well without ImageNet features, and the run's score does not show what pretraining adds;
beyond it, pretraining adds more than the margin (a random-init run is its own control).

occlusion: a central box, or the masked field of ``--occlude MASKS``, blanked.  If the head
still separates the classes by more than the margin above chance, it reads something outside
what was blanked.  The run's own AUC and the paired difference are computed on exactly the
rows the occluded run scored (with masks: only the images that have one).  A central box is
not the lung field (on openist's masks a median 6% of lung pixels lie outside the default
box), so the words say "the blanked box", never "the lungs"; with ``audit --lungs`` it also
says how much of the lungs the box covered (:mod:`covfeat.probes.coverage`), and the lungs
probes (:mod:`covfeat.probes.lungs`) blank the lung fields themselves.
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
from covfeat.head.split import patient_groups
from covfeat.probes.common import (
    auc_interval,
    auc_text,
    config_from,
    diff_text,
    extract_or_fail,
    holm_text,
    needed_text,
    paired,
    paired_shown,
    verdict_fields,
    versus_chance,
)
from covfeat.probes.coverage import coverage
from covfeat.probes.probe import PROBES, Probe
from covfeat.store.reader import open_cache
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE, MARGIN
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
    split = run.split(fc.n_rows)
    rows = np.flatnonzero(split >= 0)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    src = _manifest_csv(fc, rows, Path(cache_dir) / f"audit-{fc.content_hash()}.csv")
    other = open_cache(extract_or_fail(extract([src], cfg, cache_dir, progress=progress)))
    by_hash = dict(zip(fc.manifest["sha256"], split))
    other_split = np.array([by_hash.get(h, -1) for h in other.manifest["sha256"]], np.int8)
    other_split[~other.has_features()] = -1  # unreadable after all (for example, no lung mask)
    return Run(fit_head(other.path, fit, run.path / "audit-runs", split=other_split, progress=progress, fc=other,
                        name=name)), other


def aligned(run: Run, fc, other: Run, other_cache):
    """The test images both runs scored, matched by content hash: labels, the run's and the
    other run's p_covid, the run's patient groups of those rows, and how many test images the
    run itself has (the other run may have fewer: with masks, only the images that have one)."""
    pr, po = run.predictions(), other.predictions()
    pos = {h: k for k, h in enumerate(other_cache.manifest["sha256"][po["row"]])}
    mine = fc.manifest["sha256"][pr["row"]]
    idx = np.array([k for k, h in enumerate(mine) if h in pos], np.int64)
    jdx = np.array([pos[mine[k]] for k in idx], np.int64)
    rows = pr["row"][idx]
    groups = patient_groups(fc, rows) if len(rows) else np.array([], str)
    return pr["label"][idx], pr["p_covid"][idx], po["p_covid"][jdx], groups, len(pr["row"])


def control_reading(y, p_run, p_ctl, groups, margin: float = MARGIN, seed: int = 0) -> dict:
    """The control probe's numbers on the same test rows: each model's ROC AUC with its
    patient-level interval, and the paired difference, run minus control."""
    own, ctl = auc_interval(y, p_run, groups, seed), auc_interval(y, p_ctl, groups, seed)
    pd = paired(y, p_run, p_ctl, groups, margin, seed)
    return control_finish({"roc_auc": [ctl.estimate, ctl.lo, ctl.hi], "roc_auc_run": [own.estimate, own.lo, own.hi],
                           "auc_texts": {"run": auc_text(own), "control": auc_text(ctl)}, "paired": pd,
                           "difference": pd["difference"], "margin": margin})


def control_finish(res: dict) -> dict:
    """The control probe's verdict from its paired difference (after Holm's correction):
    within the margin, or the control ahead beyond it, FLAGGED (the task is solved as well
    without ImageNet features); pretraining ahead beyond the margin, CLEAR; else INCONCLUSIVE."""
    pd, m = res["paired"], res["margin"]
    said = (f"the run minus a random-init control (same head, split and test patients) is {diff_text(pd)}"
            f"{holm_text(pd)}, margin {m:.2f}; run {res['auc_texts']['run']}, control {res['auc_texts']['control']}")
    if paired_shown(pd) and pd["difference"] > 0:
        status, text = CLEAR, (f"CLEAR: {said}. ImageNet features separate the classes better than random-init features "
                               f"by more than the margin on these patients. (It would be INCONCLUSIVE if the lower "
                               f"bound fell to {m:+.2f}.)")
    elif paired_shown(pd) or pd["verdict3"] == CLEAR:
        status, text = FLAGGED, (f"FLAGGED: {said}. " + (
            "A random-init backbone scores higher than the run by more than the margin: ImageNet features do not help "
            "on this data." if pd["verdict3"] == FLAGGED else
            "A random-init backbone reaches the run's ROC AUC within the margin: the task is solved as well without "
            "ImageNet features here, so the run's score does not show what pretraining adds.")
            + f" (It would be INCONCLUSIVE if the interval left [{-m:+.2f}, {m:+.2f}].)")
    else:
        held = ("it lies beyond the margin at 95% but not after Holm's correction" if pd["verdict3"] == FLAGGED else
                "it neither lies beyond the margin nor within it")
        status, text = INCONCLUSIVE, (f"INCONCLUSIVE: {said}; {held}, so whether ImageNet features add more than the "
                                      f"margin cannot be told; {needed_text(pd['needed_patients'], pd['needed_for'])}.")
    return {**res, "status": status, "verdict3": status, "verdict": text}


def control_probe(run: Run, fc, fit: FitConfig, cache_dir, progress=True, margin: float = MARGIN) -> dict:
    """The same head on a random-init backbone's features of the same images and split, compared
    with the run on the same test patients."""
    seed = fit.head.seed
    if not fc.pretrained:
        pr = run.predictions()
        own = auc_interval(pr["label"], pr["p_covid"], patient_groups(fc, pr["row"]), seed)
        v = versus_chance(own, margin)
        said = (f"this run's backbone is itself random-init (NOT PRETRAINED), so it is its own control: it reaches "
                f"{auc_text(own)}, margin {margin:.2f}")
        text = {FLAGGED: f"FLAGGED: {said}, beyond the margin from chance: the task is solved here without ImageNet "
                         "features. (A run with pretrained weights gets a random-init control here.)",
                CLEAR: f"CLEAR: {said}, within the margin of chance: without ImageNet features this head does not "
                       "separate the classes.",
                INCONCLUSIVE: f"INCONCLUSIVE: {said}, neither beyond the margin from chance nor within it; "
                              f"{needed_text(v.needed, v.needed_for)}."}[v.status]
        return {"status": v.status, "own_control": True, "roc_auc_run": [own.estimate, own.lo, own.hi],
                "verdict": text, **verdict_fields(v)}
    ctl, ctl_cache = _retrain(run, fc, fit, config_from(fc, weights="none"), cache_dir, "control", progress)
    y, p_run, p_ctl, groups, n_test = aligned(run, fc, ctl, ctl_cache)
    if len(np.unique(y)) < 2:
        return {"status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "run": str(ctl.path), "verdict":
                f"INCONCLUSIVE: the control scored {len(y)} of the run's {n_test} test images, not both classes."}
    return {**control_reading(y, p_run, p_ctl, groups, margin, seed), "run": str(ctl.path), "n_compared": int(len(y))}


def occlusion_reading(y, p_run, p_occ, groups, what: str, margin: float = MARGIN, seed: int = 0) -> dict:
    """The occlusion probe's numbers on the same test rows: the occluded head's ROC AUC against
    chance, the run's own, and the paired difference, run minus occluded."""
    own, occ = auc_interval(y, p_run, groups, seed), auc_interval(y, p_occ, groups, seed)
    v = versus_chance(occ, margin)
    return occlusion_finish({"roc_auc": [occ.estimate, occ.lo, occ.hi], "roc_auc_run": [own.estimate, own.lo, own.hi],
                             "auc_texts": {"run": auc_text(own), "occluded": auc_text(occ)}, "what": what,
                             **verdict_fields(v), "paired": paired(y, p_run, p_occ, groups, margin, seed),
                             "margin": margin})


def occlusion_finish(res: dict) -> dict:
    """The occlusion probe's verdict: the occluded AUC against chance decides it (FLAGGED beyond
    the margin, CLEAR within it, else INCONCLUSIVE, never "no signal" from an interval that
    merely reaches 0.5); the paired drop (after Holm's correction) says how much the blanked
    area carried."""
    m, pd, what = res["margin"], res["paired"], res["what"]
    kind = res.get("occlusion", {}).get("kind") or ("box" if what.startswith("the central box") else "masks")
    outside, examples = REGION_WORDS[kind]
    said = (f"with {what} blanked, the same head retrained on the same split gives {res['auc_texts']['occluded']}, "
            f"against the run's own {res['auc_texts']['run']} on the same test images, margin {m:.2f}")
    status = res["verdict3"]
    if status == FLAGGED and res["roc_auc"][0] > 0.5:
        text = (f"FLAGGED: {said}: it still separates the classes by more than the margin above chance, so it reads "
                f"something {outside} ({examples}).")
    elif status == FLAGGED:
        text = f"FLAGGED: {said}: it separates the classes the other way, by more than the margin below chance."
    elif status == CLEAR:
        text = (f"CLEAR: {said}: within the margin of chance, so what lies {outside} does not separate the classes "
                "by more than the margin.")
    else:
        text = (f"INCONCLUSIVE: {said}: neither beyond the margin from chance nor within it, so whether anything "
                f"{outside} separates the classes cannot be told; {needed_text(res['needed_patients'], res['needed_for'])}.")
    drop = f" The run minus the occluded head is {diff_text(pd)}{holm_text(pd)}: "
    if paired_shown(pd):
        drop += ("blanking costs more than the margin, so part of what the run reads lies in what was blanked."
                 if pd["difference"] > 0 else "the occluded head scores higher than the run by more than the margin.")
    elif pd["verdict3"] == CLEAR:
        drop += f"blanking costs less than the margin; the run reads what lies {outside} about as well as the whole image."
    elif pd["verdict3"] == FLAGGED:
        drop += "beyond the margin at 95% but not after Holm's correction, so the cost of blanking cannot be told."
    else:
        drop += "whether blanking costs more than the margin cannot be told."
    n, of = res.get("n_compared"), res.get("n_test")
    rows = (f" Both are computed on the {n} of the run's {of} test images the occluded run scored." if n and of and n < of
            else "")
    return {**res, "status": status, "verdict": text + drop + rows + coverage_text(res.get("coverage")),
            "difference": pd["difference"]}


# Where what the occluded head still reads lies, by occlusion kind, and what it may be there.
REGION_WORDS = {
    "box": ("outside the blanked box", "labels, borders, body size, the source"),
    "masks": ("outside the masked field", "labels, borders, body size, the source"),
    "lungs": ("outside the lungs", "labels, borders, the mediastinum, body size, the source"),
    "outside": ("inside the lungs", "the disease, or the source as the lungs show it: exposure, age, body size"),
}


def coverage_text(cov: dict | None) -> str:
    """`` The blanking covered 94% of the lung pixels (range 80% to 100%) and 41% of the other
    pixels (range 35% to 47%) of the run's 18 test images, as the lungs model finds them.``,
    or nothing without a lungs model."""
    if not cov:
        return ""
    if not cov["n_images"]:
        return (" The lungs model finds no lung field in any of the run's test images, so how much of the lungs this "
                "blanking covers is not known.")

    def share(c, what):
        return f"{c['mean']:.0%} of the {what} pixels (range {c['min']:.0%} to {c['max']:.0%})"

    return (f" The blanking covered {share(cov['lungs'], 'lung')} and {share(cov['other'], 'other')} of the run's "
            f"{cov['n_images']} test images, as the lungs model finds them.")


def blanked_words(occlusion: OcclusionConfig) -> str:
    """What an occlusion blanks, as its verdict says it: a central box is named a box, never the lungs."""
    if occlusion.kind == "lungs":
        return f"the lung fields (as the lungs model in {occlusion.model} finds them)"
    if occlusion.kind == "outside":
        return f"everything outside the lung fields (as the lungs model in {occlusion.model} finds them)"
    return (f"the masked field (masks from {occlusion.masks})" if occlusion.kind == "masks" else
            f"the central box {tuple(round(b, 2) for b in occlusion.box)}")


def occlusion_probe(run: Run, fc, fit: FitConfig, occlusion: OcclusionConfig, cache_dir, progress=True,
                    margin: float = MARGIN, name: str = "occlusion", coverage: dict | None = None) -> dict:
    """A central box (or the masked field, or lung fields a lungs model predicts) blanked, the
    same head retrained on the same split, compared with chance and, on the same test rows,
    with the run's own.  ``name`` names the retrained run; ``coverage`` (from
    :func:`covfeat.probes.lungs.coverage`) is the share of lung and other pixels it blanks."""
    occ, occ_cache = _retrain(run, fc, fit, config_from(fc, occlusion=occlusion), cache_dir, name, progress)
    y, p_run, p_occ, groups, n_test = aligned(run, fc, occ, occ_cache)
    base = {"occlusion": occlusion.as_dict(), "run": str(occ.path), "n_compared": int(len(y)), "n_test": n_test,
            **({"coverage": coverage} if coverage else {})}
    what = blanked_words(occlusion)
    if len(np.unique(y)) < 2:
        return {**base, "status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "verdict": f"INCONCLUSIVE: with {what} "
                f"blanked, the test images scored hold one class ({len(y)} of the run's {n_test}); masks must exist for "
                "images of both classes."}
    res = occlusion_finish({**base, **occlusion_reading(y, p_run, p_occ, groups, what, margin, fit.head.seed)})
    m = classification_metrics(y, p_occ)
    return {**res, "accuracy": m["accuracy"], "n_covid": m["n_covid"], "n_normal": m["n_normal"]}


PROBES.register(Probe("control", lambda a: control_probe(a.run, a.fc, a.fit, a.cache_dir, a.progress, a.margin),
                      finish=lambda r: control_finish(r) if "paired" in r else r))
PROBES.register(Probe("occlusion", lambda a: occlusion_probe(
    a.run, a.fc, a.fit, a.occlusion, a.cache_dir, a.progress, a.margin,
    coverage=coverage(a.run, a.fc, a.lungs, a.occlusion)),
                      finish=lambda r: occlusion_finish(r) if "paired" in r else r))
