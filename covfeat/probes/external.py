"""The external probe: the run scored on another labelled source at the same threshold(s) as its
own test (argmax, and the run's threshold when set), per source, with near-duplicates of the
run's own images left out (and listed).  It runs when other sources are given (--external).

The rows differ, so each comparison is an unpaired difference of like with like (recall with
recall, specificity with specificity, AUC with AUC; never accuracy, which moves with
prevalence), each side with its own patient-level interval; it flags by the interval of the
difference against the margin, not by whether two intervals overlap."""

from __future__ import annotations

import numpy as np

from covfeat.extraction.run import extract
from covfeat.head.runs import Run
from covfeat.head.split import patient_groups
from covfeat.probes.common import (
    ALPHA,
    auc_interval,
    auc_text,
    beyond_margin,
    config_from,
    extract_or_fail,
    needed_text,
)
from covfeat.probes.probe import PROBES, Probe
from covfeat.store.reader import open_cache
from covfeat.trust.intervals import (
    CLEAR,
    FLAGGED,
    INCONCLUSIVE,
    MARGIN,
    clusters,
    estimate,
    holm,
    unpaired_difference,
    verdict,
)
from covfeat.trust.metrics import by_source, classification_metrics
from covfeat.trust.neardup import find_pairs


def external_probe(run: Run, fc, sources, cache_dir, progress=True, keep_overlap: bool = False,
                   margin: float = MARGIN, seed: int = 0) -> dict:
    """The run on another labelled source, at the same thresholds as its own test, per source,
    with near-duplicates of the run's own images left out (and listed)."""
    ext = open_cache(extract_or_fail(extract(sources, config_from(fc, augment=0), cache_dir, progress=progress)))
    rows = np.flatnonzero(ext.has_features())
    mine = np.flatnonzero(fc.has_features())
    h_ext, t_ext = ext.fingerprints(rows)
    h_own, t_own = fc.fingerprints(mine)
    overlap = find_pairs(h_ext, t_ext, h_own, t_own)
    overlap_list = [[str(ext.manifest["path"][rows[i]]), str(fc.manifest["path"][mine[j]]), d, c]
                    for i, j, d, c in overlap]
    if not keep_overlap and overlap:
        rows = np.delete(rows, sorted({i for i, *_ in overlap}))
    if not len(rows):
        return {"status": INCONCLUSIVE, "verdict3": INCONCLUSIVE, "verdict": "INCONCLUSIVE: every external image is a "
                "near-duplicate of the run's own images, so nothing is left to score.", "overlap": overlap_list}
    p = run.load_head().predict(ext.read_features(ext.originals(rows)), verbose=0)[:, 1]
    y = ext.manifest["label"][rows]
    src = ext.manifest["source"][rows]
    pr = run.predictions()
    thresholds = {"argmax": 0.5}
    if "operating_point" in run.metrics:
        thresholds["run threshold"] = run.threshold
    g_int, g_ext = patient_groups(fc, pr["row"]), patient_groups(ext, rows)
    auc_int, auc_ext = auc_interval(pr["label"], pr["p_covid"], g_int, seed), auc_interval(y, p, g_ext, seed)
    at = {}
    for name, thr in thresholds.items():
        at[name] = {"threshold": thr, "internal": classification_metrics(pr["label"], pr["p_covid"], thr),
                    "external": classification_metrics(y, p, thr), "external_by_source": by_source(y, p, src, thr)}
    comps = comparisons(pr["label"], pr["p_covid"], g_int, y, p, g_ext, src, thresholds, margin, seed)
    n_over = len({i for i, *_ in overlap})
    over = (f" {n_over} external image(s) are near-duplicates of the run's own and are "
            f"{'kept' if keep_overlap else 'left out'}." if overlap else " No external image is a near-duplicate "
            "of the run's own.")
    status, text = external_verdict(comps, auc_int, auc_ext, margin)
    text += over + " Both sides are scored at the same threshold(s): " + ", ".join(
        f"{k} {v:.3f}" for k, v in thresholds.items()) + "."
    return {"status": status, "verdict3": status, "verdict": text, "at": at, "comparisons": comps, "margin": margin,
            "roc_auc_internal": [auc_int.estimate, auc_int.lo, auc_int.hi],
            "roc_auc_external": [auc_ext.estimate, auc_ext.lo, auc_ext.hi], "overlap": overlap_list,
            "n_external": int(len(rows)), "sources": [str(s) for s in sources], "cache": str(ext.path)}


def comparisons(y_int, p_int, g_int, y_ext, p_ext, g_ext, src, thresholds: dict, margin: float = MARGIN,
                seed: int = 0) -> list[dict]:
    """Like with like, each side with its own patient-level interval, joined unpaired (the rows
    differ): ROC AUC with ROC AUC over the whole external set, and at each threshold COVID-19
    recall with recall and specificity with specificity, per external source.  Never accuracy
    or precision, which move with prevalence alone.  Each gets its three-way verdict against no
    difference and its p-value against the margin it lies beyond.  The AUC, free of threshold
    and prevalence, is the primary comparison and is read at 95% on its own; the per-source
    recall and specificity comparisons are a family, and their p-values are Holm-adjusted."""
    cl_int = clusters(y_int, g_int, seed=seed)
    wanted = []  # (what, metric, threshold, external rows)
    if len(np.unique(y_ext)) == 2:
        wanted.append(("the whole external set", "roc_auc", 0.5, np.ones(len(y_ext), bool)))
    for name, thr in thresholds.items():
        for s in sorted(set(src.tolist())):
            here = src == s
            for metric, c in (("covid_recall", 1), ("specificity", 0)):
                if (y_ext[here] == c).any():
                    wanted.append((f"{s} at {name} ({thr:.3f})", metric, thr, here))
    out = []
    for what, metric, thr, here in wanted:
        a = estimate(clusters(y_ext[here], g_ext[here], seed=seed), p_ext[here], metric, thr)
        b = estimate(cl_int, p_int, metric, thr)
        d = unpaired_difference(a, b)
        v = verdict(d, 0.0, margin)
        beyond = beyond_margin(d, lambda null: unpaired_difference(a, b, null=null), margin)
        out.append({"where": what, "metric": metric, "threshold": thr, "external": a.value, "internal": b.value,
                    "difference": d.estimate, "interval": [d.lo, d.hi], "verdict3": v.status,
                    "needed_patients": list(v.needed) if v.needed else None, "needed_for": v.needed_for,
                    "p_beyond_margin": beyond, "external_patients": list(a.n_groups),
                    "external_images": list(a.n_images)})
    family = [c for c in out if c["metric"] != "roc_auc"]
    for c, ph in zip(family, holm([c["p_beyond_margin"] for c in family])):
        c["p_holm"] = float(ph)
    for c in out:
        c.setdefault("p_holm", c["p_beyond_margin"])  # the primary comparison, on its own
    return out


NAMES = {"roc_auc": "ROC AUC", "covid_recall": "COVID-19 recall", "specificity": "specificity"}


def _line(c: dict) -> str:
    return (f"{NAMES[c['metric']]}, {c['where']}: {c['external']:.2f} vs {c['internal']:.2f} internal, "
            f"{c['difference']:+.2f} [95% CI {c['interval'][0]:+.2f}, {c['interval'][1]:+.2f}]")


def external_verdict(comps: list[dict], auc_int, auc_ext, margin: float) -> tuple[str, str]:
    """FLAGGED when some external number falls below its internal one by more than the margin
    (its interval wholly below minus the margin, and, for recall and specificity, its
    Holm-adjusted p-value within 0.05);
    CLEAR when every one is within the margin or above it by more; else INCONCLUSIVE."""
    drops = [c for c in comps if c["verdict3"] == FLAGGED and c["difference"] < 0 and c["p_holm"] <= ALPHA]
    fine = [c for c in comps if c["verdict3"] == CLEAR or (c["verdict3"] == FLAGGED and c["difference"] > 0
                                                           and c["p_holm"] <= ALPHA)]
    aucs = f"external {auc_text(auc_ext)} vs internal {auc_text(auc_int)}"
    k = sum(c["metric"] != "roc_auc" for c in comps)
    fam = f"margin {margin:.2f}; ROC AUC on its own, the {k} recall and specificity comparison(s) Holm-adjusted"
    if drops:
        return FLAGGED, (f"FLAGGED: on the external data the run falls below its own test by more than the margin "
                         f"({fam}): {'; '.join(map(_line, drops))}; {aucs}. What it learned does not carry over "
                         "whole. (It would not be flagged if no such interval lay wholly below "
                         f"{-margin:+.2f}.)")
    if comps and len(fine) == len(comps):
        return CLEAR, (f"CLEAR: every external number is within the margin of the run's own test, or above it ({fam}): "
                       f"{'; '.join(map(_line, comps))}; {aucs}.")
    open_ = [c for c in comps if c not in fine]
    worst = max(open_, key=lambda c: c["interval"][1] - c["interval"][0], default=None)
    need = "" if worst is None else (f" For {NAMES[worst['metric']]}, {worst['where']}: "
                                     f"{needed_text(worst['needed_patients'], worst['needed_for'])}.")
    return INCONCLUSIVE, (f"INCONCLUSIVE: no external number falls below the run's own test by more than the margin, "
                          f"but not all are shown within it ({fam}): {'; '.join(map(_line, open_)) or 'nothing to compare'}"
                          f"; {aucs}.{need}")


PROBES.register(Probe("external", lambda a: external_probe(a.run, a.fc, a.external, a.cache_dir, a.progress,
                                                           a.keep_overlap, a.margin, a.seed),
                      help="(with --external) external validation", on_request=lambda a: bool(a.external)))
