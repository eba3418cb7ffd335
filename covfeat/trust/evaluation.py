"""What fit-head stores about a run's held-out rows, number by number, as metrics.json keeps it:
each with its patient-level interval (:mod:`covfeat.trust.intervals`), the name of that
interval, and the images and patients behind it.

Table 2's rows, the per-source breakdown, the calibration of p_covid (raw, and corrected from
the prior the head was trained toward to the test prevalence), PPV and NPV at a prevalence,
and the operating point's threshold with its validation bootstrap.  A referee reading a
number needs what it rests on: "0.80 [0.49, 0.94] (8/10 images, 7 patients)", not 0.80.
:mod:`covfeat.trust.table` says how they read; the report asks :func:`predictive` again
only for a prevalence the user states.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from covfeat.trust.calibration import brier, ece, predictive_values, prior_correct, reliability
from covfeat.trust.intervals import (
    LEVEL,
    N_BOOT,
    NONE,
    PROPORTIONS,
    RANKINGS,
    Interval,
    cell_counts,
    clusters,
    confusion_rows,
    estimate,
    proportion_estimate,
)

THRESHOLD_INTERVAL = ("percentile interval of the deciding validation probability over the cluster bootstrap "
                      "(validation patient groups resampled, stratified by class)")


def _groups(groups) -> np.ndarray:
    return np.asarray(groups).astype(str)


def plain(metric: str) -> bool:
    """A proportion k/n of images (not F1, whose numerator and denominator are weighted sums)."""
    a, _ = PROPORTIONS[metric]
    return set(a) <= {0, 1} and "f1" not in metric


def record(iv: Interval, groups, behind, hit=None) -> dict:
    """A number as metrics.json stores it: value, interval, level, method, the images and
    patient groups behind it (rows ``behind``), per class (COVID-19, NORMAL) too, and for a
    plain proportion its numerator's images and patients (rows ``hit``)."""
    g = _groups(groups)
    behind = np.asarray(behind, bool)
    out = {"value": float(iv.estimate), "lo": float(iv.lo), "hi": float(iv.hi), "level": float(iv.level),
           "method": iv.method, "images": int(behind.sum()), "patients": len(set(g[behind])),
           "images_by_class": [int(v) for v in iv.n_images], "patients_by_class": [int(v) for v in iv.n_groups]}
    if hit is not None:
        hit = np.asarray(hit, bool)
        out.update(k=int(hit.sum()), k_patients=len(set(g[hit])))
    return out


def table2(y, p, groups, threshold: float = 0.5, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Every Table-2 proportion, F1, ROC AUC and PR AUC as a :func:`record`, and TP, FP, FN, TN
    and the class totals as [images, patients]: ``{"intervals": ..., "counts": ...}``."""
    y, p, g = np.asarray(y, int), np.asarray(p, float), _groups(groups)
    cl = clusters(y, g, n_boot, seed)
    cells = confusion_rows(y, p, threshold)
    out = {}
    for k, (a, b) in PROPORTIONS.items():
        num, den = cells @ np.asarray(a, float), cells @ np.asarray(b, float)
        out[k] = record(estimate(cl, p, k, threshold).interval(), g, den > 0, num > 0 if plain(k) else None)
    for k in RANKINGS:
        out[k] = {**record(estimate(cl, p, k).interval(), g, np.ones(len(y), bool)), "auc": True}
    return {"intervals": out, "counts": {k: list(v) for k, v in cell_counts(y, p, g, threshold).items()}}


def by_source(y, p, sources, groups, threshold: float = 0.5, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Per source: its COVID-19 and NORMAL [images, patients], and COVID-19 recall and
    specificity at ``threshold`` as :func:`record` s, each from that source's rows alone."""
    y, p, g = np.asarray(y, int), np.asarray(p, float), _groups(groups)
    src = np.asarray(sources).astype(str)
    out = {}
    for s in sorted(set(src)):
        m = src == s
        entry = {"covid": [int((y[m] == 1).sum()), len(set(g[m & (y == 1)]))],
                 "normal": [int((y[m] == 0).sum()), len(set(g[m & (y == 0)]))]}
        cl = clusters(y[m], g[m], n_boot, seed)
        call = p[m] >= threshold
        for key, lab in (("covid_recall", 1), ("specificity", 0)):
            rows = y[m] == lab
            if rows.any():
                iv = proportion_estimate(cl, p[m], key, threshold).interval()
                entry[key] = record(iv, g[m], rows, rows & (call == bool(lab)))
        out[s] = entry
    return out


def calibration(y, p, groups, train_prior: float, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Brier score, ECE and the reliability bins of p_covid as the head gives it (``raw``: a
    probability for a population at ``train_prior``, 0.5 after SMOTE) and corrected to the
    test set's COVID-19 share (``corrected``, :func:`covfeat.trust.calibration.prior_correct`),
    each with its patient-level interval."""
    y, p, g = np.asarray(y, int), np.asarray(p, float), _groups(groups)
    prevalence = float(y.mean())
    every = np.ones(len(y), bool)
    out = {"train_prior": float(train_prior), "test_prevalence": prevalence}
    for name, q in (("raw", p), ("corrected", prior_correct(p, train_prior, prevalence))):
        out[name] = {"brier": record(brier(y, q, g, n_boot=n_boot, seed=seed), g, every),
                     "ece": record(ece(y, q, g, n_boot=n_boot, seed=seed), g, every),
                     "reliability": [asdict(b) for b in reliability(y, q, g, n_boot=n_boot, seed=seed)]}
    return out


def predictive(y, p, groups, prevalence: float | None = None, threshold: float = 0.5, n_boot: int = N_BOOT,
               seed: int = 0) -> dict:
    """PPV and NPV at ``threshold`` for a COVID-19 prevalence: the stated one, or (None) the
    rows' own share, from their sensitivity and specificity
    (:func:`covfeat.trust.calibration.predictive_values`)."""
    y, g = np.asarray(y, int), _groups(groups)
    stated = prevalence is not None
    pi = float(prevalence) if stated else float(y.mean())
    ppv, npv = predictive_values(y, p, g, pi, threshold, n_boot=n_boot, seed=seed)
    call = np.asarray(p, float) >= threshold
    return {"prevalence": pi, "prevalence_from": "stated" if stated else "test set", "threshold": float(threshold),
            "ppv": record(ppv, g, np.ones(len(y), bool)), "npv": record(npv, g, np.ones(len(y), bool)),
            "called_covid": int(call.sum())}


def deciding_probabilities(y, p, weights, target: float) -> np.ndarray:
    """Per row of ``weights`` (resamples x rows): the probability of the COVID-19 row that
    decides a recall of ``target``, the highest p with a weighted share of COVID-19 rows at or
    above it of at least ``target`` (:func:`covfeat.trust.metrics.threshold_for_recall` with
    every weight 1 sits just below it)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    pos = np.flatnonzero(y == 1)
    pos = pos[np.argsort(-p[pos], kind="stable")]
    cum = np.cumsum(np.asarray(weights, float)[:, pos], 1)
    first = np.argmax(cum >= (target - 1e-12) * cum[:, -1:], 1)
    return p[pos][first]


def operating_point(y_val, p_val, groups_val, target: float, threshold: float, n_boot: int = N_BOOT,
                    seed: int = 0, level: float = LEVEL) -> dict:
    """What the threshold for a target recall rests on: the validation COVID-19 images and
    patients at or above it (k/n), its validation recall with the patient-level interval,
    and the threshold's own bootstrap interval (:data:`THRESHOLD_INTERVAL`)."""
    y, p, g = np.asarray(y_val, int), np.asarray(p_val, float), _groups(groups_val)
    cl = clusters(y, g, n_boot, seed)
    covid = y == 1
    rec = record(proportion_estimate(cl, p, "covid_recall", threshold).interval(level), g, covid,
                 covid & (p >= threshold))
    lo = hi = math.nan
    method = NONE
    if len(set(g[covid])) >= 2:
        reps = deciding_probabilities(y, p, cl.weights[:, cl.index], target)
        lo, hi = (float(np.quantile(reps, q)) for q in ((1 - level) / 2, (1 + level) / 2))
        method = THRESHOLD_INTERVAL
    return {"threshold_interval": {"value": float(threshold), "lo": lo, "hi": hi, "level": level, "method": method},
            "validation_recall": rec}
