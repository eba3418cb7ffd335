"""New radiographs through a finished run: its own input pipeline, backbone weights, head and threshold.

Everything is taken from the run's recorded extraction config, never from defaults,
because a model fed differently scaled pixels than it was trained on tends to call every
image one class.  :class:`Predictor` is the one place that rebuilds a run for inference;
``predict``, ``explain`` and ``export`` use it (:mod:`covfeat.use.export` folds the same
scaling, backbone, head and threshold into a Keras model, a TF SavedModel or an ONNX file,
with its model card and serving contract beside it).

The p_covid they give a deployer is corrected from the prior the head was trained toward
(SMOTE's 50/50) to the COVID-19 share of the run's data, or to ``--prevalence``
(:mod:`covfeat.use.prevalence`); the head's own number stays as ``p_covid_raw``, and the
labels are the run's, at its threshold on the raw number, whatever the prevalence.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError, DataError
from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights, weights_from_config
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.images import InputPipeline
from covfeat.extraction.precision import prepare_process
from covfeat.extraction.sources import IMAGE_SUFFIXES
from covfeat.head.runs import Run, check_writable, damaged
from covfeat.imaging.decode import UnreadableImage
from covfeat.use.card import warning
from covfeat.use.keras_layers import load_exported as load_exported  # its old home: tests and users import it here
from covfeat.use.prevalence import PriorCorrection, check_prevalence, prior_correction

TABLE_FIELDS = ["path", "p_covid", "p_covid_raw", "label", "prevalence", "prevalence_from", "error"]


class Predictor:
    """A finished single-split run rebuilt for new images.

    Attributes: ``run`` (:class:`covfeat.head.runs.Run`), ``pipeline`` (decoding and scaling, as
    extraction did them), ``backbone`` (the very weights of the cache), ``head``,
    ``threshold`` (the run's operating point; 0.5 unless --target-recall chose one).

    Raises
    ------
    RunError, WeightsUnavailable
    """

    def __init__(self, run: str | Path):
        self.run = Run(run).require_single("this command")
        stored = self.run.extract_config
        # The arithmetic the cache's features were computed in (float32 unless recorded), set
        # before anything here starts TensorFlow (the onednn route must).
        self.route = stored.get("precision_route", "float32")
        prepare_process(self.route)
        arg = weights_from_config(stored, self.run.cache_info.get("weights", {}).get("path"), "predict")
        self.spec = resolve_weights(get_backbone(stored["backbone"]), arg, seed=stored["seed"])
        self.extract = ExtractConfig.from_stored(stored, weights=arg)
        self.pipeline = InputPipeline.for_config(self.extract)
        self.threshold = self.run.threshold
        self.head = self.run.load_head()
        self.backbone = build_backbone(get_backbone(self.extract.backbone), self.spec, seed=self.extract.seed,
                                       route=self.route)
        want, got = tuple(self.backbone.output_shape[1:]), tuple(self.head.input_shape[1:])
        if want != got:  # a head.keras from another run or backbone would fail later inside Keras
            raise damaged(self.run.path / "head.keras",
                          f"it takes features of shape {got}, but {self.extract.backbone} gives {want}")

    def p_covid(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """P(COVID-19) of scaled model inputs (n, 224, 224, 3)."""
        out = []
        for s in range(0, len(x), batch_size):
            feats = self.backbone.predict(x[s:s + batch_size], verbose=0)
            out.append(self.head.predict(feats, verbose=0)[:, 1])
        return np.concatenate(out) if out else np.zeros(0)

    def label(self, p: float) -> str:
        return "COVID-19" if p >= self.threshold else "NORMAL"


def list_images(items: list[str | Path]) -> list[Path]:
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def check_table_path(out: str | Path | None) -> None:
    """Refuse an output table we could not write, before any work."""
    if out is None:
        return
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out: expected a file name ending in .csv or .json, got {str(out)!r}.")
    check_writable(out.parent, "--out")


def predict(run: str | Path, items: list[str | Path], batch_size: int = 16,
            prevalence: float | None = None) -> list[dict]:
    """P(COVID-19) and the label at the run's threshold for every image; unreadable ones get an error.

    Each row: ``p_covid`` corrected from the head's training prior to the COVID-19 share of
    the run's data, or to ``prevalence`` when given (``prevalence`` and ``prevalence_from``
    say which), ``p_covid_raw`` (the head's own output) and ``label`` (the run's threshold on
    ``p_covid_raw``, the same cut as the moved threshold on ``p_covid``).
    """
    return predict_table(run, items, batch_size, prevalence)[0]


def predict_table(run: str | Path, items: list[str | Path], batch_size: int = 16,
                  prevalence: float | None = None) -> tuple[list[dict], PriorCorrection]:
    """:func:`predict`'s rows and the correction they carry (whose line heads the printed table).

    Raises
    ------
    DataError, ConfigError, RunError, WeightsUnavailable
    """
    check_prevalence(prevalence)
    images = list_images(items)
    if not images:
        raise DataError("No image files given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ").")
    corr = prior_correction(Run(run).require_single("this command"), prevalence)  # refused before the backbone
    pr = Predictor(run)
    rows, xs, where = [], [], []
    for p in images:
        row = {"path": str(p), "p_covid": None, "p_covid_raw": None, "label": None, "prevalence": corr.target,
               "prevalence_from": corr.target_from, "error": ""}
        try:
            xs.append(pr.pipeline(p))
            where.append(len(rows))
        except UnreadableImage as exc:
            row["error"] = str(exc)
        except OSError as exc:
            row["error"] = f"cannot read file ({exc})"
        rows.append(row)
    probs = pr.p_covid(np.stack(xs), batch_size) if xs else np.zeros(0)
    for i, raw, pc in zip(where, probs, corr.apply(probs)):
        rows[i].update(p_covid=float(pc), p_covid_raw=float(raw), label=pr.label(float(raw)))
    line = warning(pr.run)
    if line:
        print(line, file=sys.stderr)
    return rows, corr


def write_table(rows: list[dict], out: str | Path) -> Path:
    """The predict table as CSV, or JSON when ``out`` ends in .json."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2))
    else:
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
            w.writeheader()
            w.writerows(rows)
    return out


def format_table(rows: list[dict], correction: PriorCorrection | None = None) -> str:
    """The rows as text, headed by the line that says which probability p_covid is."""
    width = max([len(r["path"]) for r in rows] + [4])
    lines = [correction.describe()] if correction is not None else []
    lines.append(f"{'path'.ljust(width)}  p_covid  p_covid_raw  label")
    for r in rows:
        if r["error"]:
            lines.append(f"{r['path'].ljust(width)}  skipped: {r['error']}")
        else:
            lines.append(f"{r['path'].ljust(width)}  {r['p_covid']:.4f}   {r['p_covid_raw']:.4f}       {r['label']}")
    return "\n".join(lines)
