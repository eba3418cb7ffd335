"""The external probe: the run scored on another labelled source at the same threshold(s) as its
own test (argmax, and the run's threshold when set), per source, with near-duplicates of the
run's own images left out (and listed).  It runs when other sources are given (--external)."""

from __future__ import annotations

import numpy as np

from covfeat.extraction.run import extract
from covfeat.head.runs import Run
from covfeat.probes.common import auc_text, config_from, extract_or_fail, group_bootstrap_auc, patient_groups
from covfeat.probes.probe import PROBES, Probe
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import by_source, classification_metrics
from covfeat.trust.neardup import find_pairs


def external_probe(run: Run, fc, sources, cache_dir, progress=True, keep_overlap: bool = False) -> dict:
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
        return {"status": "not testable", "verdict": "not testable: every external image is a near-duplicate of "
                "the run's own images.", "overlap": overlap_list}
    p = run.load_head().predict(ext.read_features(ext.originals(rows)), verbose=0)[:, 1]
    y = ext.manifest["label"][rows]
    src = ext.manifest["source"][rows]
    pr = run.predictions()
    thresholds = {"argmax": 0.5}
    if "operating_point" in run.metrics:
        thresholds["run threshold"] = run.threshold
    auc_int = group_bootstrap_auc(pr["label"], pr["p_covid"], patient_groups(fc, pr["row"]))
    auc_ext = group_bootstrap_auc(y, p, patient_groups(ext, rows))
    flags = []
    if not np.isnan(auc_ext[2]) and auc_ext[2] < auc_int[1]:
        flags.append(f"ROC AUC {auc_int[0]:.2f} -> {auc_ext[0]:.2f}")
    at = {}
    for name, thr in thresholds.items():
        m_int = classification_metrics(pr["label"], pr["p_covid"], thr)
        m_ext = classification_metrics(y, p, thr)
        at[name] = {"threshold": thr, "internal": m_int, "external": m_ext,
                    "external_by_source": by_source(y, p, src, thr)}
        for k in ("accuracy", "covid_recall", "specificity"):
            ci_int, ci_ext = m_int["ci"].get(k), m_ext["ci"].get(k)
            if ci_int and ci_ext and not np.isnan(ci_ext[1]) and not np.isnan(ci_int[0]) and ci_ext[1] < ci_int[0]:
                flags.append(f"{k} at {name} ({thr:.3f}) {m_int[k]:.2f} -> {m_ext[k]:.2f}")
    n_over = len({i for i, *_ in overlap})
    over = (f" {n_over} external image(s) are near-duplicates of the run's own and are "
            f"{'kept' if keep_overlap else 'left out'}." if overlap else " No external image is a near-duplicate "
            "of the run's own.")
    a = at["argmax"]
    text = ((f"FLAGGED: on the external data the run drops beyond its intervals ({'; '.join(flags)}); what it "
             "learned does not carry over." if flags else
             f"not flagged: external {auc_text(*auc_ext)} vs internal {auc_text(*auc_int)}; accuracy at argmax "
             f"{a['external']['accuracy']:.2f} vs {a['internal']['accuracy']:.2f}, within their intervals.")
            + over + " Both sides are scored at the same threshold(s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in thresholds.items()) + ". ("
            + ("it would clear if no external interval lay wholly below the internal one"
               if flags else "it would be flagged if an external interval lay wholly below the internal one")
            + ".)")
    return {"status": "FLAGGED" if flags else "not flagged", "verdict": text, "at": at,
            "roc_auc_internal": list(auc_int), "roc_auc_external": list(auc_ext), "overlap": overlap_list,
            "n_external": int(len(rows)), "sources": [str(s) for s in sources], "cache": str(ext.path)}


PROBES.register(Probe("external", lambda a: external_probe(a.run, a.fc, a.external, a.cache_dir, a.progress,
                                                           a.keep_overlap),
                      help="(with --external) external validation", on_request=lambda a: bool(a.external)))
