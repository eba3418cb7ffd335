"""What the probes share: AUC intervals that resample patients, the words for them, patient
groups, a grouped cross-validated logistic regression, and running stage one again with the
run's own settings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from covfeat.core.errors import CacheLocked
from covfeat.extraction.backbones import weights_from_config
from covfeat.extraction.config import ExtractConfig
from covfeat.head.config import SplitConfig
from covfeat.head.fit import usable_pairs
from covfeat.head.split import groups_for

N_BOOT = 1000


def group_bootstrap_auc(y, p, groups=None, n: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """ROC AUC and a percentile-bootstrap 95% interval that resamples whole groups (patients),
    so several images of one patient count once; (nan, nan, nan) with one class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, int)
    p = np.asarray(p, float)
    if len(np.unique(y)) < 2:
        return (float("nan"),) * 3
    groups = np.arange(len(y)).astype(str) if groups is None else np.asarray(groups).astype(str)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if len(np.unique(y[idx])) == 2:
            stats.append(roc_auc_score(y[idx], p[idx]))
    return float(roc_auc_score(y, p)), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def separation(auc: float, lo: float, hi: float) -> str:
    """Words for an AUC interval: below chance, near chance, partial or full separation."""
    if np.isnan(auc):
        return "not testable"
    if hi < 0.5:
        return "below chance"
    if lo <= 0.5:
        return "near chance"
    if lo >= 0.9:
        return "full separation"
    return "partial separation"


def auc_text(auc, lo, hi) -> str:
    return f"ROC AUC {auc:.2f} [95% CI {lo:.2f}, {hi:.2f}]"


def what_would_change(kind: str) -> str:
    """What would change a separation verdict."""
    return {"below chance": "it would read near chance if the interval reached 0.50",
            "near chance": "it would be flagged if the interval's lower end rose above 0.50",
            "partial separation": "it would read near chance if the interval's lower end fell to 0.50, "
                                  "and full separation at 0.90",
            "full separation": "it would read partial separation if the interval's lower end fell below 0.90"}.get(
        kind, "more images of both classes would make it testable")


def patient_groups(fc, rows, pairs_mode="group"):
    """Patient groups of manifest ``rows``, joined with the cache's near-duplicates."""
    return groups_for(fc.manifest["patient_id"][rows], "patient",
                      usable_pairs(fc, SplitConfig(near_duplicates=pairs_mode), rows))


def cv_probabilities(X, y, groups, seed: int = 0, C: float = 1.0) -> np.ndarray:
    """Out-of-fold P(class 1) of a standardised logistic regression, folds grouped by patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(5, int(np.bincount(y).min()), len(np.unique(groups)))
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
