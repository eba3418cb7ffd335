"""Stage two, orchestrated: open a cache, split it, balance, train the head, evaluate, write the run.

``fit_head`` is the whole of ``covfeat fit-head`` as a library call: one split (the
paper's protocol, grouped by patient by default) or, with ``folds``, stratified grouped
cross-validation on the same cache.  The split is made here, from the cache's manifest,
so changing it never re-extracts.  Balancing is :mod:`covfeat.head.balance`, the model
:mod:`covfeat.head.model`, the epochs :mod:`covfeat.head.loop`, the folder :mod:`covfeat.head.runs`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from covfeat.core.errors import CacheError, DataError
from covfeat.core.fsutil import AtomicDir
from covfeat.extraction.backbones import Backbone, get_backbone
from covfeat.head.balance import balance
from covfeat.head.config import FitConfig, SplitConfig
from covfeat.head.loop import MemorySource, StreamedSource, train
from covfeat.head.model import build_head, pooled_mean
from covfeat.head.runs import check_writable, write_cv, write_run
from covfeat.head.split import TEST, TRAIN, VAL, assign_split, cv_folds, patient_groups, usable_pairs
from covfeat.store.reader import FeatureCache, open_cache
from covfeat.trust import evaluation
from covfeat.trust.calibration import effective_prior
from covfeat.trust.metrics import (
    COUNT_KEYS,
    CV_INTERVAL,
    METRIC_KEYS,
    by_source,
    classification_metrics,
    cv_interval,
    threshold_for_recall,
)


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


def make_split(fc: FeatureCache, cfg: SplitConfig) -> np.ndarray:
    """Train/val/test (0/1/2) per manifest row, -1 for images without features and for copies
    of one radiograph under both labels; patients and near-duplicates are kept whole."""
    ok = np.flatnonzero(fc.usable())
    split = np.full(fc.n_rows, -1, np.int8)
    man = fc.manifest
    split[ok] = assign_split(man["label"][ok], man["patient_id"][ok], cfg, usable_pairs(fc, cfg, ok))
    return split


def not_used(fc: FeatureCache) -> dict:
    """How many files of the data are not in the run, by reason (``covfeat info`` lists them)."""
    out = {"skipped at extraction": len(fc.skipped)}
    for key in ("missing", "broken_links", "not_images", "conflicts"):
        out[key.replace("_", " ")] = len(json.loads(fc.attrs.get(key, "[]")))
    out["near-duplicates under both labels"] = sum(len(g) for g in fc.near_duplicate_conflicts())
    return out


def near_duplicate_summary(fc: FeatureCache, cfg: SplitConfig) -> dict:
    """What the run records of the near-duplicate grouping: thresholds, pairs, groups joined."""
    nd = json.loads(fc.attrs["near_duplicates"]) if "near_duplicates" in fc.attrs else {"pairs": []}
    man = fc.manifest
    pairs = [p for p in nd["pairs"]]
    joined = sum(1 for i, j, *_ in pairs if man["patient_id"][i] != man["patient_id"][j])
    return {"mode": cfg.near_duplicates, "max_bits": nd.get("max_bits"), "min_corr": nd.get("min_corr"),
            "n_pairs": len(pairs), "n_pairs_across_patients": joined,
            "pairs": [[str(man["path"][i]), str(man["path"][j]), str(man["patient_id"][i]), str(man["patient_id"][j]),
                       d, c] for i, j, d, c in pairs]}


def rows_by_split(fc: FeatureCache, split: np.ndarray) -> dict[int, np.ndarray]:
    """Manifest rows of each split that have cached features (skipped files have none)."""
    have = np.flatnonzero(fc.has_features())
    return {s: have[split[have] == s] for s in (TRAIN, VAL, TEST)}


class LoadedMaps:
    """Every view of the given manifest rows, read from the cache once and kept in memory
    (float16 bit patterns as uint16, or float32): a fit trains from it and takes SMOTE's
    originals (view 0) from it, and cross-validation's folds all share one instead of each
    reading its own rows again."""

    def __init__(self, fc: FeatureCache, rows: np.ndarray):
        from covfeat.store.reader import populated_empty

        self.rows = np.asarray(rows, np.int64)
        self.pos = np.full(fc.n_rows, -1, np.int64)
        self.pos[self.rows] = np.arange(len(self.rows))
        shape = fc.feature_shape
        self.half = fc.dtype == np.float16
        self.pool = populated_empty((len(self.rows), fc.n_views, shape[0] * shape[1], shape[2]),
                                    np.uint16 if self.half else np.float32)
        idx = np.concatenate([fc.samples()[int(r)] for r in self.rows])
        fc.read_features(idx, out=(self.pool.view(np.float16) if self.half else self.pool).reshape(
            len(self.rows) * fc.n_views, *shape))

    def holds(self, rows) -> bool:
        return bool((self.pos[np.asarray(rows, np.int64)] >= 0).all())

    @staticmethod
    def nbytes(fc: FeatureCache, rows) -> int:
        return len(rows) * fc.n_views * int(np.prod(fc.feature_shape)) * fc.dtype.itemsize

    def originals(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """View 0 of manifest ``rows`` as float32 (n, S * C), exactly as read_features gives them."""
        from covfeat.store.reader import f16_rows_into

        p = self.pos[np.asarray(rows, np.int64)]
        src = self.pool[p, 0].reshape(len(p), -1)
        if out is None:
            out = np.empty(src.shape, np.float32)
        if self.half:
            f16_rows_into(src.view(np.float16), out, np.arange(len(p)))
        else:
            out[...] = src
        return out


def _open(cache_path, fc: FeatureCache | None) -> tuple[FeatureCache, Backbone]:
    """The cache (opened unless given) and its backbone's registry entry, looked up once per
    fit-head and checked against the maps' shape; cross-validation hands both to its folds."""
    if fc is None:
        from covfeat.store.catalog import describe_cache

        fc = open_cache(cache_path)
        _log(f"Cache: {describe_cache(cache_path)}")
    bb = get_backbone(fc.backbone)
    if tuple(fc.feature_shape) != tuple(bb.feature_shape):
        raise CacheError(f"{fc.path} holds maps of shape {fc.feature_shape}, but {bb.name} gives "
                         f"{bb.feature_shape}; extract again.")
    return fc, bb


def fit_head(cache_path: str | Path, fit: FitConfig | None = None, runs_dir: str | Path = "runs", *,
             split: np.ndarray | None = None, name: str | None = None, progress: bool = True,
             fc: FeatureCache | None = None, maps: LoadedMaps | None = None) -> Path:
    """Train the paper's head on one cache and write a run folder; returns its path.

    With ``fit.folds`` > 0 this is :func:`cross_validate`.  ``split`` (one value per
    manifest row) overrides ``fit.split``; the audit uses it to retrain on a run's own split.
    ``maps`` (every row's maps already in memory, as cross-validation holds them) replaces
    reading the rows from the cache; the numbers are the same.

    Raises
    ------
    CacheError, DataError, ConfigError
    """
    fit = fit or FitConfig()
    fit.validate()
    check_writable(runs_dir, "--runs-dir")
    if fit.folds:
        return cross_validate(cache_path, fit, runs_dir, progress=progress, fc=fc)
    t0 = time.perf_counter()
    fc, backbone = _open(cache_path, fc)
    return _fit_split(fc, fit.resolved(backbone), runs_dir, t0, split=split, name=name, progress=progress,
                      maps=maps)[0]


def _fit_split(fc: FeatureCache, fit: FitConfig, runs_dir: str | Path, t0: float, *, split: np.ndarray | None,
               name: str | None, progress: bool, maps: LoadedMaps | None) -> tuple[Path, dict, dict]:
    """One split on an opened cache, ``fit`` with its dropout already resolved against the
    cache's backbone (once, by the caller); returns the run folder, the metrics it wrote and
    its test rows' labels, scores, sources and patient groups, so cross-validation takes each
    fold's numbers from memory instead of reading them back.

    The SMOTE- or class-weight-balanced head learns toward its training prior (recorded as
    ``train_prior``): calibration is reported for its raw p_covid and corrected to the test
    prevalence."""
    cfg = fit.head
    if split is None:
        split = make_split(fc, fit.split)
        nd = near_duplicate_summary(fc, fit.split)
        if nd["n_pairs"] and fit.split.near_duplicates == "group":
            _log(f"Near-duplicates: {nd['n_pairs']} pair(s) kept on one side of the split "
                 f"({nd['n_pairs_across_patients']} joining two patient IDs).")
    else:
        split = np.asarray(split, np.int8)
    parts = rows_by_split(fc, split)
    labels_m = fc.manifest["label"]
    for s, nm in ((TRAIN, "training"), (TEST, "test")):
        got = np.bincount(labels_m[parts[s]], minlength=2)
        if (got == 0).any():
            raise DataError(f"The {nm} split has {got[1]} COVID-19 and {got[0]} NORMAL rows; it needs both. "
                            "Use more data or other split ratios.")
    if fit.target_recall is not None and not (labels_m[parts[VAL]] == 1).any():
        raise DataError("--target-recall picks the threshold on validation rows; the validation split has no "
                        "COVID-19 rows. Use a larger --val.")
    V = fc.n_views
    shape = fc.feature_shape
    S, C = shape[0] * shape[1], shape[2]
    tr = parts[TRAIN]
    y_tr = labels_m[tr]

    marks = {"read_and_prepare": time.perf_counter() - t0}
    # Every view of the training rows in memory (unless CV shares its own, or they exceed
    # the memory budget and are streamed); SMOTE's originals are their view 0.
    pool_bytes = LoadedMaps.nbytes(fc, tr)  # SMOTE rows are formed on the fly
    streamed = maps is None and pool_bytes > fit.memory_budget_gb * 2**30
    shared = maps is not None
    if shared and not maps.holds(tr):
        raise ValueError("fit_head(maps=...) must hold every training row")
    if maps is None and not streamed:
        maps = LoadedMaps(fc, tr)
    marks["load_pool"] = time.perf_counter() - t0 - sum(marks.values())

    # Originals of the training rows, flattened, for SMOTE's neighbour search.
    from covfeat.store.reader import populated_empty

    if maps is not None:
        X0 = maps.originals(tr, out=populated_empty((len(tr), S * C)))
    else:
        X0 = fc.read_features(fc.originals(tr), out=populated_empty((len(tr), *shape))).reshape(len(tr), -1)
    bal = balance(X0, y_tr, cfg)
    marks["smote"] = time.perf_counter() - t0 - sum(marks.values())
    del X0
    n_real, n_syn = len(tr), len(bal.parents)
    if not fc.pretrained:
        _log("NOTE: these features come from a NOT PRETRAINED (random-init) backbone.")
    counts = np.bincount(bal.labels, minlength=2)
    _log(f"Training rows: {n_real} real + {n_syn} SMOTE ({counts[1]} COVID-19, {counts[0]} NORMAL), {V} views each; "
         f"{'streamed from HDF5' if streamed else 'in memory'} ({pool_bytes / 2**30:.2f} GiB"
         f"{', every row loaded once for all folds' if shared else ''})")

    model, head = _initial_head(shape, cfg)
    marks["build_head"] = time.perf_counter() - t0 - sum(marks.values())
    val_rows, test_rows = parts[VAL], parts[TEST]

    def originals(rows):
        if maps is not None and maps.holds(rows):
            return maps.originals(rows).reshape(len(rows), *shape)
        return fc.read_features(fc.originals(rows))

    Xv = pooled_mean(originals(val_rows)) if len(val_rows) else None
    yv = labels_m[val_rows] if len(val_rows) else None
    if maps is not None:
        source = MemorySource(maps.pool, bal.parents, bal.weights, index=maps.pos[tr])
    else:
        source = StreamedSource(fc, tr, bal.parents, bal.weights)
    history = train(source, bal.labels, np.full(n_real + n_syn, V, np.int64), Xv, yv, head, cfg,
                    sample_weight=bal.sample_weight, progress=_epoch_printer(cfg.epochs) if progress else None)
    del source
    train_seconds = time.perf_counter() - t0
    marks["epochs"] = train_seconds - sum(marks.values())

    def predict(pooled):
        if pooled is None or not len(pooled):
            return np.zeros(0)
        if model is head:  # numba engine: the numpy head
            return head.predict(pooled)[:, 1]
        return head(pooled, training=False).numpy()[:, 1]

    p_test = predict(pooled_mean(originals(test_rows)) if len(test_rows) else None)
    p_val = predict(Xv)  # the validation rows pooled once, for the epochs and for the threshold
    threshold = 0.5
    y_te, y_va, src_te = labels_m[test_rows], labels_m[val_rows], fc.manifest["source"][test_rows]
    g_te = patient_groups(fc, test_rows)  # the unit every interval resamples
    metrics = {"argmax": {**classification_metrics(y_te, p_test, 0.5), **evaluation.table2(y_te, p_test, g_te)}}
    if fit.target_recall is not None:
        threshold = threshold_for_recall(y_va, p_val, fit.target_recall)
        metrics["operating_point"] = {
            "target_recall": fit.target_recall, "threshold": threshold,
            "validation": classification_metrics(y_va, p_val, threshold),
            "test": {**classification_metrics(y_te, p_test, threshold),
                     **evaluation.table2(y_te, p_test, g_te, threshold)},
            **evaluation.operating_point(y_va, p_val, patient_groups(fc, val_rows), fit.target_recall, threshold),
        }
    at = {"argmax": 0.5, **({"operating_point": threshold} if fit.target_recall is not None else {})}
    w = np.ones(len(bal.labels)) if bal.sample_weight is None else bal.sample_weight
    train_prior = effective_prior(float(w[bal.labels == 1].sum()), float(w[bal.labels == 0].sum()))
    metrics.update(
        backbone=fc.backbone, weights=fc.config["weights"], pretrained=fc.pretrained,
        n_train_real=int(n_real), n_train_smote=int(n_syn), n_val=int(len(val_rows)), n_test=int(len(test_rows)),
        fit_seconds=train_seconds, fit_stages_seconds=marks, peak_rss_mb=peak_rss_mb(), streamed=bool(streamed),
        sources_test=_sources(fc, test_rows), not_used=not_used(fc),
        by_source={k: by_source(y_te, p_test, src_te, t) for k, t in at.items()},
        by_source_patients={k: evaluation.by_source(y_te, p_test, src_te, g_te, t) for k, t in at.items()},
        train_prior=train_prior, calibration=evaluation.calibration(y_te, p_test, g_te, train_prior),
        predictive={k: evaluation.predictive(y_te, p_test, g_te, None, t) for k, t in at.items()},
        near_duplicates=near_duplicate_summary(fc, fit.split),
    )
    with AtomicDir(runs_dir, name or f"{fc.backbone}-{time.strftime('%Y%m%d-%H%M%S')}") as d:
        write_run(d.path, model=model, fit=fit, fc=fc, history=history, test_rows=test_rows, p_test=p_test,
                  threshold=threshold, split=split, metrics=metrics, groups=g_te)
    return d.final, metrics, {"y": y_te, "p": p_test, "source": src_te, "group": g_te, "threshold": threshold}


def _initial_head(shape, cfg):
    """(what saves head.keras, what the epochs train).  The numba engine trains a numpy head
    whose initial weights and Keras file come from a template (:mod:`covfeat.head.template`), so
    the process never imports TensorFlow; the tf engine trains the Keras layers themselves."""
    if cfg.engine == "numba":
        from covfeat.head.model import NumpyHead
        from covfeat.head.template import head_template

        tmpl = head_template(shape, cfg)
        head = NumpyHead(tmpl.initial_weights(), tmpl)
        return head, head
    from covfeat.core.quiet import import_tensorflow
    from covfeat.head.loop import limit_tf_threads

    import_tensorflow()
    limit_tf_threads()  # before TensorFlow runs its first op
    return build_head(shape, cfg)


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


def cross_validate(cache_path: str | Path, fit: FitConfig, runs_dir: str | Path = "runs", *,
                   progress: bool = True, fc: FeatureCache | None = None) -> Path:
    """Stratified, grouped k-fold (x repeats) on one cache; returns the parent run folder.

    Every image has its augmented views in the cache, so any fold can train on any image
    without extracting again.  The parent's metrics.json holds the mean and 95% t interval
    of every metric over folds (clipped to [0, 1] where the metric lives there), and the
    per-source breakdown and test sources of every fold summed, not those of one fold; each
    fold is a complete run folder of its own.  The cache is
    opened, its backbone looked up and the dropout resolved once, here, for every fold.
    """
    fc, backbone = _open(cache_path, fc)
    fit = fit.resolved(backbone)
    t0 = time.perf_counter()
    man = fc.manifest
    idx = np.flatnonzero(fc.usable())
    one = replace(fit, folds=0, repeats=1)
    fold_metrics, held = [], []
    # Every row's maps read once for all folds when they fit the memory budget (each fold
    # would otherwise read its own training rows again).
    folds = list(cv_folds(man["label"][idx], man["patient_id"][idx], fit.folds, fit.repeats, by=fit.split.by,
                          seed=fit.split.seed, val=fit.split.val, pairs=usable_pairs(fc, fit.split, idx)))
    maps = LoadedMaps(fc, idx) if LoadedMaps.nbytes(fc, idx) <= fit.memory_budget_gb * 2**30 else None
    stamp = f"{fc.backbone}-cv{fit.folds}x{fit.repeats}-{time.strftime('%Y%m%d-%H%M%S')}"
    with AtomicDir(runs_dir, stamp) as d:
        for r, f, sp in folds:
            split = np.full(fc.n_rows, -1, np.int8)
            split[idx] = sp
            _log(f"fold {f + 1}/{fit.folds}, repeat {r + 1}/{fit.repeats}")
            _, m, h = _fit_split(fc, one, d.path, time.perf_counter(), split=split, name=f"r{r}-f{f}",
                                 progress=progress, maps=maps)
            fold_metrics.append(m)
            held.append(h)
        ratio = float(np.mean([m["n_test"] / m["n_train_real"] for m in fold_metrics]))
        cv = {k: cv_interval([m["argmax"][k] for m in fold_metrics], ratio, fit.folds,
                             bounds=None if k in COUNT_KEYS else (0.0, 1.0)) for k in METRIC_KEYS}
        if fit.target_recall is not None:
            for k in ("covid_recall", "covid_precision", "specificity"):
                cv[f"op_{k}"] = cv_interval([m["operating_point"]["test"][k] for m in fold_metrics], ratio, fit.folds,
                                            bounds=(0.0, 1.0))
        cv.update(n_folds=fit.folds, n_repeats=fit.repeats, grouped_by=fit.split.by, interval=CV_INTERVAL,
                  test_over_train=ratio, target_recall=fit.target_recall)
        first = fold_metrics[0]
        metrics = {"cv": cv, "backbone": fc.backbone, "weights": first["weights"], "pretrained": first["pretrained"],
                   "sources_test": _summed([m["sources_test"] for m in fold_metrics]),
                   "by_source_patients": _summed_by_source(held, fit.target_recall is not None),
                   **_pooled_calibration([(h, m) for (r, _, _), h, m in zip(folds, held, fold_metrics) if r == 0]),
                   "fit_seconds": time.perf_counter() - t0,
                   "peak_rss_mb": peak_rss_mb(), "folds": [m["argmax"] for m in fold_metrics]}
        write_cv(d.path, fit=fit, fc=fc, metrics=metrics)
    return d.final


def _summed(counts: list[dict]) -> dict:
    """Per source and class, the test images of every fold (and repeat) added up."""
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _pooled_calibration(first_repeat: list[tuple[dict, dict]]) -> dict:
    """Calibration, and PPV and NPV at the rows' own prevalence, of the first repeat's held-out
    folds together: every image once, scored by the head that did not train on it.  Each fold's
    head was trained toward its own prior; the correction uses their mean (0.5 after SMOTE)."""
    y, p, g = (np.concatenate([h[k] for h, _ in first_repeat]) for k in ("y", "p", "group"))
    prior = float(np.mean([m["train_prior"] for _, m in first_repeat]))
    return {"train_prior": prior, "calibration": evaluation.calibration(y, p, g, prior),
            "predictive": {"argmax": evaluation.predictive(y, p, g, None, 0.5)}}


def _summed_by_source(held: list[dict], operating_point: bool) -> dict:
    """The per-source breakdown over every fold's test rows together (each image once per
    repeat), its intervals resampling patient groups.  At the operating point each fold
    calls its rows at its own threshold: those calls, as scores of 0 or 1, are scored at 0.5."""
    y, p, src, g = (np.concatenate([h[k] for h in held]) for k in ("y", "p", "source", "group"))
    out = {"argmax": evaluation.by_source(y, p, src, g, 0.5)}
    if operating_point:
        calls = np.concatenate([(h["p"] >= h["threshold"]).astype(float) for h in held])
        out["operating_point"] = evaluation.by_source(y, calls, src, g, 0.5)
    return out
