"""What the probes share: AUC intervals that resample patients (from :mod:`covfeat.trust.intervals`),
three-way verdicts and the words for them, paired differences for Holm's correction, patient
groups, a grouped cross-validated logistic regression, and running stage one again with the
run's own settings."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from covfeat.core.errors import CacheLocked
from covfeat.extraction.backbones import weights_from_config
from covfeat.extraction.config import ExtractConfig
from covfeat.trust.intervals import (
    FLAGGED,
    LEVEL,
    NONE,
    Interval,
    Verdict,
    clusters,
    estimate,
    paired_difference,
    verdict,
)

ALPHA = 0.05  # family-wise level of Holm's correction across the audit's paired comparisons


def auc_interval(y, p, groups, seed: int = 0) -> Interval:
    """ROC AUC with its patient-level interval (:mod:`covfeat.trust.intervals`: a stratified
    cluster bootstrap over ``groups``); no interval (nan) without both classes."""
    y = np.asarray(y, int)
    if len(y) == 0:
        return Interval("roc_auc", math.nan, math.nan, math.nan, LEVEL, NONE, (0, 0), (0, 0))
    return estimate(clusters(y, groups, seed=seed), p, "roc_auc").interval()


def counted(iv, names=("COVID-19", "NORMAL")) -> str:
    """The patients and images an interval rests on, positive class (label 1) then negative:
    COVID-19 then NORMAL, unless the probe scores something else (the source probe: two sources)."""
    (gc, gn), (ic, in_) = iv.n_groups, iv.n_images
    return f"{gc} {names[0]} and {gn} {names[1]} patients, {ic} and {in_} images"


def auc_text(iv, names=("COVID-19", "NORMAL")) -> str:
    """``ROC AUC 0.93 [95% CI 0.85, 0.97; 12 COVID-19 and 15 NORMAL patients, 20 and 15 images]``."""
    if math.isnan(iv.lo):
        return f"ROC AUC {iv.estimate:.2f} [no interval: too few patients; {counted(iv, names)}]"
    return f"ROC AUC {iv.estimate:.2f} [95% CI {iv.lo:.2f}, {iv.hi:.2f}; {counted(iv, names)}]"


def diff_text(pd: dict, what: str = "ROC AUC") -> str:
    """``+0.12 ROC AUC [95% CI +0.05, +0.19]``: a difference (as :func:`paired` keeps it) with its interval."""
    return f"{pd['difference']:+.2f} {what} [95% CI {pd['interval'][0]:+.2f}, {pd['interval'][1]:+.2f}]"


def needed_text(needed, needed_for: str, names=("COVID-19", "NORMAL")) -> str:
    """What would settle an INCONCLUSIVE verdict at the observed spread (``Verdict.needed`` and
    ``Verdict.needed_for``)."""
    if needed is None:
        return needed_for or "more patients of both classes would give it an interval"
    return (f"about {needed[0]} {names[0]} and {needed[1]} {names[1]} patients would be needed {needed_for}, at the "
            "observed spread")


def verdict_fields(v: Verdict, **extra) -> dict:
    """A three-way verdict's parts as audit.json keeps them."""
    return {"verdict3": v.status, "estimate": v.estimate, "interval": [v.lo, v.hi], "null": v.null,
            "margin": v.margin, "needed_patients": list(v.needed) if v.needed else None, "needed_for": v.needed_for,
            **extra}


def versus_chance(iv, margin: float) -> Verdict:
    """An AUC read three ways against chance (0.5): separated beyond the margin, within the
    margin of chance (an equivalence shown), or neither.  An interval that merely reaches 0.5
    is never read as no signal."""
    return verdict(iv, 0.5, margin)


def paired(y, p_a, p_b, groups, margin: float, seed: int = 0) -> dict:
    """The paired difference of two models' ROC AUC on the same rows, its three-way verdict
    against 0, and the p-value of its lying beyond the margin (Holm's correction in
    :func:`covfeat.probes.audit.audit` adjusts it across the audit's paired comparisons)."""
    d = paired_difference(y, p_a, p_b, groups, seed=seed)
    v = verdict(d, 0.0, margin)
    p_beyond = beyond_margin(d, lambda null: paired_difference(y, p_a, p_b, groups, null=null, seed=seed), margin)
    return {"difference": d.estimate, "interval": [d.lo, d.hi], "margin": margin, "verdict3": v.status,
            "needed_patients": list(v.needed) if v.needed else None, "needed_for": v.needed_for,
            "p_beyond_margin": p_beyond, "p_holm": p_beyond, "family": 1,
            "n_groups": list(d.n_groups), "n_images": list(d.n_images)}


def beyond_margin(d, again, margin: float) -> float:
    """The p-value of ``d`` (a Difference) lying beyond the margin on its own side, from
    ``again(null)`` (the same comparison against another null).  1 when the estimate is within
    the margin, and without an interval, which shows nothing (the library's p-value would read
    an undefined interval as excluding every null)."""
    if math.isnan(d.lo) or math.isnan(d.hi) or abs(d.estimate) <= margin:
        return 1.0  # an estimate inside the margin cannot show a difference beyond it
    return again(math.copysign(margin, d.estimate)).p_value


def paired_shown(pd: dict) -> bool:
    """A paired difference beyond the margin that survives Holm's correction."""
    return pd["verdict3"] == FLAGGED and pd["p_holm"] <= ALPHA


def holm_text(pd: dict) -> str:
    """`` (Holm-adjusted p 0.012 beyond the margin, 2 paired comparisons)``, or nothing when the
    estimate lies within the margin (there is no difference beyond it to test)."""
    if abs(pd["difference"]) <= pd["margin"]:
        return ""
    p = "< 0.001" if pd["p_holm"] < 0.001 else f"{pd['p_holm']:.3f}"
    return (f" (Holm-adjusted p {p} beyond the margin, {pd['family']} paired comparisons)" if pd["family"] > 1
            else f" (p {p} beyond the margin)")


def cv_folds_for(y, groups) -> int:
    """The folds a patient-grouped, stratified CV can have: at most 5, and no more than the
    patient groups of the smaller class (each fold must hold both classes)."""
    y, g = np.asarray(y, int), np.asarray(groups).astype(str)
    return min(5, *(len(set(g[y == c])) for c in (0, 1)))


def cv_probabilities(X, y, groups, seed: int = 0, C: float = 1.0) -> np.ndarray:
    """Out-of-fold P(class 1) of a standardised logistic regression, folds grouped by patient
    (:func:`cv_folds_for` of them); all nan when fewer than 2 folds are possible."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = cv_folds_for(y, groups)
    p = np.full(len(y), np.nan)
    if folds < 2:
        return p
    for tr, te in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=C))
        clf.fit(X[tr], y[tr])
        p[te] = clf.predict_proba(X[te])[:, 1]
    return p


def config_from(fc, **change) -> ExtractConfig:
    """The run's own extraction config with ``change`` made: its backbone with the very weights
    it was extracted with (a weights file that is gone or changed is refused)."""
    weights = weights_from_config(fc.config, str(fc.attrs.get("weights_path", "")) or None, "audit the run")
    return replace(ExtractConfig.from_stored(fc.config, weights=weights), **change)


def extract_or_fail(path):
    """The cache path :func:`covfeat.extraction.run.extract` returned, or why there is none."""
    if path is None:
        raise CacheLocked("Another covfeat process is writing the index of the audit's cache; run the audit again "
                          "when it has finished.")
    return path
