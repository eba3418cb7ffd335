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


# What every reader of a run file relies on, checked once where the file is read, so a damaged
# file is named in one line instead of failing later as a KeyError deep in a report.
METRICS_NEEDS = {"backbone": str, "weights": dict}
CONFIG_NEEDS = {"threshold": (float, int, type(None)), "extract": dict}
CACHE_NEEDS = {"path": str, "key": str}


def damaged(path: Path, what: str) -> RunError:
    """The one-line error for a damaged run file: which file, what is wrong, what to do."""
    return RunError(f"{path} is damaged ({what}); restore the run folder or fit the run again.")


def read_run_json(path: Path, needs: dict[str, type | tuple]) -> dict:
    """A run file read as a JSON object holding the keys ``needs`` names, with those types.

    Raises
    ------
    RunError
        The file is missing, unreadable, not JSON, not an object, or lacks a needed key; the
        message names the file.
    """
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise damaged(path, "the file is missing") from None
    except (OSError, ValueError) as exc:
        raise damaged(path, f"not readable as JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    if not isinstance(obj, dict):
        raise damaged(path, f"expected a JSON object, got {type(obj).__name__}")
    for key, kind in needs.items():
        if key not in obj:
            raise damaged(path, f"no {key!r}")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise damaged(path, f"{key!r} is a {type(obj[key]).__name__}")
    return obj


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
        self.metrics = read_run_json(self.path / "metrics.json", METRICS_NEEDS)
        if not isinstance(self.metrics.get("argmax", self.metrics.get("cv")), dict):
            raise damaged(self.path / "metrics.json", "no 'argmax' or 'cv' table of metrics")
        self.config = read_run_json(self.path / "config.json", CONFIG_NEEDS)
        if not isinstance(self.config["extract"].get("backbone"), str):
            raise damaged(self.path / "config.json", "no backbone in 'extract'")
        self.cache_info = read_run_json(self.path / "cache.json", CACHE_NEEDS)

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
        """Every single-split run has test predictions (fit-head always writes them): a missing
        ``predictions.csv`` is a damaged run, named by :meth:`predictions`, not a figure skipped."""
        return not self.is_cv

    def history(self) -> list[dict]:
        f = self.path / "history.csv"
        if not f.is_file():
            return []
        try:
            with open(f, newline="") as fh:
                return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as exc:
            raise damaged(f, f"not a table of numbers: {exc}") from None

    def predictions(self) -> dict[str, np.ndarray]:
        """The test rows: row, path, patient_id, source, label, p_covid, pred, and group (the
        patient group) when the run recorded it.

        Raises
        ------
        RunError
            ``predictions.csv`` is missing, lacks a column, or holds a value that is not a number.
        """
        f = self.path / "predictions.csv"
        try:
            with open(f, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                have = reader.fieldnames or []
        except FileNotFoundError:
            raise damaged(f, "the file is missing") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise damaged(f, f"not readable as CSV: {exc}") from None
        lacking = [k for k in PREDICTION_FIELDS if k != "group" and k not in have]
        if lacking:
            raise damaged(f, f"no column {', '.join(lacking)}")
        out = {k: np.array([r[k] for r in rows]) for k in PREDICTION_FIELDS if k in have}
        try:
            for k in ("row", "label", "pred"):
                out[k] = out[k].astype(int)
            out["p_covid"] = out["p_covid"].astype(float)
        except (ValueError, TypeError) as exc:  # a truncated last line holds None or ''
            raise damaged(f, f"a value is not a number: {exc}") from None
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

    def split(self, n_rows: int | None = None) -> np.ndarray:
        """train/val/test per manifest row (-1 for skipped images), as fit-head wrote it;
        ``n_rows``, when given, is the cache's row count it must match.

        Raises
        ------
        RunError
            ``split.npy`` is missing, not a .npy file, or not a 1-d integer array.
        """
        f = self.path / "split.npy"
        try:
            split = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise damaged(f, "the file is missing") from None
        except (OSError, ValueError, EOFError) as exc:
            raise damaged(f, f"not a .npy file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from None
        if split.ndim != 1 or split.dtype.kind not in "iu":
            raise damaged(f, f"expected a 1-d integer array, got {split.dtype} of shape {split.shape}")
        if n_rows is not None and len(split) != n_rows:
            raise damaged(f, f"{len(split)} rows, but its cache has {n_rows}")
        return split

    def load_head(self):
        """The trained head, as Keras saved it.

        Raises
        ------
        RunError
            ``head.keras`` is missing or Keras cannot load it.
        """
        import keras

        from covfeat.head.model import probability_bce

        f = self.path / "head.keras"
        if not f.is_file():
            raise damaged(f, "the file is missing")
        probability_bce()  # registers the loss class the saved head refers to
        try:
            return keras.models.load_model(f)
        except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors... for one damaged file
            raise damaged(f, f"Keras cannot load it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
                from None

    def folds(self) -> list["Run"]:
        return [Run(p) for p in sorted(self.path.iterdir()) if p.is_dir() and (p / "metrics.json").is_file()
                and not p.name.startswith(".")]

    @property
    def audit(self) -> dict | None:
        f = self.path / "audit.json"
        return read_run_json(f, {}) if f.is_file() else None

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
