"""The source probe asks two questions.

Is the source balanced across classes?  A source that holds images of one class only carries
that class in where the image was taken (:mod:`covfeat.trust.confounding`, which the report's
banner uses too): when every image of each class comes from sources of its own, any
classifier of the classes is also a classifier of their source, and no probe can tell them
apart.

Can the source be told apart within a class?  Within a class that has two or more sources, a
patient-grouped cross-validated logistic regression from pooled features to the source: an
AUC beyond the margin above chance means the source leaves a mark a classifier can use.
"""

from __future__ import annotations

import numpy as np

from covfeat.head.model import pooled_mean
from covfeat.head.split import patient_groups
from covfeat.probes.common import auc_interval, auc_text, cv_probabilities, needed_text, verdict_fields, versus_chance
from covfeat.probes.probe import PROBES, Probe
from covfeat.trust.confounding import confounding, statement
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE, MARGIN

CLASSES = ((1, "COVID-19"), (0, "NORMAL"))


def within_class(name: str, srcs: list[str], y, p, groups, margin: float = MARGIN, seed: int = 0) -> dict:
    """Question two for one class: out-of-fold P(``srcs[1]``) against the source, read three ways."""
    iv = auc_interval(y, p, groups, seed)
    v = versus_chance(iv, margin)
    names = (srcs[1], srcs[0])  # y is 1 for srcs[1]: its patients are counted first
    said = f"the features tell {srcs[0]} from {srcs[1]} with {auc_text(iv, names)}, margin {margin:.2f}"
    body = {FLAGGED: f"{said}: beyond the margin from chance; the source leaves a mark a classifier can use.",
            CLEAR: f"{said}: within the margin of chance; the features do not tell these sources apart by more "
                   "than the margin.",
            INCONCLUSIVE: f"{said}: neither beyond the margin from chance nor within it; "
                          f"{needed_text(v.needed, v.needed_for, names)}."}[v.status]
    return {"status": v.status, "verdict": f"{v.status}: within {name}, {body}", "reading": body,
            "roc_auc": [iv.estimate, iv.lo, iv.hi], "sources": srcs[:2], "n": [int((y == 0).sum()), int((y == 1).sum())],
            **verdict_fields(v)}


def balance(by_class: dict[str, dict[str, int]]) -> tuple[str, bool]:
    """Question one in words, and whether every class comes wholly from sources of its own."""
    said = statement(by_class)
    whole = all(c.whole for c in confounding(by_class).values() if c.n)
    if said is None:
        shares = []
        for s in sorted({s for v in by_class.values() for s in v}):
            n = {k: by_class.get(k, {}).get(s, 0) for _, k in CLASSES}
            shares.append(f"{s} {n['COVID-19']}/{n['COVID-19'] + n['NORMAL']}")
        return "every source holds images of both classes (COVID-19 images per source: " + ", ".join(shares) + ")", False
    return said, whole


def source_probe(fc, seed: int = 0, margin: float = MARGIN) -> dict:
    """Both questions on the images with features: the per-class source table and what it says,
    and within each class with two or more sources (5+ images each), the two largest told
    apart.  FLAGGED when every class comes wholly from sources of its own, or a within-class
    reading is FLAGGED; CLEAR when every within-class reading is CLEAR and no class is wholly
    confounded; else INCONCLUSIVE."""
    man = fc.manifest
    rows = np.flatnonzero(fc.usable())  # as fit-head's split: no label-conflicted copies
    by_class = {}
    for lab, name in CLASSES:
        srcs, counts = np.unique(man["source"][rows][man["label"][rows] == lab], return_counts=True)
        by_class[name] = dict(zip(srcs.tolist(), counts.tolist()))
    balanced, whole = balance(by_class)
    results = {}
    for lab, name in CLASSES:
        srcs = sorted((s for s, c in by_class[name].items() if c >= 5), key=lambda s: -by_class[name][s])
        if len(srcs) < 2:
            continue
        r = rows[(man["label"][rows] == lab) & np.isin(man["source"][rows], srcs[:2])]
        y = (man["source"][r] == srcs[1]).astype(int)
        groups = patient_groups(fc, r)
        p = cv_probabilities(pooled_mean(fc.read_features(fc.originals(r))), y, groups, seed, C=0.1)
        if np.isnan(p).any():
            continue
        results[name] = within_class(name, srcs, y, p, groups, margin, seed)
    states = [v["status"] for v in results.values()]
    status = (FLAGGED if whole or FLAGGED in states else CLEAR if states and set(states) == {CLEAR} else INCONCLUSIVE)
    first = f"{balanced}: any classifier of these classes is also a classifier of their source" if whole else balanced
    within = (" ".join(f"Within {k} ({v['status']}), {v['reading']}" for k, v in results.items()) if results else
              "No class has two sources with at least 5 images each, so the source cannot be told apart within a "
              "class.")
    advice = " Add images of both classes from one source, a second source for a class, or use --external." if whole else ""
    text = f"{status}: {first}. {within}{advice}"
    out = {"status": status, "verdict3": status, "verdict": text, "balance": balanced, "confounded": whole,
           "sources_by_class": by_class, "margin": margin}
    if results:
        out["by_class"] = results
    return out


PROBES.register(Probe("source", lambda a: source_probe(a.fc, seed=a.seed, margin=a.margin)))
