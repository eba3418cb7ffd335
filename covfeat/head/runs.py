"""Run folders: the only writer and reader of what fit-head, cross-validation and audit leave on disk.

A single-split run folder holds ``head.keras``, ``config.json`` (the fit settings with
dropout resolved, the split, the threshold and the cache's extraction config),
``cache.json`` (which cache, its key, its weights), ``history.csv``, ``predictions.csv``
(test rows, with the patient group each interval resamples), ``split.npy`` (train/val/test per manifest row, -1 for skipped images) and
``metrics.json``; the audit adds ``audit.json``.  A cross-validation folder holds
``config.json``, ``cache.json``, ``metrics.json`` and one run folder per fold.

Every folder is written under a temporary name, fsynced and renamed when complete
(:class:`covfeat.core.fsutil.AtomicDir`), so a folder that exists is a finished run, even
after a power loss.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from covfeat.core.errors import RunError
from covfeat.core.fsutil import atomic_file, remove_stale
from covfeat.core.settings import from_dict
from covfeat.head.config import FitConfig

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


PREDICTION_FIELDS = ["row", "path", "patient_id", "source", "label", "p_covid", "pred", "group"]
# "group": the patient group (patients joined by near-duplicates) every interval resamples;
# runs fitted before covfeat recorded it lack the column.


def remove_stale_tmp(parent: str | Path) -> list[Path]:
    """Remove the temporary run folders in ``parent`` whose writer is gone (``covfeat clean``;
    :func:`covfeat.core.fsutil.remove_stale`); those of live writers, and anything not
    covfeat's, are left alone."""
    return remove_stale(parent)


def check_writable(folder: str | Path, what: str) -> Path:
    """Refuse an output folder that cannot be written, before any work."""
    from covfeat.core.errors import ConfigError

    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: expected a folder covfeat can write, got {str(folder)!r} ({probe} is not writable).")
    return folder


def write_json_atomic(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float))


def cache_info(fc) -> dict:
    """Where a run's features came from: cache path, key, and the backbone weights used."""
    return {"path": str(Path(fc.path).resolve()), "key": fc.content_hash(),
            "weights": {**fc.config["weights"], "path": str(fc.attrs.get("weights_path", "")) or None}}


def run_config(fit: FitConfig, fc, threshold: float | None) -> dict:
    return {**fit.run_dict(), "threshold": threshold, "extract": fc.config}


def write_run(folder: Path, *, model, fit: FitConfig, fc, history: list[dict], test_rows: np.ndarray,
              p_test: np.ndarray, threshold: float, split: np.ndarray, metrics: dict, groups) -> None:
    """Write every file of a single-split run into ``folder`` (inside an :class:`covfeat.core.fsutil.AtomicDir`)."""
    model.save(folder / "head.keras")
    (folder / "config.json").write_text(json.dumps(run_config(fit, fc, threshold), indent=2))
    (folder / "cache.json").write_text(json.dumps(cache_info(fc), indent=2))
    with open(folder / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows(history)
    man = fc.manifest
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_FIELDS)
        for r, p, g in zip(test_rows, p_test, groups):
            w.writerow([int(r), man["path"][r], man["patient_id"][r], man["source"][r], int(man["label"][r]),
                        f"{p:.6f}", int(p >= threshold), g])
    np.save(folder / "split.npy", np.asarray(split, np.int8))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def write_cv(folder: Path, *, fit: FitConfig, fc, metrics: dict) -> None:
    """The parent folder of a cross-validation (its folds are run folders inside it)."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "config.json").write_text(json.dumps(run_config(fit, fc, None), indent=2))
    (folder / "cache.json").write_text(json.dumps(cache_info(fc), indent=2))


def is_finished(path: str | Path) -> bool:
    """True when ``path`` is a finished run folder (it exists only once complete)."""
    return (Path(path) / "metrics.json").is_file()


class Run:
    """A finished run folder, read.

    Raises
    ------
    RunError
        The folder is not a finished covfeat run.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for f in ("metrics.json", "config.json", "cache.json"):
            if not (self.path / f).is_file():
                raise RunError(f"{self.path} is not a finished covfeat run (no {f}); pass a folder printed by "
                               "`covfeat fit-head`.")
        try:
            self.metrics = json.loads((self.path / "metrics.json").read_text())
            self.config = json.loads((self.path / "config.json").read_text())
            self.cache_info = json.loads((self.path / "cache.json").read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.path}: a run file is damaged ({exc}).") from None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_cv(self) -> bool:
        return "cv" in self.metrics

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def extract_config(self) -> dict:
        return self.config["extract"]

    @property
    def backbone(self) -> str:
        return self.extract_config["backbone"]

    @property
    def pretrained(self) -> bool:
        return bool(self.metrics.get("pretrained", True))

    def fit_config(self) -> FitConfig:
        keys = ("head", "split", "target_recall", "folds", "repeats")
        return from_dict(FitConfig, {k: self.config[k] for k in keys if k in self.config}, f"{self.path}/config.json")

    def require_single(self, what: str) -> "Run":
        if self.is_cv or not (self.path / "head.keras").is_file() or not (self.path / "split.npy").is_file():
            raise RunError(f"{self.path} is not a finished single-split covfeat run; {what} needs a folder printed by "
                           "`covfeat fit-head` without --folds.")
        return self

    @property
    def has_predictions(self) -> bool:
        return not self.is_cv and (self.path / "predictions.csv").is_file()

    def history(self) -> list[dict]:
        f = self.path / "history.csv"
        if not f.is_file():
            return []
        with open(f, newline="") as fh:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]

    def predictions(self) -> dict[str, np.ndarray]:
        """The test rows: row, path, patient_id, source, label, p_covid, pred, and group (the
        patient group) when the run recorded it."""
        with open(self.path / "predictions.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            have = reader.fieldnames or []
        out = {k: np.array([r[k] for r in rows]) for k in PREDICTION_FIELDS if k in have}
        for k in ("row", "label", "pred"):
            out[k] = out[k].astype(int)
        out["p_covid"] = out["p_covid"].astype(float)
        return out

    def own_cache(self, needed_for: str):
        """The feature cache this run was fitted on, opened: the one its ``cache.json`` names, and
        checked to be that cache by its key.  ``needed_for`` says, in the error, why it is read.

        Raises
        ------
        RunError
            The cache is gone, or the file at its path is another cache.
        """
        from covfeat.store.reader import open_cache

        path = Path(self.cache_info["path"])
        if not path.is_file():
            raise RunError(f"The feature cache of {self.path} ('{path}') is gone; {needed_for}. Put it back.")
        fc = open_cache(path)
        if fc.content_hash() != self.cache_info["key"]:
            raise RunError(f"'{path}' is not the cache {self.path} was fitted on (its key differs); put the run's own "
                           "cache back.")
        return fc

    def split(self) -> np.ndarray:
        return np.load(self.path / "split.npy")

    def load_head(self):
        import keras

        from covfeat.head.model import probability_bce

        probability_bce()  # registers the loss class the saved head refers to
        return keras.models.load_model(self.path / "head.keras")

    def folds(self) -> list["Run"]:
        return [Run(p) for p in sorted(self.path.iterdir()) if p.is_dir() and (p / "metrics.json").is_file()
                and not p.name.startswith(".")]

    @property
    def audit(self) -> dict | None:
        f = self.path / "audit.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def write_audit(self, result: dict) -> Path:
        write_json_atomic(self.path / "audit.json", result)
        return self.path / "audit.json"

    def as_report_dict(self) -> dict:
        """metrics.json plus the audit and the folder's name, as report and reproduce read a run."""
        m = dict(self.metrics)
        if self.audit is not None:
            m["audit"] = self.audit
        m["_path"] = str(self.path)
        m["_name"] = self.name
        return m
