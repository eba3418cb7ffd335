"""The source probe: within a class that has two or more sources, how well do the features
tell them apart?  When each class has one source, source and diagnosis are confounded, and
any classifier of the classes is also a classifier of their source."""

from __future__ import annotations

import numpy as np

from covfeat.head.model import pooled_mean
from covfeat.probes.common import (
    auc_text,
    cv_probabilities,
    group_bootstrap_auc,
    patient_groups,
    separation,
    what_would_change,
)
from covfeat.probes.probe import PROBES, Probe


def source_probe(fc, seed: int = 0) -> dict:
    """Within a class with two or more sources: cross-validated (grouped by patient) logistic
    regression from pooled features to the source."""
    man = fc.manifest
    rows = np.flatnonzero(fc.has_features())
    by_class = {}
    for lab, name in ((1, "COVID-19"), (0, "NORMAL")):
        srcs, counts = np.unique(man["source"][rows][man["label"][rows] == lab], return_counts=True)
        by_class[name] = dict(zip(srcs.tolist(), counts.tolist()))
    results = {}
    for lab, name in ((1, "COVID-19"), (0, "NORMAL")):
        srcs = sorted((s for s, c in by_class[name].items() if c >= 5), key=lambda s: -by_class[name][s])
        if len(srcs) < 2:
            continue
        r = rows[(man["label"][rows] == lab) & np.isin(man["source"][rows], srcs[:2])]
        y = (man["source"][r] == srcs[1]).astype(int)
        groups = patient_groups(fc, r)
        p = cv_probabilities(pooled_mean(fc.read_features(fc.originals(r))), y, groups, seed, C=0.1)
        if np.isnan(p).any():
            continue
        auc, lo, hi = group_bootstrap_auc(y, p, groups, seed=seed)
        kind = separation(auc, lo, hi)
        flagged = kind in ("partial separation", "full separation")
        text = (f"{'FLAGGED' if flagged else 'not flagged'}: within {name}, the features give {kind} of "
                f"{srcs[0]} from {srcs[1]}, {auc_text(auc, lo, hi)}"
                + ("; the source leaves a mark a classifier can use" if flagged else "")
                + f". ({what_would_change(kind)}.)")
        results[name] = {"status": "FLAGGED" if flagged else "not flagged", "separation": kind, "verdict": text,
                         "roc_auc": [auc, lo, hi], "sources": srcs[:2], "n": [int((y == 0).sum()), int((y == 1).sum())]}
    single = {n: list(v) for n, v in by_class.items() if len(v) == 1}
    if not results:
        confounded = len(single) == 2 and single["COVID-19"] != single["NORMAL"]
        text = ("CONFOUNDED: every COVID-19 image comes from " + ", ".join(single.get("COVID-19", [])) +
                " and every NORMAL image from " + ", ".join(single.get("NORMAL", [])) +
                "; the source cannot be probed within a class, and any classifier of these classes is also a "
                "classifier of their source. Add images of both classes from one source, a second source for a "
                "class, or use --external."
                if confounded else "not testable: no class has two sources with at least 5 images each.")
        return {"status": "CONFOUNDED" if confounded else "not testable", "verdict": text,
                "sources_by_class": by_class}
    worst = max(results.values(), key=lambda v: v["roc_auc"][1])
    return {"status": worst["status"], "verdict": worst["verdict"], "by_class": results, "sources_by_class": by_class}


PROBES.register(Probe("source", lambda a: source_probe(a.fc, seed=a.seed)))
