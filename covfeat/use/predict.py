"""New radiographs through a finished run: its own input pipeline, backbone weights, head and threshold.

Everything is taken from the run's recorded extraction config, never from defaults,
because a model fed differently scaled pixels than it was trained on tends to call every
image one class.  :class:`Predictor` is the one place that rebuilds a run for inference;
``predict``, ``explain`` and ``export`` use it, and ``export`` folds the same scaling
(as Keras layers), backbone, head and threshold into one Keras model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError, DataError
from covfeat.extraction.backbones import INPUT_SIZE, build_backbone, get_backbone, resolve_weights, weights_from_config
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.images import InputPipeline, UnreadableImage
from covfeat.extraction.sources import IMAGE_SUFFIXES
from covfeat.head.runs import Run, check_writable

TABLE_FIELDS = ["path", "p_covid", "label", "error"]


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
        arg = weights_from_config(stored, self.run.cache_info.get("weights", {}).get("path"), "predict")
        self.spec = resolve_weights(get_backbone(stored["backbone"]), arg, seed=stored["seed"])
        self.extract = ExtractConfig.from_stored(stored, weights=arg)
        self.pipeline = InputPipeline.for_config(self.extract)
        self.threshold = self.run.threshold
        self.head = self.run.load_head()
        self.backbone = build_backbone(get_backbone(self.extract.backbone), self.spec, seed=self.extract.seed)

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


def predict(run: str | Path, items: list[str | Path], batch_size: int = 16) -> list[dict]:
    """P(COVID-19) and the label at the run's threshold for every image; unreadable ones get an error."""
    images = list_images(items)
    if not images:
        raise DataError("No image files given (folders are searched for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ").")
    pr = Predictor(run)
    rows, xs, where = [], [], []
    for p in images:
        row = {"path": str(p), "p_covid": None, "label": None, "error": ""}
        try:
            xs.append(pr.pipeline(p))
            where.append(len(rows))
        except UnreadableImage as exc:
            row["error"] = str(exc)
        except OSError as exc:
            row["error"] = f"cannot read file ({exc})"
        rows.append(row)
    probs = pr.p_covid(np.stack(xs), batch_size) if xs else []
    for i, pc in zip(where, probs):
        rows[i]["p_covid"] = float(pc)
        rows[i]["label"] = pr.label(float(pc))
    if not pr.spec.pretrained:
        print("NOTE: this run's backbone is NOT PRETRAINED (random init); its predictions are for testing only.",
              file=sys.stderr)
    return rows


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


def format_table(rows: list[dict]) -> str:
    width = max([len(r["path"]) for r in rows] + [4])
    lines = [f"{'path'.ljust(width)}  p_covid  label"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['path'].ljust(width)}  skipped: {r['error']}")
        else:
            lines.append(f"{r['path'].ljust(width)}  {r['p_covid']:.4f}   {r['label']}")
    return "\n".join(lines)


_THRESHOLD_LAYER = None


def threshold_layer_class():
    """``AtThreshold``: P(COVID-19) >= the run's threshold, as 1.0 / 0.0; the threshold is in its config."""
    global _THRESHOLD_LAYER
    if _THRESHOLD_LAYER is None:
        import keras

        @keras.saving.register_keras_serializable(package="covfeat")
        class AtThreshold(keras.layers.Layer):
            def __init__(self, threshold: float, **kwargs):
                super().__init__(**kwargs)
                self.threshold = float(threshold)

            def call(self, probs):
                from keras import ops

                return ops.cast(ops.greater_equal(probs[:, 1:2], self.threshold), "float32")

            def compute_output_shape(self, input_shape):
                return (input_shape[0], 1)

            def get_config(self):
                return {**super().get_config(), "threshold": self.threshold}

        _THRESHOLD_LAYER = AtThreshold
    return _THRESHOLD_LAYER


def load_exported(path: str | Path):
    """Load a model written by :func:`export` (its threshold layer is covfeat's own)."""
    import keras

    threshold_layer_class()
    return keras.models.load_model(path)


def export(run: str | Path, out: str | Path) -> Path:
    """One Keras model: 224x224 RGB in [0, 255] -> the run's scaling -> backbone -> head, with two
    outputs: ``probabilities`` (p_normal, p_covid) and ``covid`` (1.0 when p_covid >= the run's
    threshold, else 0.0).  The threshold is also in the ``covid`` layer's config.

    Decode and resize first, as the run did: ``Predictor(run).pipeline.decode(path)``.
    Load with :func:`load_exported`.
    """
    import keras

    out = Path(out)
    if out.suffix != ".keras":
        raise ConfigError(f"--out: expected a file name ending in .keras, got {str(out)!r}.")
    check_writable(out.parent, "--out")
    pr = Predictor(run)
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="rgb_0_255")
    x = pr.pipeline.scaling.layers()(inp)
    probs = keras.layers.Identity(name="probabilities")(pr.head(pr.backbone(x, training=False), training=False))
    covid = threshold_layer_class()(pr.threshold, name="covid")(probs)
    model = keras.Model(inp, [probs, covid], name=f"covfeat_{pr.extract.backbone}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out
