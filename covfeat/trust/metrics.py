"""Metrics: the paper's Table 2 block, AUCs, intervals, and the operating-point choice.

scikit-learn computes the metrics and curves, scipy the Wilson and t intervals; this
module decides which numbers a report shows and how they are named -- the one list of
them, :data:`METRIC_ROWS`, that reports, cross-validation and ``reproduce`` all use.  The
image-level Wilson intervals here (``ci``, ``by_source``) stay for the callers that read
them; the patient-level intervals a report prints are :mod:`covfeat.trust.evaluation`'s.
"""

from __future__ import annotations

import math

import numpy as np

# (label in reports, key in metrics.json): the paper's Table 2 first, then covfeat's additions.
METRIC_ROWS = [
    ("COVID-19 precision", "covid_precision"), ("COVID-19 recall", "covid_recall"), ("COVID-19 f1", "covid_f1"),
    ("NORMAL precision", "normal_precision"), ("NORMAL recall", "normal_recall"), ("NORMAL f1", "normal_f1"),
    ("TP", "TP"), ("FP", "FP"), ("FN", "FN"), ("TN", "TN"), ("accuracy", "accuracy"),
    ("specificity", "specificity"), ("ROC AUC", "roc_auc"), ("PR AUC", "pr_auc"),
    ("test COVID-19 images", "n_covid"), ("test NORMAL images", "n_normal"),
]


METRIC_KEYS = [k for _, k in METRIC_ROWS]


TABLE2_KEYS = METRIC_KEYS[:METRIC_KEYS.index("accuracy") + 1]  # the cells the paper published


COUNT_KEYS = {"TP", "FP", "FN", "TN", "n_covid", "n_normal"}


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (nan, nan when n == 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def classification_metrics(y_true, p_covid, threshold: float = 0.5) -> dict:
    """Table 2 (per-class precision/recall/f1, TP/FP/FN/TN, accuracy) plus AUCs, counts
    and Wilson intervals; COVID-19 (label 1) is the positive class."""
    from sklearn.metrics import (
        average_precision_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y_true, int)
    p = np.asarray(p_covid, float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=[1, 0], zero_division=np.nan)
    both = len(np.unique(y)) == 2
    out = {
        "threshold": float(threshold),
        "covid_precision": float(prec[0]), "covid_recall": float(rec[0]), "covid_f1": float(f1[0]),
        "normal_precision": float(prec[1]), "normal_recall": float(rec[1]), "normal_f1": float(f1[1]),
        "TP": int(tp), "FP": int(fp), "FN": int(fn), "TN": int(tn),
        "accuracy": float((tp + tn) / max(len(y), 1)),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "n_covid": int(support[0]), "n_normal": int(support[1]),
    }
    out["ci"] = {
        "covid_recall": wilson(tp, tp + fn), "covid_precision": wilson(tp, tp + fp),
        "normal_recall": wilson(tn, tn + fp), "normal_precision": wilson(tn, tn + fn),
        "specificity": wilson(tn, tn + fp), "accuracy": wilson(tp + tn, len(y)),
    }
    return out


THRESHOLD_MARGIN = 1e-5  # how far below the deciding probability the threshold sits, at most


def threshold_for_recall(y_true, p_covid, target: float) -> float:
    """A threshold whose COVID-19 recall on (validation) rows reaches ``target``: just below
    the probability of the row that decides it.

    Not at that probability itself: the same head computed elsewhere (Keras in ``covfeat
    predict`` and ``export``, compiled code in fit-head) agrees to about 1e-6, and a threshold
    equal to one row's probability would label that row differently half of the time.  It
    sits ``THRESHOLD_MARGIN`` lower, but never past the midpoint to the next lower
    probability, so every validation row keeps its label.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, int)
    p = np.asarray(p_covid, float)
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    if y.sum() == 0:
        raise ValueError("no COVID-19 rows to choose a threshold on")
    _, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))
    t = float(min(thr[i], 1.0))
    below = p[p < t]
    floor = (t + float(below.max())) / 2 if len(below) else t - THRESHOLD_MARGIN
    return max(t - THRESHOLD_MARGIN, floor)


def by_source(y_true, p_covid, sources, threshold: float = 0.5) -> dict:
    """Per source of the test rows: COVID-19 recall and NORMAL specificity at ``threshold``,
    each as [value, lo, hi, k, n] (Wilson interval, the counts behind it)."""
    y = np.asarray(y_true, int)
    pred = (np.asarray(p_covid, float) >= threshold).astype(int)
    src = np.asarray(sources).astype(str)
    out = {}
    for s in sorted(set(src)):
        m = src == s
        entry = {"n_covid": int((y[m] == 1).sum()), "n_normal": int((y[m] == 0).sum())}
        for key, lab, hit in (("covid_recall", 1, 1), ("specificity", 0, 0)):
            sel = m & (y == lab)
            n = int(sel.sum())
            if n:
                k = int((pred[sel] == hit).sum())
                entry[key] = [k / n, *wilson(k, n), k, n]
        out[s] = entry
    return out


CV_INTERVAL = ("approximate 95% interval: Nadeau-Bengio corrected variance of the fold scores, "
               "t with folds - 1 degrees of freedom")


def cv_interval(values, test_over_train: float, folds: int, level: float = 0.95,
                bounds: tuple[float, float] | None = None) -> dict:
    """Mean of per-fold scores (every fold of every repeat) and an approximate interval that
    does not shrink with repeats alone.

    The fold scores share training data, so they are not independent: the Nadeau-Bengio
    corrected variance (1/J + n_test/n_train) * s^2 replaces s^2 / J, with J the number of
    scores, and the t quantile uses ``folds - 1`` degrees of freedom (the number of
    independent test partitions of one repeat), so repeating a k-fold cross-validation never
    gives a narrower interval than one repeat justifies.  Undefined fold scores (nan, e.g.
    precision when a fold made no positive call) are counted, not silently dropped.
    ``bounds`` clips the interval to the range the metric can take ((0, 1) for proportions
    and AUCs: the t interval is symmetric and would otherwise reach past 1, as [0.88, 1.06]).
    """
    from scipy.stats import t

    raw = [np.nan if x is None else float(x) for x in values]
    v = np.array([x for x in raw if not math.isnan(x)], float)
    out = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": int(len(v)),
           "undefined": int(len(raw) - len(v))}
    if len(v) == 0:
        return out
    out["mean"] = float(v.mean())
    if len(v) >= 2 and folds >= 2:
        var = (1.0 / len(v) + test_over_train) * float(v.var(ddof=1))
        half = float(t.ppf(0.5 + level / 2, folds - 1) * math.sqrt(var))
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
        if bounds is not None:
            out["lo"], out["hi"] = max(out["lo"], bounds[0]), min(out["hi"], bounds[1])
    return out
