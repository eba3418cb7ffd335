"""A finished run as one model file a server loads: ``keras`` (covfeat's layers, for Python with
covfeat), ``savedmodel`` (a TF SavedModel of plain TF ops, for TF Serving or Vertex) or ``onnx``
(for ONNX Runtime, Triton; :mod:`covfeat.use.export_onnx`).

All three hold the run's scaling, backbone, head, the prior correction and the threshold, taken
from :class:`covfeat.use.predict.Predictor`, so they cannot drift from ``covfeat predict``.  The
SavedModel and ONNX graphs hold no Keras layer of covfeat's and no Python object: a server
without covfeat runs them, and a ``.keras`` file with custom layers would not even load there.
Their outputs are predict's columns: ``p_covid`` (corrected to the prevalence), ``p_covid_raw``
(the head's own), ``covid`` (1 when p_covid_raw >= the run's threshold, compared in float64 as
predict compares) and ``threshold`` (the raw one, per row).  Beside every export,
``serving.json`` states the contract (inside the folder for a SavedModel), and the model card
carries it too (:func:`covfeat.use.card.serving_contract`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError
from covfeat.core.fsutil import AtomicDir
from covfeat.head.runs import Run, check_writable, write_json_atomic
from covfeat.imaging.decode import INPUT_SIZE
from covfeat.use import serving_decode
from covfeat.use.card import serving_contract, write_card
from covfeat.use.keras_layers import prior_layer_class, threshold_layer_class
from covfeat.use.predict import Predictor
from covfeat.use.prevalence import check_prevalence, prior_correction

FORMATS = {"keras": ".keras", "savedmodel": None, "onnx": ".onnx"}

OUTPUTS = {"p_covid": "float32 (N,): P(COVID-19) corrected from the training prior to the prevalence (covfeat "
                      "predict's p_covid)",
           "p_covid_raw": "float32 (N,): the head's own P(COVID-19) (covfeat predict's p_covid_raw)",
           "covid": "int32 (N,): 1 when p_covid_raw >= threshold, else 0 (covfeat predict's label: 1 = COVID-19)",
           "threshold": "float64 (N,): the run's threshold on p_covid_raw, repeated per row"}

SIGNATURES = {"pixels": "pixels (serving_default): float32 (N, 224, 224, 3) RGB in [0, 255]",
              "image_bytes": "image_bytes: tf.string (N,) PNG or JPEG files, decoded and resized in the graph"}


def check_out(out: str | Path, fmt: str) -> Path:
    """Refuse an --out that does not fit --format, before any work."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}.")
    other = {s: f for f, s in FORMATS.items() if s and f != fmt}
    hint = f" (for that, --format {other[out.suffix]})" if out.suffix in other else ""
    if fmt == "savedmodel":
        if out.suffix in other:
            raise ConfigError(f"--out: --format savedmodel writes a folder, got the file name {str(out)!r}{hint}.")
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder; --format savedmodel writes "
                              "a new folder there.")
    elif out.suffix != FORMATS[fmt]:
        raise ConfigError(f"--out: expected a file name ending in {FORMATS[fmt]}, got {str(out)!r}{hint}.")
    check_writable(out.parent, "--out")
    check_neighbours(out)
    return out


def check_neighbours(out: Path) -> None:
    """Refuse to write a model card over another model's: the card (and, beside a .keras or .onnx
    file, serving.json) sits beside its model under a fixed name, so a second model exported into
    the same folder would leave the first with the second's threshold and results, silently.  The
    same model again, or a card whose model is gone (or names none), is overwritten."""
    import json

    card = out.parent / "model_card.json"
    if not card.is_file():
        return
    try:
        named = json.loads(card.read_text(encoding="utf-8"))["model"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--out: {card} exists and is not a model card covfeat can read; export into a folder of "
                          "its own (covfeat writes its model card there).") from None
    if not named:
        return
    other = out.parent / Path(named).name
    gone = not other.exists() or (other.is_dir() and not any(other.iterdir()))
    if other.name != out.name and not gone:
        files = "model card and serving.json" if other.is_file() else "model card"
        raise ConfigError(f"--out: {card} describes the model {other.name} in the same folder; export each model into a "
                          f"folder of its own (its {files} would be overwritten with this one's).")


def scale_graph(sc, x):
    """The run's scaling (:class:`covfeat.extraction.images.Scaling`) as TF ops on constants, as
    Scaling.apply computes it in float32: x * (1 / divide) + offset, then mean and std."""
    x = x * np.float32(1.0 / sc.divide)
    if sc.offset:
        x = x + np.float32(sc.offset)
    if sc.mean is not None:
        x = (x - np.asarray(sc.mean, np.float32)) / np.asarray(sc.std, np.float32)
    return x


def serving_function(pr: Predictor, corr):
    """pixels -> {p_covid, p_covid_raw, covid, threshold} in TF ops: the run's scaling as
    constants, its backbone and head, the prior correction (float64) and the threshold."""
    import tensorflow as tf

    sc = pr.pipeline.scaling
    thr, tau, target = float(pr.threshold), float(corr.train_prior), float(corr.target)

    def from_pixels(pixels):
        x = scale_graph(sc, pixels)
        raw = pr.head(pr.backbone(x, training=False), training=False)[:, 1]
        r64 = tf.cast(raw, tf.float64)
        a, b = r64 * (target / tau), (1.0 - r64) * ((1.0 - target) / (1.0 - tau))
        return {"p_covid": tf.cast(a / (a + b), tf.float32), "p_covid_raw": tf.identity(raw),
                "covid": tf.cast(r64 >= thr, tf.int32), "threshold": tf.zeros_like(r64) + thr}

    return from_pixels


PIXELS_SPEC = ((None, INPUT_SIZE, INPUT_SIZE, 3), "float32", "pixels")


def write_savedmodel(pr: Predictor, corr, folder: Path) -> None:
    """The two signatures (``pixels`` first, hence also ``serving_default``) into ``folder``."""
    import keras
    import tensorflow as tf

    fn = serving_function(pr, corr)
    archive = keras.export.ExportArchive()
    # No track(): add_endpoint tracks the variables the functions use; tracking the models too stored
    # every weight twice (the Keras variables and the ones the traced functions capture): 180 MB, not 90.
    archive.add_endpoint("pixels", fn, input_signature=[tf.TensorSpec(*PIXELS_SPEC)])

    def from_bytes(image_bytes):
        return fn(serving_decode.decode_images(image_bytes, pr.pipeline.scaled_decode))

    bytes_spec = [tf.TensorSpec((None,), tf.string, "image_bytes")]
    archive.add_endpoint("image_bytes", from_bytes, input_signature=bytes_spec)

    def decode(image_bytes):  # what the model sees of each file: a server can log or check it
        return {"pixels": serving_decode.decode_images(image_bytes, pr.pipeline.scaled_decode)}

    archive.add_endpoint("decode", decode, input_signature=bytes_spec)
    archive.write_out(str(folder), verbose=False)


def keras_model(pr: Predictor, corr):
    """The ``--format keras`` model of earlier versions: input ``rgb_0_255``, outputs
    ``probabilities`` (corrected) and ``covid``; the raw probabilities are the layer
    ``probabilities_raw``; load it with :func:`covfeat.use.keras_layers.load_exported`."""
    import keras

    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="rgb_0_255")
    x = pr.pipeline.scaling.layers()(inp)
    raw = keras.layers.Identity(name="probabilities_raw")(pr.head(pr.backbone(x, training=False), training=False))
    probs = prior_layer_class()(corr.train_prior, corr.target, name="probabilities")(raw)
    covid = threshold_layer_class()(pr.threshold, corr.threshold(pr.threshold), name="covid")(raw)
    return keras.Model(inp, [probs, covid], name=f"covfeat_{pr.extract.backbone}")


def contract(pr: Predictor, corr, fmt: str, out: Path, **extra) -> dict:
    decoding = serving_decode.decoding_for(pr.pipeline.scaled_decode)  # a --full-decode run decodes at full size
    bytes_in = {"input": "image_bytes", "dtype": "string", "shape": [None], "decoding": decoding}
    if fmt == "keras":
        return serving_contract(pr.run, corr, fmt, {"rgb_0_255": serving_decode.PIXELS},
                                {"probabilities": "float32 (N, 2): (p_normal, p_covid), p_covid corrected",
                                 "covid": "float32 (N, 1): 1.0 when the raw p_covid >= threshold"},
                                "covfeat.use.keras_layers.load_exported(PATH) (needs covfeat installed)", **extra)
    if fmt == "savedmodel":
        return serving_contract(pr.run, corr, fmt, {"pixels": {"input": "pixels", **serving_decode.PIXELS},
                                                    "image_bytes": bytes_in}, OUTPUTS,
                                "m = tf.saved_model.load(DIR); m.signatures['image_bytes'](image_bytes="
                                "tf.constant([open(f, 'rb').read()])) or m.signatures['pixels'](pixels=x)",
                                serving_json="inside the SavedModel folder, beside saved_model.pb",
                                decode_signature="m.signatures['decode'](image_bytes=...)['pixels']: the 224 x 224 "
                                "RGB pixels image_bytes feeds the model, to log or check", **extra)
    return serving_contract(
        pr.run, corr, fmt, {"pixels": {"input": "pixels", **serving_decode.PIXELS}}, OUTPUTS,
        f"s = onnxruntime.InferenceSession('{out.name}'); s.run(None, {{'pixels': x}})",
        image_bytes="not in the ONNX file: onnxruntime does not implement ONNX's ImageDecoder op, so the client "
                    "decodes as client_decoding says and feeds pixels", client_decoding=decoding,
        **extra)


def export(run: str | Path, out: str | Path, prevalence: float | None = None, fmt: str = "keras") -> Path:
    """``run`` as a ``fmt`` model at ``out``, with ``serving.json`` and the model card beside it.

    Decode and resize first, as the run did (``Predictor(run).pipeline.decode(path)``), for the
    ``pixels`` input; the SavedModel's ``image_bytes`` signature decodes in the graph
    (:mod:`covfeat.use.serving_decode`).

    A run extracted with ``--lungs`` is refused: its model needs the segmenter before the
    backbone, which the exported model would not have.

    Raises
    ------
    ConfigError, RunError, WeightsUnavailable
    """
    out = check_out(out, fmt)
    check_prevalence(prevalence)
    if fmt == "onnx":
        from covfeat.use.export_onnx import require_onnx

        require_onnx()
    if Run(run).extract_config.get("lungs"):  # the model below starts at the 224 x 224 image: no segmenter in it
        raise ConfigError(f"export: the run in {run} saw only the lung fields of its images (extract --lungs); an "
                          "exported model would take the whole image, so it is not exported. Use `covfeat predict "
                          "--run RUN`, which restricts every image as the run's extraction did.")
    corr = prior_correction(Run(run).require_single("this command"), prevalence)
    pr = Predictor(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "keras":
        keras_model(pr, corr).save(out)
        sv = contract(pr, corr, fmt, out)
        write_json_atomic(out.parent / "serving.json", sv)
    elif fmt == "savedmodel":
        sv = contract(pr, corr, fmt, out)
        with AtomicDir(out.parent, out.name) as d:
            write_savedmodel(pr, corr, d.path)
            write_json_atomic(d.path / "serving.json", sv)
            if out.is_dir():
                out.rmdir()  # the empty folder check_out let through: the new one takes its name
        if d.final != out:
            raise ConfigError(f"--out: {str(out)!r} was created by another process while the export was written; "
                              f"the SavedModel is in {str(d.final)!r}.")
    else:
        from covfeat.use.export_onnx import write_onnx

        info = write_onnx(serving_function(pr, corr), out, pr.extract.backbone)
        sv = contract(pr, corr, fmt, out, **info)
        write_json_atomic(out.parent / "serving.json", sv)
    write_card(pr.run, corr, out, sv)
    return out
