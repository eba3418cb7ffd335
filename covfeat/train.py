"""Stage two: balance the cached training rows, train the head, evaluate, write a run folder.

A run folder holds ``head.keras``, ``config.json``, ``history.csv``, ``predictions.csv``,
``metrics.json`` and ``cache.json`` (the path and key of the cache it came from).  It is
written under a temporary name and renamed when complete, so a folder that exists is a
finished run.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backbones import get_backbone
from .cache import FeatureCache, open_cache
from .errors import ConfigError, DataError
from .head import HeadConfig, build_head, pooled_mean, train_fast
from .metrics import classification_metrics, threshold_for_recall
from .split import TEST, TRAIN, VAL

SMOTE_MARK = 1e-3  # scale of the row-identity columns used to read SMOTE's parents back


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM starts afresh at exec, while
    ru_maxrss carries a parent's peak across fork+exec on Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Balanced:
    """The balanced training set: real rows plus SMOTE rows defined by two parents and a weight."""

    labels: np.ndarray  # (n,) of real then synthetic rows
    parents: np.ndarray  # (n_syn, 2) indices into the real training rows
    weights: np.ndarray  # (n_syn, 2) interpolation weights, summing to 1
    sample_weight: np.ndarray | None = None


def balance(X0: np.ndarray, y: np.ndarray, cfg: HeadConfig) -> Balanced:
    """SMOTE (imbalanced-learn) on the flattened original maps of the training rows.

    Row-identity columns of scale SMOTE_MARK ride along, so the parents and the weight of
    every synthetic row can be read back from imbalanced-learn's own output; view j of a
    synthetic row is then view j of its parents mixed with that same weight.
    """
    n = len(y)
    none = Balanced(y, np.zeros((0, 2), int), np.zeros((0, 2)))
    if cfg.balance == "none":
        return none
    counts = np.bincount(y, minlength=2)
    if cfg.balance == "class-weight":
        w = (n / (2.0 * counts))[y]
        return Balanced(y, none.parents, none.weights, sample_weight=w.astype(np.float32))
    if cfg.balance != "smote":
        raise ConfigError(f"--balance must be smote, none or class-weight, got {cfg.balance!r}.")
    minority = int(np.argmin(counts))
    if counts[minority] == counts[1 - minority]:
        return none
    if counts[minority] < 2:
        raise DataError(
            f"SMOTE needs at least 2 training rows of the minority class, found {counts[minority]}; "
            "use --balance class-weight or none."
        )
    from imblearn.over_sampling import SMOTE

    k = min(cfg.smote_k, int(counts[minority]) - 1)
    # SMOTE only needs distances between rows; n x n coordinates from the Gram matrix keep
    # every pairwise distance of the flattened maps exactly, at a fraction of the width.
    X = np.asarray(X0, np.float32)
    gram = (X @ X.T).astype(np.float64)
    lam, vec = np.linalg.eigh(gram)
    coords = (vec * np.sqrt(np.clip(lam, 0, None))).astype(np.float64)
    scale = float(np.abs(coords).mean()) or 1.0
    ident = np.eye(n) * (SMOTE_MARK * scale)
    Xr, yr = SMOTE(k_neighbors=k, random_state=cfg.seed).fit_resample(np.hstack([coords, ident]), y)
    X0 = coords
    syn = Xr[n:, X0.shape[1]:] / (SMOTE_MARK * scale)
    parents = np.zeros((len(syn), 2), int)
    weights = np.zeros((len(syn), 2))
    for i, row in enumerate(syn):
        nz = np.flatnonzero(row > 0)  # exactly the two parents (one if the step was 0)
        top = nz[np.argsort(row[nz])[::-1][:2]]
        if len(top) == 1:
            parents[i], weights[i] = [top[0], top[0]], [1.0, 0.0]
        else:
            parents[i] = top
            weights[i] = row[top] / row[top].sum()
    return Balanced(np.asarray(yr), parents, weights)


def _row_samples(fc: FeatureCache) -> tuple[dict[int, np.ndarray], int]:
    """manifest row -> its sample indices ordered by view; and the number of views."""
    V = fc.n_views
    order = np.lexsort((fc.view, fc.row))
    rows_sorted = fc.row[order]
    out = {}
    starts = np.flatnonzero(np.r_[True, rows_sorted[1:] != rows_sorted[:-1]])
    for s in starts:
        r = int(rows_sorted[s])
        out[r] = order[s:s + V]
    return out, V


def prepare_rows(fc: FeatureCache, split: np.ndarray) -> dict[int, np.ndarray]:
    """Manifest rows of each split that have cached features (skipped files have none)."""
    samples, _ = _row_samples(fc)
    have = np.array(sorted(samples))
    return {s: have[split[have] == s] for s in (TRAIN, VAL, TEST)}


def fit_head(cache_path: str | Path, cfg: HeadConfig, runs_dir: str | Path = "runs", *,
             split: np.ndarray | None = None, target_recall: float | None = None,
             memory_budget_gb: float = 8.0, name: str | None = None, progress: bool = True,
             fc: FeatureCache | None = None) -> Path:
    """Train the paper's head on one cache and write a run folder; returns its path.

    ``split`` overrides the cache's stored split (one value per manifest row), which is
    how cross-validation reuses one cache.

    Raises
    ------
    CacheError, DataError, ConfigError
    """
    t0 = time.perf_counter()
    from .head import limit_tf_threads

    limit_tf_threads()
    fc = fc or open_cache(cache_path)
    bb = get_backbone(fc.backbone)
    dropout = bb.dropout if cfg.dropout is None else cfg.dropout
    if not 0 <= dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}.")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("--epochs and --batch-size must be at least 1.")
    split = fc.manifest["split"] if split is None else np.asarray(split)
    parts = prepare_rows(fc, split)
    labels_m = fc.manifest["label"]
    for s, nm in ((TRAIN, "training"), (TEST, "test")):
        got = np.bincount(labels_m[parts[s]], minlength=2)
        if (got == 0).any():
            raise DataError(f"The {nm} split has {got[1]} COVID-19 and {got[0]} NORMAL rows; it needs both. "
                            "Use more data or other split ratios.")
    samples, V = _row_samples(fc)
    shape = fc.feature_shape
    S, C = shape[0] * shape[1], shape[2]
    tr = parts[TRAIN]
    y_tr = labels_m[tr]

    # Originals of the training rows, flattened, for SMOTE's neighbour search.
    from .kernels import populated_empty

    X0 = fc.read_features(np.array([samples[r][0] for r in tr]), out=populated_empty((len(tr), *shape)))
    X0 = X0.reshape(len(tr), -1)
    marks = {"read_and_prepare": time.perf_counter() - t0}
    bal = balance(X0, y_tr, cfg)
    marks["smote"] = time.perf_counter() - t0 - sum(marks.values())
    del X0
    n_real, n_syn = len(tr), len(bal.parents)
    pool_bytes = n_real * V * S * C * fc.dtype.itemsize  # SMOTE rows are formed on the fly
    streamed = pool_bytes > memory_budget_gb * 2**30
    if not fc.pretrained:
        _log("NOTE: these features come from a NOT PRETRAINED (random-init) backbone.")
    _log(f"Training rows: {n_real} real + {n_syn} SMOTE ({np.bincount(bal.labels, minlength=2)[1]} COVID-19, "
         f"{np.bincount(bal.labels, minlength=2)[0]} NORMAL), {V} views each; "
         f"{'streamed from HDF5' if streamed else 'in memory'} ({pool_bytes / 2**30:.2f} GiB)")

    model, tail = build_head(shape, cfg, dropout)
    marks["build_head"] = time.perf_counter() - t0 - sum(marks.values())
    val_rows, test_rows = parts[VAL], parts[TEST]
    Xv = pooled_mean(fc.read_features(np.array([samples[r][0] for r in val_rows]))) if len(val_rows) else None
    yv = labels_m[val_rows] if len(val_rows) else None
    n_views = np.full(n_real + n_syn, V, np.int64)
    report = _epoch_printer(cfg.epochs) if progress else None
    if not streamed:
        from .kernels import populated_empty

        idx = np.concatenate([samples[r] for r in tr])
        half = fc.dtype == np.float16  # keep float16 as stored (bits as uint16): half the memory
        pool = populated_empty((n_real, V, S, C), np.uint16 if half else np.float32)
        fc.read_features(idx, out=(pool.view(np.float16) if half else pool).reshape(n_real * V, *shape))
        marks["load_pool"] = time.perf_counter() - t0 - sum(marks.values())
        history = train_fast(pool, np.arange(n_real + n_syn), bal.labels, n_views, Xv, yv, tail, cfg, dropout,
                             sample_weight=bal.sample_weight, progress=report, parents=bal.parents,
                             weights=bal.weights)
        del pool
    else:
        history = _train_streamed(fc, samples, tr, bal, V, S, C, Xv, yv, tail, cfg, dropout, report)
    train_seconds = time.perf_counter() - t0
    marks["epochs"] = train_seconds - sum(marks.values())

    def predict(rows):
        if not len(rows):
            return np.zeros(0)
        maps = fc.read_features(np.array([samples[r][0] for r in rows]))
        return tail(pooled_mean(maps), training=False).numpy()[:, 1]

    p_test = predict(test_rows)
    p_val = predict(val_rows)
    threshold = 0.5
    metrics = {"argmax": classification_metrics(labels_m[test_rows], p_test, 0.5)}
    if target_recall is not None:
        if not len(val_rows):
            raise ConfigError("--target-recall picks the threshold on validation rows; this split has none (--val 0).")
        threshold = threshold_for_recall(labels_m[val_rows], p_val, target_recall)
        metrics["operating_point"] = {
            "target_recall": target_recall, "threshold": threshold,
            "validation": classification_metrics(labels_m[val_rows], p_val, threshold),
            "test": classification_metrics(labels_m[test_rows], p_test, threshold),
        }
    metrics.update(
        backbone=fc.backbone, weights=fc.config["weights"], pretrained=fc.pretrained,
        n_train_real=int(n_real), n_train_smote=int(n_syn), n_val=int(len(val_rows)), n_test=int(len(test_rows)),
        fit_seconds=train_seconds, fit_stages_seconds=marks, peak_rss_mb=peak_rss_mb(), streamed=bool(streamed),
        sources_test=_sources(fc, test_rows),
    )
    return _write_run(runs_dir, name or f"{fc.backbone}-{time.strftime('%Y%m%d-%H%M%S')}", fc, cfg, dropout,
                      model, history, test_rows, p_test, threshold, metrics, split, target_recall)


def _sources(fc, rows) -> dict:
    src = fc.manifest["source"][rows]
    lab = fc.manifest["label"][rows]
    return {f"{s}/{'COVID-19' if l else 'NORMAL'}": int(((src == s) & (lab == l)).sum())
            for s in np.unique(src) for l in (1, 0) if ((src == s) & (lab == l)).any()}


def _epoch_printer(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="epoch", file=sys.stderr, desc="fit-head")

    def cb(rec):
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.3f}", val_acc=f"{rec['val_accuracy']:.3f}")
        if rec["epoch"] == total:
            bar.close()
    return cb


def _train_streamed(fc, samples, tr, bal, V, S, C, Xv, yv, tail, cfg, dropout, report):
    """Larger than the memory budget: each epoch reads only the maps it draws from HDF5."""
    import tensorflow as tf

    from .kernels import dropout_pool, keep_q
    from .head import _Loop, one_hot

    loop = _Loop(tail, cfg)
    rng = np.random.default_rng(cfg.seed)
    n_real = len(tr)
    n = n_real + len(bal.parents)
    y = one_hot(bal.labels)
    w_all = np.ones(n, np.float32) if bal.sample_weight is None else bal.sample_weight
    pooled = np.empty((n, C), np.float32)
    n_syn = len(bal.parents)
    # buf rows: the drawn view of each real row, then both parents of each SMOTE row
    par = (n_real + 2 * np.arange(n_syn)[:, None] + np.arange(2)[None, :]).astype(np.int64)
    wts = np.asarray(bal.weights, np.float32)
    half = fc.dtype == np.float16
    buf = np.empty((n_real + 2 * n_syn, 1, S, C), np.uint16 if half else np.float32)
    flat = (buf.view(np.float16) if half else buf).reshape(len(buf), *fc.feature_shape)
    history = []
    for e in range(cfg.epochs):
        order = rng.permutation(n)
        views = (rng.random(n) * V).astype(np.int64)
        view_of = np.empty(n, np.int64)
        view_of[order] = views
        want = [samples[tr[i]][view_of[i]] for i in range(n_real)]
        for j, (a, b) in enumerate(bal.parents):
            v = view_of[n_real + j]
            want += [samples[tr[a]][v], samples[tr[b]][v]]
        fc.read_features(np.array(want), out=flat)
        dropout_pool(buf, order.astype(np.int64), np.zeros(n, np.int64), keep_q(dropout), cfg.seed, e, pooled,
                     par, wts, n_real)
        loss, acc = loop.epoch(tf.constant(pooled), tf.constant(y[order]), tf.constant(w_all[order]))
        rec = {"epoch": e + 1, "loss": float(loss), "accuracy": float(acc)}
        if Xv is not None:
            vl, va = loop.evaluate(tf.constant(Xv), tf.constant(one_hot(yv)))
            rec.update(val_loss=float(vl), val_accuracy=float(va))
        else:
            rec.update(val_loss=float("nan"), val_accuracy=float("nan"))
        history.append(rec)
        if report:
            report(rec)
    return history


def _cache_info(fc: FeatureCache) -> dict:
    """Where a run's features came from: cache path, key, and the backbone weights used."""
    return {"path": str(Path(fc.path).resolve()), "key": fc.content_hash(),
            "weights": {**fc.config["weights"], "path": str(fc.attrs.get("weights_path", "")) or None}}


def _write_run(runs_dir, name, fc, cfg, dropout, model, history, test_rows, p_test, threshold, metrics, split,
               target_recall) -> Path:
    runs_dir = Path(runs_dir)
    final = runs_dir / name
    k = 1
    while final.exists():
        k += 1
        final = runs_dir / f"{name}-{k}"
    tmp = runs_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "head.keras")
    config = {"head": cfg.as_dict(), "dropout_used": dropout, "threshold": threshold,
              "target_recall": target_recall, "extract": fc.config}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "cache.json").write_text(json.dumps(_cache_info(fc), indent=2))
    with open(tmp / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "loss", "accuracy", "val_loss", "val_accuracy"])
        w.writeheader()
        w.writerows(history)
    man = fc.manifest
    with open(tmp / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "path", "patient_id", "source", "label", "p_covid", "pred"])
        for r, p in zip(test_rows, p_test):
            w.writerow([int(r), man["path"][r], man["patient_id"][r], man["source"][r], int(man["label"][r]),
                        f"{p:.6f}", int(p >= threshold)])
    np.save(tmp / "split.npy", np.asarray(split, np.int8))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, final)
    return final


def cross_validate(cache_path: str | Path, cfg: HeadConfig, runs_dir: str | Path = "runs", *, folds: int = 5,
                   repeats: int = 1, by: str = "patient", target_recall: float | None = None,
                   memory_budget_gb: float = 8.0, progress: bool = True) -> Path:
    """Stratified, patient-grouped k-fold (x repeats) on one cache; returns the parent run folder.

    Every image has its augmented views in the cache, so any fold can train on it without
    extracting again.  The parent's metrics.json holds the mean and 95% t interval of
    every metric over folds; each fold is a complete run folder of its own.
    """
    from .metrics import mean_interval
    from .split import cv_folds

    fc = open_cache(cache_path)
    t0 = time.perf_counter()
    man = fc.manifest
    ok = man["split"] >= 0  # rows with features
    idx = np.flatnonzero(ok)
    runs_dir = Path(runs_dir)
    stamp = f"{fc.backbone}-cv{folds}x{repeats}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_tmp = runs_dir / f".{stamp}.tmp"
    shutil.rmtree(parent_tmp, ignore_errors=True)
    parent_tmp.mkdir(parents=True)
    fold_metrics = []
    val = float(fc.config["split"]["val"])
    for r, f, sp in cv_folds(man["label"][idx], man["patient_id"][idx], folds, repeats, by=by,
                             seed=cfg.seed, val=val):
        split = np.full(len(man["label"]), -1, np.int8)
        split[idx] = sp
        _log(f"fold {f + 1}/{folds}, repeat {r + 1}/{repeats}")
        run = fit_head(cache_path, cfg, parent_tmp, split=split, target_recall=target_recall,
                       memory_budget_gb=memory_budget_gb, name=f"r{r}-f{f}", progress=progress, fc=fc)
        fold_metrics.append(json.loads((run / "metrics.json").read_text()))
    keys = ["covid_precision", "covid_recall", "covid_f1", "normal_precision", "normal_recall", "normal_f1",
            "TP", "FP", "FN", "TN", "accuracy", "specificity", "roc_auc", "pr_auc", "n_covid", "n_normal"]
    cv = {k: mean_interval([m["argmax"][k] for m in fold_metrics]) for k in keys}
    if target_recall is not None:
        for k in ("covid_recall", "covid_precision", "specificity"):
            cv[f"op_{k}"] = mean_interval([m["operating_point"]["test"][k] for m in fold_metrics])
    cv.update(n_folds=folds, n_repeats=repeats, grouped_by=by)
    first = fold_metrics[0]
    metrics = {"cv": cv, "backbone": fc.backbone, "weights": first["weights"], "pretrained": first["pretrained"],
               "sources_test": first["sources_test"], "fit_seconds": time.perf_counter() - t0,
               "peak_rss_mb": peak_rss_mb(), "folds": [m["argmax"] for m in fold_metrics]}
    (parent_tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (parent_tmp / "config.json").write_text(json.dumps({"head": cfg.as_dict(), "folds": folds, "repeats": repeats,
                                                        "target_recall": target_recall, "extract": fc.config}, indent=2))
    (parent_tmp / "cache.json").write_text(json.dumps(_cache_info(fc), indent=2))
    final = runs_dir / stamp
    k = 1
    while final.exists():
        k += 1
        final = runs_dir / f"{stamp}-{k}"
    os.replace(parent_tmp, final)
    return final
