"""New radiographs through a finished run: its own input pipeline, backbone weights, head and threshold.

Everything is taken from the run's recorded extraction config, never from defaults,
because a model fed differently scaled pixels than it was trained on tends to call every
image one class.  :class:`Predictor` is the one place that rebuilds a run for inference;
``predict``, ``explain`` and ``export`` use it, and ``export`` folds the same scaling
(as Keras layers), backbone, head and threshold into one Keras model, with its model card
beside it (:mod:`covfeat.use.card`).

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
from covfeat.imaging.decode import INPUT_SIZE, UnreadableImage
from covfeat.use.card import warning, write_card
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


_LAYERS: dict = {}


def threshold_layer_class():
    """``AtThreshold``: P(COVID-19) >= the run's threshold, as 1.0 / 0.0; the threshold is in its
    config, and so is the same threshold in corrected units (``threshold_corrected``), for a
    reader of the corrected ``probabilities``."""
    if "AtThreshold" not in _LAYERS:
        import keras

        @keras.saving.register_keras_serializable(package="covfeat")
        class AtThreshold(keras.layers.Layer):
            def __init__(self, threshold: float, threshold_corrected: float | None = None, **kwargs):
                super().__init__(**kwargs)
                self.threshold = float(threshold)
                self.threshold_corrected = None if threshold_corrected is None else float(threshold_corrected)

            def call(self, probs):
                from keras import ops

                return ops.cast(ops.greater_equal(probs[:, 1:2], self.threshold), "float32")

            def compute_output_shape(self, input_shape):
                return (input_shape[0], 1)

            def get_config(self):
                return {**super().get_config(), "threshold": self.threshold,
                        "threshold_corrected": self.threshold_corrected}

        _LAYERS["AtThreshold"] = AtThreshold
    return _LAYERS["AtThreshold"]


def prior_layer_class():
    """``PriorCorrection``: (p_normal, p_covid) moved from the training prior to the target
    prevalence, the formula of :func:`covfeat.trust.calibration.prior_correct`; both priors are
    in its config."""
    if "PriorCorrection" not in _LAYERS:
        import keras

        @keras.saving.register_keras_serializable(package="covfeat")
        class PriorCorrection(keras.layers.Layer):
            def __init__(self, train_prior: float, target: float, **kwargs):
                super().__init__(**kwargs)
                self.train_prior, self.target = float(train_prior), float(target)

            def call(self, probs):
                from keras import ops

                p = probs[:, 1:2]
                a = p * (self.target / self.train_prior)
                b = (1.0 - p) * ((1.0 - self.target) / (1.0 - self.train_prior))
                c = a / (a + b)
                return ops.concatenate([1.0 - c, c], axis=1)

            def compute_output_shape(self, input_shape):
                return input_shape

            def get_config(self):
                return {**super().get_config(), "train_prior": self.train_prior, "target": self.target}

        _LAYERS["PriorCorrection"] = PriorCorrection
    return _LAYERS["PriorCorrection"]


def load_exported(path: str | Path):
    """Load a model written by :func:`export` (its threshold and prior layers are covfeat's own)."""
    import keras

    threshold_layer_class()
    prior_layer_class()
    return keras.models.load_model(path)


def export(run: str | Path, out: str | Path, prevalence: float | None = None) -> Path:
    """One Keras model: 224x224 RGB in [0, 255] -> the run's scaling -> backbone -> head, with two
    outputs: ``probabilities`` (p_normal, p_covid), corrected from the head's training prior to
    the COVID-19 share of the run's data, or to ``prevalence`` (:mod:`covfeat.use.prevalence`),
    and ``covid`` (1.0 when the head's own p_covid >= the run's threshold, else 0.0: exactly
    ``covfeat predict``'s labels).  The head's own probabilities are the layer
    ``probabilities_raw``: ``keras.Model(m.input, m.get_layer("probabilities_raw").output)``.
    ``covid`` compares the raw probability with the raw threshold, so no float rounding of the
    correction can move a label; the threshold in corrected units is in the layer's config
    (``threshold_corrected``), and ``model_card.md`` / ``model_card.json`` are written beside
    the model (:mod:`covfeat.use.card`).

    Decode and resize first, as the run did: ``Predictor(run).pipeline.decode(path)``.
    Load with :func:`load_exported`.

    A run extracted with ``--lungs`` is refused: its model needs the segmenter before the
    backbone, which the exported model would not have.

    Raises
    ------
    ConfigError, RunError, WeightsUnavailable
    """
    import keras

    out = Path(out)
    if out.suffix != ".keras":
        raise ConfigError(f"--out: expected a file name ending in .keras, got {str(out)!r}.")
    check_prevalence(prevalence)
    if Run(run).extract_config.get("lungs"):  # the model below starts at the 224 x 224 image: no segmenter in it
        raise ConfigError(f"export: the run in {run} saw only the lung fields of its images (extract --lungs); an "
                          "exported model would take the whole image, so it is not exported. Use `covfeat predict "
                          "--run RUN`, which restricts every image as the run's extraction did.")
    check_writable(out.parent, "--out")
    corr = prior_correction(Run(run).require_single("this command"), prevalence)
    pr = Predictor(run)
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="rgb_0_255")
    x = pr.pipeline.scaling.layers()(inp)
    raw = keras.layers.Identity(name="probabilities_raw")(pr.head(pr.backbone(x, training=False), training=False))
    probs = prior_layer_class()(corr.train_prior, corr.target, name="probabilities")(raw)
    covid = threshold_layer_class()(pr.threshold, corr.threshold(pr.threshold), name="covid")(raw)
    model = keras.Model(inp, [probs, covid], name=f"covfeat_{pr.extract.backbone}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    write_card(pr.run, corr, out)
    return out
