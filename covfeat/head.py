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

from .kernels import NO_PARENTS, dropout_pool, keep_q


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
    engine: str = "numba"  # numba (compiled batch steps) | tf (same Keras layers in a tf.function loop)

    def as_dict(self) -> dict:
        return asdict(self)


def _probability_bce_class():
    import keras

    @keras.saving.register_keras_serializable(package="covfeat")
    class ProbabilityBCE(keras.losses.Loss):
        """Binary cross-entropy on the softmax probabilities, as the paper's tf.keras computed it.

        Keras 3's ``BinaryCrossentropy`` finds the logits cached on a softmax output
        (``_keras_logits``) and applies *sigmoid* cross-entropy to them, which is not the
        cross-entropy of the probabilities the head outputs.  This loss clips and logs the
        probabilities themselves (Keras's own epsilon), mean over the two outputs.
        """

        def __init__(self, name="probability_bce", **kwargs):
            super().__init__(name=name, **kwargs)

        def call(self, y_true, y_pred):
            from keras import ops

            eps = keras.config.epsilon()
            p = ops.clip(y_pred, eps, 1.0 - eps)
            y = ops.cast(y_true, p.dtype)
            return -ops.mean(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p), axis=-1)

    return ProbabilityBCE


_PBCE = None


def probability_bce():
    global _PBCE
    if _PBCE is None:
        _PBCE = _probability_bce_class()
    return _PBCE()


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
        loss=probability_bce(),
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
        self.bce = probability_bce()
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
               dropout: float, sample_weight: np.ndarray | None = None, progress=None,
               parents: np.ndarray | None = None, weights: np.ndarray | None = None) -> list[dict]:
    """Train ``tail`` for cfg.epochs on the (already balanced) training rows of ``pool``.

    Parameters
    ----------
    pool : (R, V, S, C) uint16 (float16 bit patterns), every real training row's maps, views 0..V-1
    rows : (n,) training rows (indices into pool; R + i is SMOTE row i) ; labels : (n,) 0/1
    parents, weights : (n_smote, 2) the two real parents of each SMOTE row and their weights
    n_views : (n,) how many views each row has (a view is drawn from 0..n_views-1 each epoch)
    val_pooled : (m, C) pooled validation maps (no dropout at evaluation)

    Returns
    -------
    history : one dict per epoch: epoch, loss, accuracy, val_loss, val_accuracy
    """
    import tensorflow as tf

    loop = _Loop(tail, cfg)
    n = len(rows)
    plan = epoch_plan(cfg.seed, cfg.epochs, n, n_views)
    y_np = one_hot(labels)
    y = tf.constant(y_np)
    w_all = np.ones(n, np.float32) if sample_weight is None else sample_weight.astype(np.float32)
    q = keep_q(dropout)
    yv_np = one_hot(val_labels) if val_pooled is not None and len(val_pooled) else None
    yv = tf.constant(yv_np) if yv_np is not None else None
    xv = tf.constant(val_pooled) if yv is not None else None

    par, wts = NO_PARENTS if parents is None else (np.asarray(parents, np.int64), np.asarray(weights, np.float32))

    # two buffers, alternating: epoch e trains on one while e+1's dropout fills the other
    buffers = [np.zeros((n, pool.shape[-1]), np.float32) for _ in range(2)]

    def pooled_for(e):
        order, views = plan[e]
        out = buffers[e % 2]
        dropout_pool(pool, rows[order].astype(np.int64), views, q, cfg.seed, e, out, par, wts, pool.shape[0])
        return out

    history = []
    engine = _NumbaEngine(tail, cfg) if cfg.engine == "numba" else None
    # Epoch e+1's dropout+pooling (numba, one core) runs while epoch e trains (the other core).
    with _single_thread_pool() as ahead:
        nxt = ahead.submit(pooled_for, 0)
        for e in range(cfg.epochs):
            pooled = nxt.result()
            if e + 1 < cfg.epochs:
                nxt = ahead.submit(pooled_for, e + 1)
            order = plan[e][0]
            if engine is not None:
                loss, acc = engine.epoch(pooled, y_np[order], w_all[order])
            else:
                loss, acc = loop.epoch(tf.constant(pooled), tf.gather(y, order), tf.constant(w_all[order]))
            rec = {"epoch": e + 1, "loss": float(loss), "accuracy": float(acc)}
            if yv is not None:
                vl, va = engine.evaluate(val_pooled, yv_np) if engine is not None else loop.evaluate(xv, yv)
                rec.update(val_loss=float(vl), val_accuracy=float(va))
            else:
                rec.update(val_loss=float("nan"), val_accuracy=float("nan"))
            history.append(rec)
            if progress is not None:
                progress(rec)
    if engine is not None:
        engine.sync()
    return history


class _NumbaEngine:
    """The head's batch steps in compiled code on numpy copies of the Keras tail's weights.

    The weights are written back into the Keras layers after every epoch, so validation,
    prediction and the saved model are Keras's own.
    """

    def __init__(self, tail, cfg: HeadConfig):
        import keras

        self.tail = tail
        self.cfg = cfg
        w = [np.array(v, np.float32) for v in tail.get_weights()]
        if len(w) != 8:
            raise RuntimeError(f"unexpected head weights: {[v.shape for v in w]}")
        self.P = tuple(w)
        self.M = tuple(np.zeros_like(w[i]) for i in (0, 1, 2, 3, 6, 7))
        bn = tail.get_layer("batch_norm")
        self.consts = (np.float32(cfg.learning_rate), np.float32(cfg.momentum), np.float32(cfg.activity_l1),
                       np.float32(cfg.activity_l2), np.float32(bn.epsilon), np.float32(bn.momentum),
                       np.float32(keras.config.epsilon()))

    def epoch(self, pooled, y, sw):
        from .kernels import head_epoch

        loss_sum, correct = head_epoch(pooled, y, sw, self.P, self.M, self.cfg.batch_size, *self.consts)
        return loss_sum / len(y), correct / len(y)

    def evaluate(self, x, y):
        """Keras's validation loss (cross-entropy + activity terms over all rows) and accuracy."""
        from .kernels import head_predict

        p, act = head_predict(x, self.P, self.consts[4])
        eps = self.consts[6]
        pc = np.clip(p, eps, 1 - eps)
        bce = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc), axis=-1).mean()
        l1, l2 = float(self.cfg.activity_l1), float(self.cfg.activity_l2)
        reg = sum(l1 * np.abs(a).sum(dtype=np.float64) + l2 * np.square(a, dtype=np.float64).sum() for a in (act, p))
        return float(bce + reg / len(y)), float(np.mean(p.argmax(1) == y.argmax(1)))

    def sync(self):
        """Write the trained weights into the Keras layers."""
        self.tail.set_weights(list(self.P))


def epoch_plan(seed: int, epochs: int, n: int, n_views: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per epoch: the shuffled order of the rows (as Model.fit shuffles) and, for each
    position, the view drawn afresh for its row, uniformly from the views that row has."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        views = (rng.random(n) * n_views[order]).astype(np.int64)
        out.append((order, views))
    return out


class _single_thread_pool:
    """A one-worker executor for the next epoch's dropout.  Its numba kernel may use every
    core: while the head trains it gets the core the head leaves, and all of them after."""

    threads = None

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        import numba

        if self.threads is None:
            self.threads = numba.config.NUMBA_NUM_THREADS
        self._ex = ThreadPoolExecutor(max_workers=1, initializer=self._init)
        return self._ex

    def _init(self):
        import numba

        numba.set_num_threads(self.threads)
        # Small chunks handed out as threads free up: the head's thread holds a core for
        # part of each epoch, and a static half-and-half split would wait for it.
        numba.set_parallel_chunksize(8)

    def __exit__(self, *exc):
        self._ex.shutdown(wait=True, cancel_futures=True)


def limit_tf_threads() -> bool:
    """One intra-op thread: the head's 8-row steps run faster on one core than split over two,
    and the other core computes the next epoch's dropout. False if TF was already running."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return True
    except RuntimeError:
        return False


def pooled_mean(maps: np.ndarray) -> np.ndarray:
    """Global average pool of (n, H, W, C) maps (evaluation: dropout is off)."""
    return maps.reshape(len(maps), -1, maps.shape[-1]).mean(axis=1, dtype=np.float64).astype(np.float32)
