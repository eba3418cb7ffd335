"""How a run's stored numbers read in a report: each cell of Table 2 with its interval, the
images and patients behind it and which interval it is; the per-source rows, the
calibration and prevalence rows, and the line that says when test recall missed its target.

Formatting only: every number comes from metrics.json as fit-head wrote it
(:mod:`covfeat.trust.evaluation`), so a report never recomputes what a run measured.
"""

from __future__ import annotations

import math

from covfeat.trust.intervals import CLUSTER, NONE, SCORE, WILSON
from covfeat.trust.metrics import COUNT_KEYS, METRIC_ROWS

METHOD_TAGS = {WILSON: "Wilson", CLUSTER: "patient bootstrap", SCORE: "patient score", NONE: "no interval"}
INTERVALS_NOTE = ("Intervals (95%) resample patient groups (patients joined by near-duplicates), stratified by class: "
                  "patient bootstrap (logit-t), patient score where the bootstrap has no spread, Wilson on images "
                  "only where every patient has one image; no interval where a class has one patient")


def behind(rec: dict) -> str:
    """The images and patients a number rests on: "8/10 images, 7 patients" for a proportion,
    "10 COVID-19 + 20 NORMAL images, 7 + 20 patients" for an AUC, "13 images, 10 patients"
    for the rest (F1, Brier, ...)."""
    if "k" in rec:
        return f"{rec['k']}/{rec['images']} images, {rec['patients']} patients"
    if rec.get("auc"):
        (i1, i0), (g1, g0) = rec["images_by_class"], rec["patients_by_class"]
        return f"{i1} COVID-19 + {i0} NORMAL images, {g1} + {g0} patients"
    return f"{rec['images']} images, {rec['patients']} patients"


def describe(rec: dict, digits: int = 2, value: float | None = None) -> str:
    """One number as a report prints it: value (``value`` when given: the run's own point
    estimate), interval, what it rests on and which interval it is, e.g.
    "0.80 [0.49, 0.94] (8/10 images, 7 patients; patient bootstrap)"."""
    v, lo, hi = rec["value"] if value is None else value, rec["lo"], rec["hi"]
    if v is None or math.isnan(v):
        return "n/a"
    tag = METHOD_TAGS.get(rec["method"], "Bayes from the se and sp intervals" if rec["method"].startswith("Bayes")
                          else rec["method"])
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.{digits}f} ({behind(rec)}; {tag})"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] ({behind(rec)}; {tag})"


def fmt(key: str, v, ci=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key in COUNT_KEYS:
        return str(int(round(v))) if float(v).is_integer() else f"{v:.1f}"
    s = f"{v:.2f}"
    if ci is not None and not any(math.isnan(c) for c in ci):
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def fraction(a: dict, key: str) -> str:
    """The counts behind a proportion, so the test size is seen beside every metric."""
    tp, fp, fn, tn = (a.get(k, 0) for k in ("TP", "FP", "FN", "TN"))
    parts = {"covid_recall": (tp, tp + fn), "covid_precision": (tp, tp + fp), "normal_recall": (tn, tn + fp),
             "normal_precision": (tn, tn + fn), "specificity": (tn, tn + fp), "accuracy": (tp + tn, tp + fp + fn + tn)}
    if key not in parts:
        return ""
    k, n = parts[key]
    return f"{k}/{n}"


def single_cells(m: dict) -> dict[str, str]:
    """Table 2 of one split: every number with its patient-level interval, the images and
    patients behind it and which interval it is (runs fitted before covfeat counted patients
    show their image-level Wilson intervals, and say so)."""
    out = {}
    a = m["argmax"]
    recs, counts = a.get("intervals"), a.get("counts", {})
    for label, key in METRIC_ROWS:
        if recs is not None and key in recs:
            out[label] = describe(recs[key], value=a.get(key))  # the point estimate computed as before
        else:
            out[label] = fmt(key, a.get(key), a.get("ci", {}).get(key))
            frac = fraction(a, key)
            if frac and out[label] != "n/a":
                out[label] += f" ({frac})"
        if key in counts:
            out[label] = f"{counts[key][0]} ({counts[key][1]} patients)"
    out["intervals"] = "95%, patient-level, named in each row (see below)" if recs is not None else (
        "95% Wilson on images (fitted before covfeat counted patients; fit again for patient-level intervals)")
    op = m.get("operating_point")
    if op:
        tag = f"at recall target {op['target_recall']:.2f}"
        t, ti = op["test"], op["test"].get("intervals")
        thr = op.get("threshold_interval")
        out[f"{tag}: threshold"] = f"{op['threshold']:.3f}"
        if thr is not None:
            vr = op["validation_recall"]
            span = "" if _nan(thr["lo"]) else f" [{thr['lo']:.3f}, {thr['hi']:.3f}] (validation bootstrap)"
            out[f"{tag}: threshold"] += (f"{span}, from {vr['k']}/{vr['images']} validation COVID-19 images, "
                                         f"{vr['patients']} patients")
        for k, nm in (("covid_recall", "recall"), ("covid_precision", "precision"), ("specificity", "specificity")):
            out[f"{tag}: test {nm}"] = describe(ti[k], value=t[k]) if ti is not None else fmt(k, t[k], t["ci"].get(k))
            if ti is None and not _nan(t[k]):
                out[f"{tag}: test {nm}"] += f" ({fraction(t, k)})"
    return out


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cv_cells(m: dict) -> dict[str, str]:
    """Table 2 of a cross-validation: the mean of every metric over folds with its t interval."""
    out = {}
    cv = m["cv"]
    n_scores = cv["n_folds"] * cv["n_repeats"]
    for label, key in METRIC_ROWS:
        if key in cv:
            c = cv[key]
            out[label] = fmt(key, c["mean"], None if key in COUNT_KEYS else (c["lo"], c["hi"]))
            if c["undefined"]:
                out[label] += f" ({c['n']} of {n_scores} folds; {c['undefined']} undefined)"
    for k, nm in (("op_covid_recall", "recall"), ("op_covid_precision", "precision"),
                  ("op_specificity", "specificity")):
        if k in cv:
            c = cv[k]
            out[f"at the recall target: test {nm}"] = fmt(k, c["mean"], (c["lo"], c["hi"]))
    out["folds"] = f"{cv['n_folds']} folds x {cv['n_repeats']} repeats: mean [{cv['interval']}]"
    return out


def source_rows(m: dict) -> list[tuple[str, str, str, dict | list]]:
    """(source, metric name, at, value) for the per-source breakdown: the patient-level
    records where the run has them (a cross-validation's summed over its folds), else the
    image-level lists [value, lo, hi, k, n] of older runs."""
    if "by_source_patients" in m:
        kinds = m["by_source_patients"]
    else:
        kinds = m.get("by_source", {})
    if "cv" in m:
        over = f"{m['cv']['n_folds']} folds x {m['cv']['n_repeats']} repeats, summed"
        at = {"argmax": f"argmax, {over}", "operating_point": f"each fold's threshold, {over}"}
    else:
        at = {"argmax": "argmax", "operating_point": f"threshold {m.get('operating_point', {}).get('threshold', 0):.3f}"}
    rows = []
    for kind, by in kinds.items():
        for src, e in by.items():
            for key, name in (("covid_recall", "COVID-19 recall"), ("specificity", "NORMAL specificity")):
                if key in e:
                    rows.append((src, name, at[kind], e[key]))
    return rows


def source_text(v) -> str:
    if isinstance(v, dict):
        return describe(v)
    val, lo, hi, k, n = v
    return f"{val:.2f} [{lo:.2f}, {hi:.2f}] ({k}/{n}; Wilson on images)"


def calibration_cells(m: dict) -> dict[str, str]:
    """Brier score and ECE of p_covid raw and corrected to the test prevalence, and PPV and NPV
    at the prevalence they assume."""
    out = {}
    cal = m.get("calibration")
    if cal:
        names = {"raw": f"raw p_covid (trained toward {cal['train_prior']:.0%} COVID-19)",
                 "corrected": f"p_covid corrected to the test prevalence {cal['test_prevalence']:.2f}"}
        for which, nm in names.items():
            for k, label in (("brier", "Brier score"), ("ece", "ECE")):
                out[f"{label}, {nm}"] = describe(cal[which][k], 3)
    for kind, pv in m.get("predictive", {}).items():
        at = "argmax" if kind == "argmax" else f"threshold {pv['threshold']:.3f}"
        for k in ("ppv", "npv"):
            out[f"{k.upper()} at prevalence {pv['prevalence']:.3f} ({pv['prevalence_from']}), {at}"] = describe(pv[k])
    return out


def notes(runs: list[dict]) -> list[str]:
    """One line per run whose test recall at its operating point misses the target it was
    chosen for on validation rows, with the numbers."""
    out = []
    for m in runs:
        op = m.get("operating_point")
        if "cv" in m and "op_covid_recall" in m["cv"]:
            c, target = m["cv"]["op_covid_recall"], m["cv"].get("target_recall")
            if target is not None and c["mean"] < target:
                out.append(f"{m['_name']}: at recall target {target:.2f} the mean test COVID-19 recall over folds "
                           f"is {c['mean']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}], below the target.")
        elif op and op["test"]["covid_recall"] < op["target_recall"]:
            t = op["test"]
            got = (describe(t["intervals"]["covid_recall"]) if "intervals" in t else
                   f"{t['covid_recall']:.2f} ({t['TP']}/{t['TP'] + t['FN']} images)")
            src = ""
            if "validation_recall" in op:
                vr = op["validation_recall"]
                src = (f"; the threshold {op['threshold']:.3f} was chosen on {vr['k']}/{vr['images']} validation "
                       f"COVID-19 images ({vr['patients']} patients)")
            out.append(f"{m['_name']}: at recall target {op['target_recall']:.2f} the test COVID-19 recall is {got}, "
                       f"below the target{src}.")
    return out


def footnotes(runs: list[dict]) -> list[str]:
    """What the interval names in the table mean, when a run's table uses them."""
    return [INTERVALS_NOTE] if any("intervals" in m.get("argmax", {}) for m in runs) else []
