"""The shortcut audit: does a run read the lungs, or where and how its images were made?

Five probes, each with the number it rests on, an interval, a plain verdict and what
would change it, kept in ``RUN/audit.json`` (``report`` shows them):

a. metadata: a logistic regression on file metadata alone (height, width, aspect ratio,
   channels, bit depth, format, bytes per pixel), cross-validated by patient group; if it
   separates the classes, the data carry a shortcut no pixel model needs to look for;
b. control: the same head on a random-init backbone's features of the same images and
   split; if it reaches the run's AUC, the task is solvable without ImageNet features and
   the score says nothing about transfer learning (a random-init run is its own control);
c. occlusion: the lung field blanked (a central box, or lung masks), the same head
   retrained on the same split, its AUC compared with the run's own and with chance;
d. source: within a class that has two or more sources, how well the features tell them
   apart; when each class has one source, that source and diagnosis are confounded;
e. external: the run scored on another labelled source at the same threshold as its own
   test (argmax, and the run's threshold when set), per source, with near-duplicates of
   the run's own images left out.

Intervals resample patient groups (patients joined with their near-duplicates), not images.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from covfeat.core.errors import RunError
from covfeat.extraction.config import ExtractConfig, OcclusionConfig
from covfeat.extraction.images import METADATA_FIELDS, UnreadableImage, file_metadata
from covfeat.extraction.run import extract
from covfeat.head.config import FitConfig
from covfeat.head.fit import fit_head, usable_pairs
from covfeat.head.model import pooled_mean
from covfeat.head.runs import Run
from covfeat.head.split import groups_for
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import by_source, classification_metrics
from covfeat.trust.neardup import find_pairs

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


def _nums(auc, lo, hi) -> str:
    return f"ROC AUC {auc:.2f} [95% CI {lo:.2f}, {hi:.2f}]"


def _change(kind: str) -> str:
    """What would change a separation verdict."""
    return {"below chance": "it would read near chance if the interval reached 0.50",
            "near chance": "it would be flagged if the interval's lower end rose above 0.50",
            "partial separation": "it would read near chance if the interval's lower end fell to 0.50, "
                                  "and full separation at 0.90",
            "full separation": "it would read partial separation if the interval's lower end fell below 0.90"}.get(
        kind, "more images of both classes would make it testable")


def _groups(fc, rows, pairs_mode="group"):
    """Patient groups of manifest ``rows``, joined with the cache's near-duplicates."""
    from covfeat.head.config import SplitConfig

    return groups_for(fc.manifest["patient_id"][rows], "patient",
                      usable_pairs(fc, SplitConfig(near_duplicates=pairs_mode), rows))


def _cv_probabilities(X, y, groups, seed: int = 0, C: float = 1.0) -> np.ndarray:
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


# --------------------------------------------------------------------------- a. metadata


def metadata_features(meta: list[dict]) -> tuple[np.ndarray, list[str]]:
    """The metadata probe's features: log sizes, aspect ratio, channels, bit depth, log bytes
    per pixel, and one column per file format."""
    formats = sorted({m["format"] for m in meta})
    cols = ["log_height", "log_width", "aspect", "channels", "bit_depth", "log_bytes_per_pixel"] + \
        [f"format={f}" for f in formats]
    X = np.array([[np.log(m["height"]), np.log(m["width"]), m["width"] / m["height"], m["channels"], m["bit_depth"],
                   np.log(m["file_bytes"] / (m["height"] * m["width"]))] + [float(m["format"] == f) for f in formats]
                  for m in meta], float)
    return X, cols


def metadata_probe(fc, seed: int = 0) -> dict:
    """Patient-grouped cross-validated logistic regression from file metadata to the class."""
    rows = np.flatnonzero(fc.has_features())
    meta, keep, unreadable = [], [], 0
    for r in rows:
        try:
            meta.append(file_metadata(fc.manifest["path"][r]))
            keep.append(r)
        except UnreadableImage:
            unreadable += 1
    rows = np.array(keep, np.int64)
    y = fc.manifest["label"][rows]
    if len(rows) < 10 or len(np.unique(y)) < 2:
        return {"status": "not testable", "verdict": "not testable: the files of both classes are needed "
                f"({len(rows)} readable, {unreadable} gone since extraction)."}
    X, cols = metadata_features(meta)
    groups = _groups(fc, rows)
    p = _cv_probabilities(X, y, groups, seed)
    auc, lo, hi = group_bootstrap_auc(y, p, groups, seed=seed)
    kind = separation(auc, lo, hi)
    flagged = kind in ("partial separation", "full separation")
    formats = {name: sorted({f"{m['format']} {m['bit_depth']}-bit {m['channels']}ch" for m, lab in zip(meta, y)
                             if lab == c}) for c, name in ((1, "COVID-19"), (0, "NORMAL"))}
    text = (f"{'FLAGGED' if flagged else 'not flagged'}: file metadata alone (sizes, aspect, channels, bit depth, "
            f"format, bytes per pixel; no pixels) gives {kind} of COVID-19 from NORMAL, {_nums(auc, lo, hi)}, "
            f"patient-grouped {min(5, int(np.bincount(y).min()))}-fold CV of a logistic regression. "
            + ("A model can reach its score from how the files were made. " if flagged else "")
            + f"({_change(kind)}.)")
    return {"status": "FLAGGED" if flagged else "not flagged", "separation": kind, "verdict": text,
            "roc_auc": [auc, lo, hi], "n": [int((y == 0).sum()), int((y == 1).sum())], "features": cols,
            "unreadable": unreadable, "kinds_by_class": formats}


# --------------------------------------------------------------------------- helpers of b, c


def _config_from(fc, **change) -> ExtractConfig:
    return replace(ExtractConfig.from_stored(fc.config, weights=_weights_arg(fc)), **change)


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


def _retrain(run: Run, fc, fit: FitConfig, cfg: ExtractConfig, cache_dir, name: str, progress: bool):
    """Extract the run's own images with ``cfg`` and train the run's head on the run's split;
    returns the new run and its cache (whose rows its predictions index)."""
    split = run.split()
    rows = np.flatnonzero(split >= 0)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    src = _manifest_csv(fc, rows, Path(cache_dir) / f"audit-{fc.content_hash()}.csv")
    other = open_cache(_extract_or_fail(extract([src], cfg, cache_dir, progress=progress)))
    by_hash = dict(zip(fc.manifest["sha256"], split))
    other_split = np.array([by_hash.get(h, -1) for h in other.manifest["sha256"]], np.int8)
    other_split[~other.has_features()] = -1  # unreadable after all (for example, no lung mask)
    return Run(fit_head(other.path, fit, run.path / "audit-runs", split=other_split, progress=progress, fc=other,
                        name=name)), other


def _extract_or_fail(path):
    if path is None:
        from covfeat.core.errors import CacheLocked

        raise CacheLocked("Another covfeat process is writing the index of the audit's cache; run the audit again "
                          "when it has finished.")
    return path


def _run_auc(run: Run, fc) -> tuple[float, float, float]:
    pr = run.predictions()
    return group_bootstrap_auc(pr["label"], pr["p_covid"], _groups(fc, pr["row"]))


# --------------------------------------------------------------------------- b. control


def control_probe(run: Run, fc, fit: FitConfig, cache_dir, progress=True) -> dict:
    """The same head on a random-init backbone's features of the same images and split."""
    own = _run_auc(run, fc)
    if not fc.pretrained:
        return {"status": "own control", "roc_auc_run": list(own), "verdict":
                f"own control: this run's backbone is itself random-init (NOT PRETRAINED) and reaches "
                f"{_nums(*own)}; whatever it scores, it scores without ImageNet features. (A run with pretrained "
                "weights gets a random-init control here.)"}
    ctl, ctl_cache = _retrain(run, fc, fit, _config_from(fc, weights="none"), cache_dir, "control", progress)
    pr = ctl.predictions()
    auc = group_bootstrap_auc(pr["label"], pr["p_covid"], _groups(ctl_cache, pr["row"]) if len(pr["row"]) else None)
    solvable = auc[2] >= own[0]  # the control's interval reaches the run's own AUC
    text = (f"{'FLAGGED' if solvable else 'not flagged'}: a random-init backbone with the same head and split "
            f"reaches {_nums(*auc)} against the run's {_nums(*own)}; "
            + ("the task is solvable without ImageNet features, so this score says nothing about transfer learning"
               if solvable else f"ImageNet features add {own[0] - auc[0]:+.2f} AUC")
            + f". (It would {'clear' if solvable else 'be flagged'} if the control's upper bound "
            f"{'fell below' if solvable else 'reached'} {own[0]:.2f}.)")
    return {"status": "FLAGGED" if solvable else "not flagged", "verdict": text, "roc_auc": list(auc),
            "roc_auc_run": list(own), "run": str(ctl.path)}


# --------------------------------------------------------------------------- c. occlusion


def occlusion_probe(run: Run, fc, fit: FitConfig, occlusion: OcclusionConfig, cache_dir, progress=True) -> dict:
    """The lung field blanked, the same head retrained on the same split; AUC against the run's and chance."""
    occ, occ_cache = _retrain(run, fc, fit, _config_from(fc, occlusion=occlusion), cache_dir, "occlusion", progress)
    pr = occ.predictions()
    own = _run_auc(run, fc)
    y, p = pr["label"], pr["p_covid"]
    auc, lo, hi = group_bootstrap_auc(y, p, _groups(occ_cache, pr["row"]) if len(y) else None)
    kind = separation(auc, lo, hi)
    what = "the lung field blanked" + (f" (masks from {occlusion.masks})" if occlusion.kind == "masks" else
                                       f" (central box {tuple(round(b, 2) for b in occlusion.box)})")
    if kind == "not testable":
        return {"status": "not testable", "verdict": f"not testable: with {what} the test rows hold one class "
                f"({len(y)} images); masks must exist for images of both classes.", "run": str(occ.path)}
    no_drop = lo >= own[1]
    flagged = kind in ("partial separation", "full separation")
    text = (f"{'FLAGGED' if flagged else 'not flagged'}: with {what}, the same head gives {kind}, "
            f"{_nums(auc, lo, hi)}, against the run's own {_nums(*own)}"
            + ("; no measurable drop: it reads something outside the lungs as well as the run reads the image"
               if flagged and no_drop else "; it still reads something outside the lungs (labels, borders, body size,"
               " the source)" if flagged else "; the signal is inside the blanked field" if kind == "near chance"
               else "; below chance: what remains points the other way")
            + f". ({_change(kind)}.)")
    m = classification_metrics(y, p)
    return {"status": "FLAGGED" if flagged else "not flagged", "separation": kind, "verdict": text,
            "roc_auc": [auc, lo, hi], "roc_auc_run": list(own), "accuracy": m["accuracy"], "n_covid": m["n_covid"],
            "n_normal": m["n_normal"], "occlusion": occlusion.as_dict(), "run": str(occ.path)}


# --------------------------------------------------------------------------- d. source


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
        groups = _groups(fc, r)
        p = _cv_probabilities(pooled_mean(fc.read_features(fc.originals(r))), y, groups, seed, C=0.1)
        if np.isnan(p).any():
            continue
        auc, lo, hi = group_bootstrap_auc(y, p, groups, seed=seed)
        kind = separation(auc, lo, hi)
        flagged = kind in ("partial separation", "full separation")
        text = (f"{'FLAGGED' if flagged else 'not flagged'}: within {name}, the features give {kind} of "
                f"{srcs[0]} from {srcs[1]}, {_nums(auc, lo, hi)}"
                + ("; the source leaves a mark a classifier can use" if flagged else "")
                + f". ({_change(kind)}.)")
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


# --------------------------------------------------------------------------- e. external


def external_probe(run: Run, fc, sources, cache_dir, progress=True, keep_overlap: bool = False) -> dict:
    """The run on another labelled source, at the same thresholds as its own test, per source,
    with near-duplicates of the run's own images left out (and listed)."""
    ext = open_cache(_extract_or_fail(extract(sources, _config_from(fc, augment=0), cache_dir, progress=progress)))
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
    auc_int = group_bootstrap_auc(pr["label"], pr["p_covid"], _groups(fc, pr["row"]))
    auc_ext = group_bootstrap_auc(y, p, _groups(ext, rows))
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
             f"not flagged: external {_nums(*auc_ext)} vs internal {_nums(*auc_int)}; accuracy at argmax "
             f"{a['external']['accuracy']:.2f} vs {a['internal']['accuracy']:.2f}, within their intervals.")
            + over + " Both sides are scored at the same threshold(s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in thresholds.items()) + ". ("
            + ("it would clear if no external interval lay wholly below the internal one"
               if flags else "it would be flagged if an external interval lay wholly below the internal one")
            + ".)")
    return {"status": "FLAGGED" if flags else "not flagged", "verdict": text, "at": at,
            "roc_auc_internal": list(auc_int), "roc_auc_external": list(auc_ext), "overlap": overlap_list,
            "n_external": int(len(rows)), "sources": [str(s) for s in sources], "cache": str(ext.path)}


# --------------------------------------------------------------------------- the audit


PROBES = ("metadata", "control", "occlusion", "source")


def audit(run: str | Path, *, occlusion: OcclusionConfig | None = None, external: list | None = None,
          cache_dir: str | Path = "cache", probes=PROBES, progress: bool = True,
          keep_overlap: bool = False) -> dict:
    """Run the probes on a finished run and write RUN/audit.json; returns the results."""
    run = Run(run).require_single("the audit")
    fc = open_cache(run.cache_info["path"])
    fit = run.fit_config()
    out = {"pretrained": fc.pretrained, "weights": fc.config["weights"]["label"]}
    if "metadata" in probes:
        out["metadata"] = metadata_probe(fc, seed=fit.head.seed)
    if "control" in probes:
        out["control"] = control_probe(run, fc, fit, cache_dir, progress)
    if "occlusion" in probes:
        out["occlusion"] = occlusion_probe(run, fc, fit, occlusion or OcclusionConfig(kind="box"), cache_dir,
                                           progress)
    if "source" in probes:
        out["source"] = source_probe(fc, seed=fit.head.seed)
    if external:
        out["external"] = external_probe(run, fc, external, cache_dir, progress, keep_overlap)
    run.write_audit(out)
    return out


def summary(result: dict) -> str:
    lines = []
    if not result.get("pretrained", True):
        lines.append("NOTE: features from a NOT PRETRAINED (random-init) backbone.")
    for k in PROBES + ("external",):
        if k in result:
            lines.append(f"{k} probe: {result[k]['verdict']}")
    return "\n".join(lines)


__all__ = ["audit", "summary", "metadata_probe", "control_probe", "occlusion_probe", "source_probe",
           "external_probe", "group_bootstrap_auc", "separation", "METADATA_FIELDS"]
