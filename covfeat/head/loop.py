"""Training the head: one epoch loop over a feature source, in memory or streamed from HDF5.

Dropout followed by average pooling does not depend on the head's weights, so each
epoch's pooled rows are computed up front (:func:`covfeat.head.dropout.dropout_pool`, one
pass over the maps) while the previous epoch trains; the batch steps then run either in
compiled code that reproduces Keras's maths (``engine="numba"``) or as the same Keras
layers inside one ``tf.function`` per epoch (``engine="tf"``).  Where the maps come
from is the :class:`FeatureSource`'s business: all views of every training row in memory
(:class:`MemorySource`), or only the views an epoch draws, read from the cache
(:class:`StreamedSource`).  Both give the same numbers.
"""

from __future__ import annotations

import numpy as np

from covfeat.head.config import HeadConfig
from covfeat.head.dropout import NO_PARENTS, dropout_pool, dropout_pool_mapped, keep_q
from covfeat.head.model import BN_EPSILON, BN_MOMENTUM, CLIP_EPSILON, one_hot, probability_bce


class MemorySource:
    """Every real training row's maps, all views: (R, V, S, C) float16 bit patterns (uint16) or
    float32.  Row R + j is SMOTE row j, mixed from ``parents[j]`` with ``weights[j]`` on the fly.

    With ``index``, training row k is ``pool[index[k]]``, so ``pool`` may hold more rows than
    are trained on (cross-validation loads every row once for all its folds); the numbers are
    the same as with a pool of the training rows alone.
    """

    def __init__(self, pool: np.ndarray, parents=None, weights=None, index=None):
        self.pool = pool
        self.index = None if index is None else np.asarray(index, np.int64)
        self.parents, self.weights = NO_PARENTS if parents is None or not len(parents) else (
            np.asarray(parents, np.int64), np.asarray(weights, np.float32))
        if self.index is not None and len(self.parents):
            self.parents = self.index[self.parents]
        self.channels = pool.shape[-1]

    def pooled(self, epoch: int, order: np.ndarray, views: np.ndarray, rate_q: int, seed: int, out: np.ndarray):
        rows = order.astype(np.int64)
        n_pool = self.pool.shape[0]
        if self.index is not None:  # training positions -> pool rows; SMOTE rows after the pool's
            n = len(self.index)
            rows = np.where(rows < n, self.index[np.minimum(rows, n - 1)], n_pool + rows - n)
        dropout_pool(self.pool, rows, views, rate_q, seed, epoch, out, self.parents, self.weights, n_pool)


class StreamedSource:
    """The training rows' maps read from the cache each epoch: only the drawn view of every
    real row and of both parents of every SMOTE row.

    Once a shard is checked and mapped (:meth:`covfeat.store.reader.FeatureCache.mapping`), the
    dropout kernel reads its rows in place from the mapped file (:func:`dropout_pool_mapped`):
    no HDF5 call and no copy, so an epoch whose maps are in the page cache costs about what one
    in memory does, and one whose maps are not costs the page faults, never more memory.  Shards
    covfeat does not map are read into a buffer of one view per row through h5py, as before."""

    def __init__(self, fc, train_rows: np.ndarray, parents=None, weights=None):
        self.fc = fc
        self.samples = fc.samples()
        self.rows = np.asarray(train_rows)
        views_of = [self.samples[int(r)] for r in self.rows]  # training position -> its samples, by view
        self.sample_of = np.full((len(views_of), max(map(len, views_of), default=1)), -1, np.int64)
        for k, s in enumerate(views_of):
            self.sample_of[k, :len(s)] = s
        self.parents = np.zeros((0, 2), np.int64) if parents is None else np.asarray(parents, np.int64)
        self.weights = np.zeros((0, 2), np.float32) if weights is None else np.asarray(weights, np.float32)
        n_real, n_syn = len(self.rows), len(self.parents)
        shape = fc.feature_shape
        S, C = shape[0] * shape[1], shape[2]
        self.channels = C
        # buffer rows: the drawn view of each real row, then both parents of each SMOTE row
        self.par = (n_real + 2 * np.arange(n_syn)[:, None] + np.arange(2)[None, :]).astype(np.int64)
        self.S, self.shape = S, shape
        self.half = fc.dtype == np.float16
        self.buf = None  # the h5py route's buffer, made when first needed

    def pooled(self, epoch: int, order: np.ndarray, views: np.ndarray, rate_q: int, seed: int, out: np.ndarray):
        n_real = len(self.rows)
        view_of = np.empty(len(order), np.int64)
        view_of[order] = views
        want = self.sample_of[np.arange(n_real), view_of[:n_real]]
        if len(self.parents):  # both parents of each SMOTE row, in the SMOTE row's view
            v = view_of[n_real:]
            want = np.concatenate([want, np.stack([self.sample_of[self.parents[:, 0], v],
                                                   self.sample_of[self.parents[:, 1], v]], 1).ravel()])
        located = self.fc.mapped_rows(want)
        if located is not None:
            files, slot, offset = located
            dropout_pool_mapped(files, slot, offset, self.S, self.channels, order.astype(np.int64), rate_q, seed,
                                epoch, out, self.par, self.weights, n_real)
            return
        if self.buf is None:
            self.buf = np.empty((len(want), 1, self.S, self.channels), np.uint16 if self.half else np.float32)
            self.flat = (self.buf.view(np.float16) if self.half else self.buf).reshape(len(self.buf), *self.shape)
        self.fc.read_features(want, out=self.flat)
        dropout_pool(self.buf, order.astype(np.int64), np.zeros(len(order), np.int64), rate_q, seed, epoch, out,
                     self.par, self.weights, n_real)


FeatureSource = MemorySource | StreamedSource


def train(source: FeatureSource, labels: np.ndarray, n_views: np.ndarray, val_pooled: np.ndarray | None,
          val_labels: np.ndarray | None, tail, cfg: HeadConfig, sample_weight: np.ndarray | None = None,
          progress=None) -> list[dict]:
    """Train ``tail`` for cfg.epochs on the (already balanced) training rows of ``source``.

    Parameters
    ----------
    source : where each epoch's dropout-pooled rows come from
    labels : (n,) 0/1 of the real then the SMOTE rows
    n_views : (n,) how many views each row has (a view is drawn from 0..n_views-1 each epoch)
    val_pooled : (m, C) pooled validation maps (no dropout at evaluation)
    cfg : the head's settings, dropout resolved

    Returns
    -------
    history : one dict per epoch: epoch, loss, accuracy, val_loss, val_accuracy
    """

    n = len(labels)
    plan = epoch_plan(cfg.seed, cfg.epochs, n, n_views)
    y_np = one_hot(labels)
    w_all = np.ones(n, np.float32) if sample_weight is None else sample_weight.astype(np.float32)
    q = keep_q(cfg.dropout)
    has_val = val_pooled is not None and len(val_pooled) > 0
    yv_np = one_hot(val_labels) if has_val else None
    engine = _NumbaEngine(tail, cfg) if cfg.engine == "numba" else _TFEngine(tail, cfg)

    # two buffers, alternating: epoch e trains on one while e+1's dropout fills the other
    buffers = [np.zeros((n, source.channels), np.float32) for _ in range(2)]

    def pooled_for(e):
        order, views = plan[e]
        out = buffers[e % 2]
        source.pooled(e, order, views, q, cfg.seed, out)
        return out

    history = []
    # Epoch e+1's dropout+pooling (numba, one core) runs while epoch e trains (the other core).
    with _single_thread_pool() as ahead:
        nxt = ahead.submit(pooled_for, 0)
        for e in range(cfg.epochs):
            pooled = nxt.result()
            if e + 1 < cfg.epochs:
                nxt = ahead.submit(pooled_for, e + 1)
            order = plan[e][0]
            loss, acc = engine.epoch(pooled, y_np[order], w_all[order])
            rec = {"epoch": e + 1, "loss": float(loss), "accuracy": float(acc)}
            if has_val:
                vl, va = engine.evaluate(val_pooled, yv_np)
                rec.update(val_loss=float(vl), val_accuracy=float(va))
            else:
                rec.update(val_loss=float("nan"), val_accuracy=float("nan"))
            history.append(rec)
            if progress is not None:
                progress(rec)
    engine.sync()
    return history


class _TFEngine:
    """The batch steps as the Keras tail's own layers, loss and optimizer: one compiled
    tf.function per epoch (the reference the numba engine is checked against)."""

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

        self._epoch = epoch
        self._evaluate = evaluate

    def epoch(self, pooled, y, sw):
        import tensorflow as tf

        return self._epoch(tf.constant(pooled), tf.constant(y), tf.constant(sw))

    def evaluate(self, x, y):
        import tensorflow as tf

        return self._evaluate(tf.constant(x), tf.constant(y))

    def sync(self):
        """The Keras variables were trained in place."""


class _NumbaEngine:
    """The head's batch steps in compiled code on numpy copies of the tail's weights (a Keras
    tail, or a :class:`covfeat.head.model.NumpyHead` when no Keras is loaded); :meth:`sync` writes
    them back at the end."""

    def __init__(self, tail, cfg: HeadConfig):
        self.tail = tail
        self.cfg = cfg
        w = [np.array(v, np.float32) for v in tail.get_weights()]
        if len(w) != 8:
            raise RuntimeError(f"unexpected head weights: {[v.shape for v in w]}")
        self.P = tuple(w)
        self.M = tuple(np.zeros_like(w[i]) for i in (0, 1, 2, 3, 6, 7))
        self.consts = (np.float32(cfg.learning_rate), np.float32(cfg.momentum), np.float32(cfg.activity_l1),
                       np.float32(cfg.activity_l2), np.float32(BN_EPSILON), np.float32(BN_MOMENTUM),
                       np.float32(CLIP_EPSILON))

    def epoch(self, pooled, y, sw):
        from covfeat.head.kernels import head_epoch

        loss_sum, correct = head_epoch(pooled, y, sw, self.P, self.M, self.cfg.batch_size, *self.consts)
        return loss_sum / len(y), correct / len(y)

    def evaluate(self, x, y):
        """Keras's validation loss (cross-entropy + activity terms over all rows) and accuracy."""
        from covfeat.head.kernels import head_predict

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
