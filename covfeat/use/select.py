"""Choosing among runs without touching their test rows: by validation, or by cross-validation.

A run picked by its test score reports an optimistic test score: the maximum of several noisy
numbers is biased upward, and more so the more runs were tried.  :func:`select` (a sweep's
learning rates, ``reproduce``'s backbones) ranks runs by their validation rows, scored again
by the run's own head from its cache, or by the cross-validated mean of a ``--folds`` run, and
leaves the test rows to report the chosen run, once.  :func:`paired_differences` compares runs
on the same test rows through their paired patient-bootstrap differences, with Holm's
correction across the pairs (:mod:`covfeat.trust.intervals`).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError, DataError
from covfeat.head.runs import Run
from covfeat.head.split import VAL, patient_groups
from covfeat.trust.intervals import LEVEL, PROPORTIONS, RANKINGS, Interval, clusters, estimate, holm, paired_difference
from covfeat.trust.metrics import CV_INTERVAL

ON = ("validation", "cv")


def _cache(run: Run):
    return run.own_cache("scoring its validation rows needs it")


def validation_scores(run: str | Path | Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, the head's p_covid and patient groups of a run's validation images (its head on
    their cached original maps, as fit-head scored them).

    Raises
    ------
    DataError
        The run has no validation images of both classes.
    """
    run = (run if isinstance(run, Run) else Run(run)).require_single("selection on validation")
    fc = _cache(run)
    rows = np.flatnonzero((run.split(fc.n_rows) == VAL) & fc.has_features())
    y = np.asarray(fc.manifest["label"][rows], int)
    if len(set(y.tolist())) < 2:
        raise DataError(f"{run.path} has {int(y.sum())} COVID-19 and {int((1 - y).sum())} NORMAL validation images; "
                        "selection needs both. Fit with a larger --val, or with --folds and select on 'cv'.")
    # The head called on the maps directly: Keras's predict() would trace a new function per run of a sweep.
    p = np.asarray(run.load_head()(fc.read_features(fc.originals(rows)), training=False))[:, 1]
    return y, p.astype(float), patient_groups(fc, rows, run.fit_config().split.near_duplicates)


def score(run: str | Path | Run, metric: str = "roc_auc", on: str = "validation") -> Interval:
    """A run's ``metric`` on its validation images (patient-level interval), or its
    cross-validated mean and interval (``on="cv"``).

    Raises
    ------
    ConfigError, DataError, RunError
    """
    if on not in ON:
        raise ConfigError(f"on: expected one of {', '.join(ON)}, got {on!r}; a run chosen by its test rows reports "
                          "an optimistic test score.")
    if metric not in (*PROPORTIONS, *RANKINGS):
        raise ConfigError(f"metric: expected one of {', '.join([*PROPORTIONS, *RANKINGS])}, got {metric!r}.")
    run = run if isinstance(run, Run) else Run(run)
    if on == "cv":
        if not run.is_cv:
            raise ConfigError(f"on='cv': {run.path} is a single-split run; select it on 'validation'.")
        c = run.metrics["cv"][metric]
        return Interval(metric, c["mean"], c["lo"], c["hi"], LEVEL, CV_INTERVAL, (0, 0), (0, 0))
    y, p, groups = validation_scores(run)
    return estimate(clusters(y, groups), p, metric, run.threshold).interval()


def ranking(runs, metric: str = "roc_auc", on: str = "validation") -> list[tuple[Path, Interval]]:
    """Runs and their scores, best first (ties keep the given order)."""
    if not runs:
        raise ConfigError("select: expected at least one run, got none.")
    scored = [(Path(r.path if isinstance(r, Run) else r), score(r, metric, on)) for r in runs]
    for path, iv in scored:
        if np.isnan(iv.estimate):
            raise DataError(f"{path}: its {on} {metric} is undefined; it cannot be ranked.")
    return sorted(scored, key=lambda s: -s[1].estimate)


def select(runs, metric: str = "roc_auc", on: str = "validation") -> Path:
    """The run with the best ``metric`` on its validation images (``on="validation"``) or its
    cross-validated mean (``on="cv"``), never on its test images; the first on ties.

    Raises
    ------
    ConfigError, DataError, RunError
    """
    return ranking(runs, metric, on)[0][0]


def paired_differences(runs: dict[str, str | Path], metric: str = "roc_auc") -> list[dict]:
    """Every pair of single-split runs scored on the same test images: the paired difference
    of ``metric`` (patient bootstrap, the MOVER interval), its p-value and Holm's adjusted
    p-value across the pairs.

    Raises
    ------
    DataError
        The runs' test images differ (a paired comparison needs the same rows).
    """
    preds = {name: Run(r).require_single("a paired comparison").predictions() for name, r in runs.items()}
    names = list(preds)
    if len(names) < 2:
        return []
    first = preds[names[0]]
    order = {n: np.argsort(p["path"]) for n, p in preds.items()}
    paths = first["path"][order[names[0]]]
    for n in names[1:]:
        if not np.array_equal(preds[n]["path"][order[n]], paths):
            raise DataError(f"{names[0]} and {n} were tested on different images; a paired comparison needs the same "
                            "test rows (the same data, split settings and seed).")
    y = first["label"][order[names[0]]]
    groups = patient_groups(_cache(Run(runs[names[0]])), first["row"][order[names[0]]],
                            Run(runs[names[0]]).fit_config().split.near_duplicates)
    out = []
    for a, b in combinations(names, 2):
        d = paired_difference(y, preds[a]["p_covid"][order[a]], preds[b]["p_covid"][order[b]], groups, metric)
        out.append({"a": a, "b": b, "metric": metric, "difference": d.estimate, "lo": d.lo, "hi": d.hi,
                    "p_value": d.p_value, "method": d.method, "images": list(d.n_images),
                    "patient_groups": list(d.n_groups)})
    for row, adj in zip(out, holm([r["p_value"] for r in out])):
        row["holm_p"] = float(adj)
    return out
