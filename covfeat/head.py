"""The paper's classifier head (section 4.3) and the fast way to train it on cached maps.

Head, on the pre-pool map: Dropout(rate) -> GlobalAveragePooling2D -> Dense(128, relu,
activity L1L2(1e-3, 1e-3)) -> BatchNormalization -> Dense(2, softmax, activity
L1L2(1e-3, 1e-3)); SGD(lr 1e-4, momentum 0.5), batch 8, binary cross-entropy on one-hot
labels (Table 1).

:func:`train_fast` trains exactly this model.  Dropout + pooling of a whole epoch is
computed up front by :mod:`covfeat.dropout_pool` (the masks do not depend on the
weights); the rest of the head (the same Keras layers, loss, regularisers and optimizer)
runs every batch of an epoch inside one compiled TensorFlow loop instead of one Python
call per batch as ``Model.fit`` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .dropout_pool import dropout_pool, keep_q


@dataclass
class HeadConfig:
    """Table 1 and section 4.3; every field is a --flag and a config-file key."""

    dropout: float | None = None  # None: the paper's rate for the backbone
    dense_units: int = 128
    activity_l1: float = 1e-3
    activity_l2: float = 1e-3
    epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    momentum: float = 0.5
    balance: str = "smote"  # smote | none | class-weight
    smote_k: int = 5
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def build_head(feature_shape, cfg: HeadConfig, dropout: float):
    """The full head as a Keras model taking the pre-pool map; returns (model, tail).

    ``tail`` shares the layers after pooling and takes the pooled vector.
    """
    import keras
    from keras import layers, regularizers

    keras.utils.set_random_seed(cfg.seed)
    reg = lambda: regularizers.L1L2(cfg.activity_l1, cfg.activity_l2)  # noqa: E731
    dense = layers.Dense(cfg.dense_units, activation="relu", activity_regularizer=reg(), name="dense")
    bn = layers.BatchNormalization(name="batch_norm")
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
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(2, dtype=np.float32)[np.asarray(y, int)]


class _Loop:
    """One compiled epoch: every batch step of the tail inside a single tf.function."""

    def __init__(self, tail, cfg: HeadConfig):
        import keras
        import tensorflow as tf

        self.tail = tail
        self.opt = keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=cfg.momentum)
        self.opt.build(tail.trainable_variables)
        self.bce = keras.losses.BinaryCrossentropy()
        bs = cfg.batch_size

        def step_loss(xb, yb, wb, training):
            p = tail(xb, training=training)
            loss = self.bce(yb, p, sample_weight=wb)
            if tail.losses:
                loss = loss + tf.add_n(tail.losses)
            return loss, p

        @tf.function(reduce_retracing=True)
        def epoch(x, y, w):
            n = tf.shape(x)[0]
            steps = (n + bs - 1) // bs
            loss_sum = tf.constant(0.0)
            correct = tf.constant(0.0)
            for s in tf.range(steps):
                a = s * bs
                b = tf.minimum(n, a + bs)
                xb, yb, wb = x[a:b], y[a:b], w[a:b]
                with tf.GradientTape() as tape:
                    loss, p = step_loss(xb, yb, wb, True)
                grads = tape.gradient(loss, tail.trainable_variables)
                self.opt.apply_gradients(zip(grads, tail.trainable_variables))
                k = tf.cast(b - a, tf.float32)
                loss_sum += loss * k
                correct += tf.reduce_sum(tf.cast(tf.argmax(p, 1) == tf.argmax(yb, 1), tf.float32))
            nf = tf.cast(n, tf.float32)
            return loss_sum / nf, correct / nf

        @tf.function(reduce_retracing=True)
        def evaluate(x, y):
            loss, p = step_loss(x, y, None, False)
            acc = tf.reduce_mean(tf.cast(tf.argmax(p, 1) == tf.argmax(y, 1), tf.float32))
            return loss, acc

        self.epoch = epoch
        self.evaluate = evaluate


def train_fast(pool: np.ndarray, rows: np.ndarray, labels: np.ndarray, n_views: np.ndarray,
               val_pooled: np.ndarray | None, val_labels: np.ndarray | None, tail, cfg: HeadConfig,
               dropout: float, sample_weight: np.ndarray | None = None, progress=None) -> list[dict]:
    """Train ``tail`` for cfg.epochs on the (already balanced) training rows of ``pool``.

    Parameters
    ----------
    pool : (R, V, S, C) float32, every training row's maps, views 0..V-1
    rows : (n,) training rows (indices into pool) ; labels : (n,) 0/1
    n_views : (n,) how many views each row has (a view is drawn from 0..n_views-1 each epoch)
    val_pooled : (m, C) pooled validation maps (no dropout at evaluation)

    Returns
    -------
    history : one dict per epoch: epoch, loss, accuracy, val_loss, val_accuracy
    """
    import tensorflow as tf

    loop = _Loop(tail, cfg)
    rng = np.random.default_rng(cfg.seed)
    n = len(rows)
    y = tf.constant(one_hot(labels))
    w_all = np.ones(n, np.float32) if sample_weight is None else sample_weight.astype(np.float32)
    pooled = np.empty((n, pool.shape[-1]), np.float32)
    q = keep_q(dropout)
    yv = tf.constant(one_hot(val_labels)) if val_pooled is not None and len(val_pooled) else None
    history = []
    for e in range(cfg.epochs):
        order = rng.permutation(n)  # Model.fit's per-epoch shuffle
        views = (rng.random(n) * n_views[order]).astype(np.int64)  # a fresh view per row per epoch
        dropout_pool(pool, rows[order].astype(np.int64), views, q, cfg.seed, e, pooled)
        loss, acc = loop.epoch(tf.constant(pooled), tf.gather(y, order), tf.constant(w_all[order]))
        rec = {"epoch": e + 1, "loss": float(loss), "accuracy": float(acc)}
        if yv is not None:
            vl, va = loop.evaluate(tf.constant(val_pooled), yv)
            rec.update(val_loss=float(vl), val_accuracy=float(va))
        else:
            rec.update(val_loss=float("nan"), val_accuracy=float("nan"))
        history.append(rec)
        if progress is not None:
            progress(rec)
    return history


def pooled_mean(maps: np.ndarray) -> np.ndarray:
    """Global average pool of (n, H, W, C) maps (evaluation: dropout is off)."""
    return maps.reshape(len(maps), -1, maps.shape[-1]).mean(axis=1, dtype=np.float64).astype(np.float32)
