"""Calibration and prevalence: is p_covid a probability, and what do the calls mean at a
prevalence other than the test set's?

A head trained on SMOTE-balanced rows learns toward a 50/50 prior, so its p_covid is a
probability only for a population with half its patients ill; :func:`prior_correct` moves
it to a stated prevalence.  The Brier score, the expected calibration error and the
reliability diagram say how far the probabilities are from observed frequencies, each with
the patient-level interval of :mod:`covfeat.trust.intervals` (groups resampled, stratified
by class).  :func:`predictive_values` gives PPV and NPV at a stated prevalence from
sensitivity and specificity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from covfeat.core.errors import DataError
from covfeat.trust.intervals import (
    LEVEL,
    N_BOOT,
    WILSON,
    Clusters,
    Estimate,
    Interval,
    clusters,
    interval_method,
    kish,
    proportion_estimate,
    ratio_estimate,
)

BINS = 10


def _prior(name: str, value: float) -> float:
    if not 0 < value < 1:
        raise DataError(f"{name} must be a COVID-19 share strictly between 0 and 1, got {value}.")
    return float(value)


def effective_prior(n_covid: int, n_normal: int, weight_covid: float = 1.0, weight_normal: float = 1.0) -> float:
    """The COVID-19 prior a head was trained toward: its training rows' share, weighted by the
    class weights of the loss (SMOTE to balance: 0.5)."""
    a, b = n_covid * weight_covid, n_normal * weight_normal
    return _prior("The training prior", a / (a + b) if a + b else math.nan)


def prior_correct(p, train_prior: float, target_prior: float) -> np.ndarray:
    """p_covid moved from the prior it was trained toward (``train_prior``, 0.5 after SMOTE) to
    the prevalence ``target_prior`` of the population it is read for, by Bayes' rule on the
    odds (Saerens, Latinne & Decaestecker 2002, Neural Comput 14:21; Elkan 2001, IJCAI):
    p' = p pi / tau / (p pi / tau + (1 - p)(1 - pi) / (1 - tau)), pi the target, tau the
    training prior.  Exact when the head is calibrated at its training prior and only the
    prior differs (the images of each class look the same in both populations)."""
    tau, pi = _prior("The training prior", train_prior), _prior("The target prevalence", target_prior)
    p = np.asarray(p, float)
    if np.any((p < 0) | (p > 1)):
        raise DataError("Probabilities must lie in [0, 1].")
    a, b = p * pi / tau, (1 - p) * (1 - pi) / (1 - tau)
    return a / (a + b)


def brier(y, p, groups, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Brier score, the mean of (p_covid - y)^2 over images (0 is perfect), with its
    patient-level interval (cluster bootstrap, logit-t; see covfeat.trust.intervals)."""
    cl = clusters(y, groups, n_boot, seed)
    p = _probabilities(p, cl)
    return ratio_estimate(cl, "brier", (p - cl.y) ** 2, np.ones(len(p))).interval(level)


def _probabilities(p, cl: Clusters) -> np.ndarray:
    p = np.asarray(p, float)
    if p.shape != cl.y.shape or np.any((p < 0) | (p > 1)):
        raise DataError(f"Expected one probability in [0, 1] per row ({len(cl.y)}), got shape {p.shape}.")
    return p


def bin_of(p: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Equal-mass bins: edges at the 1/bins quantiles of p_covid, so each bin holds about as many
    images (equal-width bins leave most bins of a confident head empty).  Tied edges merge
    bins, so there may be fewer than ``bins``.  Edges are fixed from the whole set and kept
    in every resample."""
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, p, "right")


def ece(y, p, groups, bins: int = BINS, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Expected calibration error over equal-mass bins (:func:`bin_of`): sum over bins of the
    share of images times |mean p_covid - observed COVID-19 fraction| (Naeini et al. 2015),
    with its patient-level interval.  The binned ECE is biased upward at small counts (an
    absolute value of noise); the interval is of this estimate, not of a debiased one."""
    cl = clusters(y, groups, n_boot, seed)
    p = _probabilities(p, cl)
    b = bin_of(p, bins)
    G, K = cl.weights.shape[1], int(b.max()) + 1
    D = np.zeros((G, K))
    np.add.at(D, (cl.index, b), p - cl.y)  # per group and bin: sum of p - y
    n = np.bincount(cl.index, minlength=G).astype(float)
    value = float(np.abs(D.sum(0)).sum() / n.sum())
    reps = np.abs(cl.weights @ D).sum(1) / (cl.weights @ n)
    groups_per_class = tuple(len(set(cl.index[cl.y == c])) for c in (1, 0))
    m = min(groups_per_class)
    return Estimate("ece", value, reps if m >= 2 else None, m, kish(n[n > 0]),
                    tuple(int((cl.y == c).sum()) for c in (1, 0)), groups_per_class,
                    float(cl.y.mean())).interval(level)


@dataclass(frozen=True)
class ReliabilityBin:
    """One point of a reliability diagram: the bin's p_covid range and mean, the observed
    COVID-19 fraction with its interval (``method`` as in covfeat.trust.intervals), and the
    images and patient groups in it."""
    p_low: float
    p_high: float
    mean_predicted: float
    observed: float
    lo: float
    hi: float
    method: str
    count: int
    groups: int


def reliability(y, p, groups, bins: int = BINS, level: float = LEVEL, n_boot: int = N_BOOT,
                seed: int = 0) -> list[ReliabilityBin]:
    """The reliability diagram's bins (equal-mass, :func:`bin_of`).  Each bin's observed
    fraction is a proportion over its images: Wilson's interval where every group has one
    image in the bin, else the cluster bootstrap's, on the same resamples for every bin."""
    cl = clusters(y, groups, n_boot, seed)
    p = _probabilities(p, cl)
    b = bin_of(p, bins)
    out = []
    for k in np.unique(b):
        inside = b == k
        est = ratio_estimate(cl, "observed", cl.y * inside, inside.astype(float))
        if interval_method(cl.index[inside]) == WILSON:
            est = replace(est, replicates=None, wilson_k=int(cl.y[inside].sum()))
        iv = est.interval(level)
        out.append(ReliabilityBin(float(p[inside].min()), float(p[inside].max()), float(p[inside].mean()),
                                  iv.estimate, iv.lo, iv.hi, iv.method, int(inside.sum()),
                                  len(set(cl.index[inside]))))
    return out


def _ppv(se, sp, pi):
    return se * pi / (se * pi + (1 - sp) * (1 - pi)) if se * pi + (1 - sp) * (1 - pi) > 0 else math.nan


def _npv(se, sp, pi):
    return sp * (1 - pi) / (sp * (1 - pi) + (1 - se) * pi) if sp * (1 - pi) + (1 - se) * pi > 0 else math.nan


def predictive_values(y, p, groups, prevalence: float, threshold: float = 0.5, level: float = LEVEL,
                      n_boot: int = N_BOOT, seed: int = 0) -> tuple[Interval, Interval]:
    """PPV and NPV at a stated COVID-19 prevalence, by Bayes' rule from sensitivity (COVID-19
    recall) and specificity: PPV = se pi / (se pi + (1 - sp)(1 - pi)), NPV = sp (1 - pi) /
    (sp (1 - pi) + (1 - se) pi).  Both rise with se and with sp, so their limits are those of
    the corners of the (se, sp) intervals, each taken at level 1 - alpha/2 (Bonferroni): when
    both cover, so does the result, and that happens with probability >= 1 - alpha.
    Conservative, and it needs no model of the correlation between se and sp."""
    pi = _prior("The prevalence", prevalence)
    cl = clusters(y, groups, n_boot, seed)
    inner = 1 - (1 - level) / 2
    se, sp = (proportion_estimate(cl, p, k, threshold) for k in ("covid_recall", "specificity"))
    a, b = se.interval(inner), sp.interval(inner)
    n_images, n_groups = (se.n_images[0], sp.n_images[1]), (se.n_groups[0], sp.n_groups[1])
    method = f"Bayes from {a.method} se and {b.method} sp at {inner:g} each"
    return tuple(Interval(name, float(f(se.value, sp.value, pi)), f(a.lo, b.lo, pi), f(a.hi, b.hi, pi), level, method,
                          n_images, n_groups) for name, f in (("ppv", _ppv), ("npv", _npv)))
