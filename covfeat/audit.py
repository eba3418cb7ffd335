"""The shortcut audit: does a run read the lungs, or where the image came from?

Three probes, each with its numbers and a plain verdict, kept in ``RUN/audit.json`` (the
report shows them):

a. occlusion: extract again with the lung field replaced by a constant (a central box, or
   masks), train the same head on the same split; if it still separates the classes far
   above chance, it is reading something outside the lungs;
b. source: how well the cached features predict the data source, within a class that has
   more than one source (patient-grouped cross-validated logistic regression); when every
   class has a single source, the audit says that source and diagnosis are confounded;
c. external: the run scored on another labelled source, and the drop against its own test.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cache import open_cache
from .config import ExtractConfig, FitConfig, OcclusionConfig
from .errors import RunError
from .extract import extract
from .head import pooled_mean
from .metrics import classification_metrics
from .runs import Run
from .train import fit_head

FLAG_AUC = 0.7  # a probe whose AUC's lower 95% bound clears this separates "far above chance"


def bootstrap_auc(y, p, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """ROC AUC and a stratified percentile-bootstrap 95% interval."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    p = np.asarray(p)
    if len(np.unique(y)) < 2:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats = []
    for _ in range(n):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        stats.append(roc_auc_score(y[idx], p[idx]))
    return float(roc_auc_score(y, p)), float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def _verdict_auc(auc, lo, hi, what: str, flagged: str) -> tuple[str, str]:
    if np.isnan(auc):
        return "not testable", f"{what}: not testable (one class only)."
    nums = f"ROC AUC {auc:.2f} [95% CI {lo:.2f}, {hi:.2f}]"
    if lo >= FLAG_AUC:
        return "FLAGGED", f"FLAGGED: {flagged} ({nums})."
    if hi < FLAG_AUC:
        return "not flagged", f"not flagged: {what} is near chance ({nums})."
    return "inconclusive", f"inconclusive: {what}, {nums}; too few test images to say."


def _config_from(fc) -> ExtractConfig:
    return ExtractConfig.from_stored(fc.config, weights=_weights_arg(fc))


def _weights_arg(fc) -> str:
    w = fc.config["weights"]
    if w["kind"] == "file":
        path = str(fc.attrs.get("weights_path", ""))
        if not path or not Path(path).is_file():
            raise RunError(f"The run's weights file {path!r} is gone; the audit must extract with the same weights.")
        return path
    return w["kind"]


def _manifest_csv(fc, rows, path: Path) -> Path:
    man = fc.manifest
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        for r in rows:
            w.writerow([man["path"][r], "COVID-19" if man["label"][r] else "NORMAL",
                        man["patient_id"][r].split(":", 1)[-1], man["source"][r]])
    return path


def occlusion_probe(run: Run, fc, fit: FitConfig, occlusion: OcclusionConfig, cache_dir, progress=True) -> dict:
    split = run.split()
    rows = np.flatnonzero(split >= 0)
    src = _manifest_csv(fc, rows, Path(cache_dir) / f"audit-{fc.content_hash()}.csv")
    cache = extract([src], replace(_config_from(fc), occlusion=occlusion), cache_dir, progress=progress)
    occ = open_cache(cache)
    by_hash = dict(zip(fc.manifest["sha256"], split))
    occ_split = np.array([by_hash.get(h, -1) for h in occ.manifest["sha256"]], np.int8)
    occ_split[~occ.has_features()] = -1  # unreadable after all
    out = Run(fit_head(cache, fit, run.path / "audit-runs", split=occ_split, progress=progress, fc=occ,
                       name="occlusion"))
    preds = out.predictions()
    y, p = preds["label"], preds["p_covid"]
    auc, lo, hi = bootstrap_auc(y, p)
    status, text = _verdict_auc(auc, lo, hi, "with the lung field blanked the head",
                                "with the lung field blanked the head still separates COVID-19 from NORMAL; "
                                "it reads something outside the lungs (labels, borders, body size, the source)")
    m = classification_metrics(y, p)
    return {"status": status, "verdict": text, "roc_auc": [auc, lo, hi], "accuracy": m["accuracy"],
            "n_covid": m["n_covid"], "n_normal": m["n_normal"], "occlusion": occlusion.as_dict(), "run": str(out.path)}


def source_probe(fc, seed: int = 0) -> dict:
    """Cross-validated (grouped by patient) logistic regression from pooled features to source."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    man = fc.manifest
    rows = np.flatnonzero(fc.has_features())
    by_class = {}
    for lab, name in ((1, "COVID-19"), (0, "NORMAL")):
        srcs, counts = np.unique(man["source"][rows][man["label"][rows] == lab], return_counts=True)
        by_class[name] = dict(zip(srcs.tolist(), counts.tolist()))
    results = {}
    for lab, name in ((1, "COVID-19"), (0, "NORMAL")):
        srcs = [s for s, c in by_class[name].items() if c >= 5]
        if len(srcs) < 2:
            continue
        r = rows[(man["label"][rows] == lab) & np.isin(man["source"][rows], srcs[:2])]
        y = (man["source"][r] == srcs[1]).astype(int)
        X = pooled_mean(fc.read_features(fc.originals(r)))
        folds = min(5, int(np.bincount(y).min()))
        if folds < 2:
            continue
        p = np.zeros(len(r))
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        for tr, te in cv.split(X, y, man["patient_id"][r]):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
            clf.fit(X[tr], y[tr])
            p[te] = clf.predict_proba(X[te])[:, 1]
        auc, lo, hi = bootstrap_auc(y, p)
        status, text = _verdict_auc(auc, lo, hi, f"within {name}, telling {srcs[0]} from {srcs[1]}",
                                    f"within {name}, the features tell {srcs[0]} from {srcs[1]}: the source "
                                    "leaves a strong mark that a classifier can use")
        results[name] = {"status": status, "verdict": text, "roc_auc": [auc, lo, hi], "sources": srcs[:2],
                         "n": [int((y == 0).sum()), int((y == 1).sum())]}
    single = {n: list(v) for n, v in by_class.items() if len(v) == 1}
    if not results:
        confounded = len(single) == 2 and single["COVID-19"] != single["NORMAL"]
        text = ("CONFOUNDED: every COVID-19 image comes from " + ", ".join(single.get("COVID-19", [])) +
                " and every NORMAL image from " + ", ".join(single.get("NORMAL", [])) +
                "; the source cannot be probed within a class, and any classifier of these classes is also a "
                "classifier of their source. Add images of both classes from one source, or use --external."
                if confounded else "not testable: no class has two sources with at least 5 images each.")
        return {"status": "CONFOUNDED" if confounded else "not testable", "verdict": text, "sources_by_class": by_class}
    worst = max(results.values(), key=lambda v: v["roc_auc"][1])
    return {"status": worst["status"], "verdict": worst["verdict"], "by_class": results, "sources_by_class": by_class}


def external_probe(run: Run, fc, sources, cache_dir, progress=True) -> dict:
    """Score the run on another labelled source; the drop against the run's own test, with intervals."""
    cfg = replace(_config_from(fc), augment=0)  # every external row is scored on its original view
    cache = extract(sources, cfg, cache_dir, progress=progress)
    ext = open_cache(cache)
    rows = np.flatnonzero(ext.has_features())
    p = run.load_head().predict(ext.read_features(ext.originals(rows)), verbose=0)[:, 1]
    y = ext.manifest["label"][rows]
    m_ext = classification_metrics(y, p, run.threshold)
    m_int = run.metrics["argmax"]
    drops = {}
    flags = []
    preds = run.predictions()
    auc_int = bootstrap_auc(preds["label"], preds["p_covid"])
    auc_ext = bootstrap_auc(y, p)
    drops["roc_auc"] = auc_int[0] - auc_ext[0]
    if not np.isnan(auc_ext[2]) and auc_ext[2] < auc_int[1]:
        flags.append(f"ROC AUC {auc_int[0]:.2f} -> {auc_ext[0]:.2f}")
    for k in ("accuracy", "covid_recall", "specificity"):
        drops[k] = m_int[k] - m_ext[k]
        ci_int, ci_ext = m_int["ci"].get(k), m_ext["ci"].get(k)
        if ci_int and ci_ext and not np.isnan(ci_ext[1]) and ci_ext[1] < ci_int[0]:
            flags.append(f"{k} {m_int[k]:.2f} -> {m_ext[k]:.2f}")
    status = "FLAGGED" if flags else "not flagged"
    text = (f"FLAGGED: on the external data the run drops beyond its intervals ({'; '.join(flags)}); "
            "what it learned does not carry over." if flags else
            f"not flagged: external ROC AUC {auc_ext[0]:.2f} vs internal {auc_int[0]:.2f}, accuracy "
            f"{m_ext['accuracy']:.2f} vs {m_int['accuracy']:.2f}, within their intervals.")
    return {"status": status, "verdict": text, "external": m_ext, "internal": m_int, "drop": drops,
            "roc_auc_internal": list(auc_int), "roc_auc_external": list(auc_ext),
            "sources": [str(s) for s in sources], "cache": str(cache)}


def audit(run: str | Path, *, occlusion: OcclusionConfig | None = None, external: list | None = None,
          cache_dir: str | Path = "cache", probes=("occlusion", "source"), progress: bool = True) -> dict:
    """Run the probes on a finished run and write RUN/audit.json; returns the results."""
    run = Run(run).require_single("the audit")
    fc = open_cache(run.cache_info["path"])
    fit = run.fit_config()
    out = {"pretrained": fc.pretrained, "weights": fc.config["weights"]["label"]}
    if "occlusion" in probes:
        out["occlusion"] = occlusion_probe(run, fc, fit, occlusion or OcclusionConfig(kind="box"), cache_dir,
                                           progress)
    if "source" in probes:
        out["source"] = source_probe(fc, seed=fit.head.seed)
    if external:
        out["external"] = external_probe(run, fc, external, cache_dir, progress)
    run.write_audit(out)
    return out


def summary(result: dict) -> str:
    lines = []
    if not result.get("pretrained", True):
        lines.append("NOTE: features from a NOT PRETRAINED (random-init) backbone.")
    for k in ("occlusion", "source", "external"):
        if k in result:
            lines.append(f"{k} probe: {result[k]['verdict']}")
    return "\n".join(lines)

