"""The paper's classifier head (section 4.3) as a Keras model, and its loss.

Head, on the pre-pool map: Dropout(rate) -> GlobalAveragePooling2D -> Dense(128, relu,
activity L1L2(1e-3, 1e-3)) -> BatchNormalization -> Dense(2, softmax, activity
L1L2(1e-3, 1e-3)); SGD(lr 1e-4, momentum 0.5), batch 8, binary cross-entropy on one-hot
labels (Table 1).  :mod:`covfeat.head.loop` trains it; this module only defines it.
"""

from __future__ import annotations

import numpy as np

from covfeat.head.config import HeadConfig

BN_EPSILON = 1e-3  # BatchNormalization's epsilon and momentum (Keras's defaults, named once here)


BN_MOMENTUM = 0.99


CLIP_EPSILON = 1e-7  # the probabilities' clipping in the loss (Keras's fuzz factor)


def _probability_bce_class():
    import keras

    @keras.saving.register_keras_serializable(package="covfeat")
    class ProbabilityBCE(keras.losses.Loss):
        """Binary cross-entropy on the softmax probabilities, as the paper's tf.keras computed it.

        Keras 3's ``BinaryCrossentropy`` finds the logits cached on a softmax output
        (``_keras_logits``) and applies *sigmoid* cross-entropy to them, which is not the
        cross-entropy of the probabilities the head outputs.  This loss clips and logs the
        probabilities themselves (at Keras's default epsilon), mean over the two outputs.
        """

        def __init__(self, name="probability_bce", **kwargs):
            super().__init__(name=name, **kwargs)

        def call(self, y_true, y_pred):
            from keras import ops

            p = ops.clip(y_pred, CLIP_EPSILON, 1.0 - CLIP_EPSILON)
            y = ops.cast(y_true, p.dtype)
            return -ops.mean(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p), axis=-1)

    return ProbabilityBCE


_PBCE = None


def probability_bce():
    global _PBCE
    if _PBCE is None:
        _PBCE = _probability_bce_class()
    return _PBCE()


def build_head(feature_shape, cfg: HeadConfig):
    """The full head as a Keras model taking the pre-pool map; returns (model, tail).

    ``tail`` shares the layers after pooling and takes the pooled vector.  ``cfg.dropout``
    must be resolved (:meth:`HeadConfig.resolved`).
    """
    from covfeat.core.quiet import import_tensorflow

    import_tensorflow()  # quietly
    import keras
    from keras import layers, regularizers

    if cfg.dropout is None:
        raise ValueError("build_head needs a resolved dropout rate (HeadConfig.resolved(backbone)).")
    dropout = cfg.dropout

    keras.utils.set_random_seed(cfg.seed)
    reg = lambda: regularizers.L1L2(cfg.activity_l1, cfg.activity_l2)  # noqa: E731
    dense = layers.Dense(cfg.dense_units, activation="relu", activity_regularizer=reg(), name="dense")
    bn = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="batch_norm")
    out = layers.Dense(2, activation="softmax", activity_regularizer=reg(), name="softmax")
    inp = keras.Input(tuple(feature_shape), name="features")
    x = layers.Dropout(dropout, seed=cfg.seed, name="dropout")(inp)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inp, out(bn(dense(x))), name="covfeat_head")
    tin = keras.Input((feature_shape[-1],), name="pooled")
    tail = keras.Model(tin, out(bn(dense(tin))), name="covfeat_head_tail")
    return model, tail


def compile_head(model, cfg: HeadConfig):
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=cfg.momentum),
        loss=probability_bce(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(2, dtype=np.float32)[np.asarray(y, int)]


def pooled_mean(maps: np.ndarray) -> np.ndarray:
    """Global average pool of (n, H, W, C) maps (evaluation: dropout is off)."""
    return maps.reshape(len(maps), -1, maps.shape[-1]).mean(axis=1, dtype=np.float64).astype(np.float32)


class NumpyHead:
    """The head after pooling as numpy arrays, in the Keras tail's weight order (dense kernel,
    bias, gamma, beta, moving mean, moving variance, softmax kernel, bias): what the numba
    engine trains, predicts with, and saves through a :class:`covfeat.head.template.HeadTemplate`
    as a Keras file, with no TensorFlow in the process."""

    def __init__(self, weights, template=None):
        self.weights = [np.array(w, np.float32) for w in weights]
        self.template = template

    def get_weights(self) -> list[np.ndarray]:
        return self.weights

    def set_weights(self, weights) -> None:
        for a, w in zip(self.weights, weights):
            a[...] = w

    def predict(self, pooled: np.ndarray) -> np.ndarray:
        """(n, 2) probabilities at inference (moving statistics), as the Keras head gives them."""
        from covfeat.head.kernels import head_predict

        p, _ = head_predict(np.ascontiguousarray(pooled, np.float32), tuple(self.weights), np.float32(BN_EPSILON))
        return p

    def save(self, path) -> None:
        self.template.save(path, self.weights)
