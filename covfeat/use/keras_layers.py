"""The two Keras layers of a ``--format keras`` export, and :func:`load_exported`, which needs them
(and the fused BatchNormalization of :mod:`covfeat.extraction.precision`, for a run of that route).

A ``.keras`` file holding them loads only where covfeat is installed; the SavedModel and ONNX
exports (:mod:`covfeat.use.export`) fold the same arithmetic into plain TF ops for servers
without covfeat.
"""

from __future__ import annotations

from pathlib import Path

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
    """Load a model written by :func:`export` (its threshold and prior layers are covfeat's own,
    and so is the backbone's BatchNormalization of a run extracted by the ``mixed_fused_bn`` route)."""
    import keras

    from covfeat.extraction.precision import fused_batchnorm_class

    threshold_layer_class()
    prior_layer_class()
    fused_batchnorm_class()
    return keras.models.load_model(path)


