"""The arithmetic of the backbone's forward pass: float32 (the paper's), or bfloat16 where the
CPU computes it natively, by the fastest of three routes for each backbone, as measured.

bfloat16 keeps float32's exponent and 8 bits of its mantissa; CPUs with ``avx512_bf16``
(AMD Zen 4, Intel Cooper Lake on) or ``amx_bf16`` (Intel Sapphire Rapids on) multiply it
natively.  TensorFlow reaches that hardware two ways (the second in two forms), and which is faster depends on the
backbone and the CPU:

* ``onednn``: ``ONEDNN_DEFAULT_FPMATH_MODE=BF16`` lets oneDNN compute float32 convolutions
  and matrix products internally in bfloat16.  The graph stays the float32 graph; the mode is
  an environment variable that oneDNN reads once per process, so covfeat sets it before
  TensorFlow starts, and refuses to run this route in a process whose TensorFlow already
  started without it (it could not tell whether the mode holds).  It is process-wide: later
  TensorFlow work in the same process (a head, a prediction) also computes in bfloat16.
* ``mixed``: Keras's ``mixed_bfloat16`` dtype policy while the backbone is built: its
  layers compute in bfloat16 on float32 variables, and the feature maps are cast back to
  float32 before they are stored.  Only the backbone is affected.
* ``mixed_fused_bn``: ``mixed``, but each BatchNormalization runs as TensorFlow's fused kernel
  on the bfloat16 maps (``FusedBatchNormV3``: float32 statistics, arithmetic and one rounding
  of its output to bfloat16, as Keras's float32 arithmetic with a cast on each side).  Keras
  3's own layer casts the maps to float32 and back and normalises in five elementwise
  operations; densenet201 has one before each of its 200 convolutions, which left its mixed
  route no faster than float32.  The layer's weights and names are Keras's, so weights files
  load alike (:func:`fuse_batchnorm`).

:data:`ROUTES` records the choice per backbone and kind of CPU, and how it was measured.  The route enters
the feature cache's key and the graph cache's key: the two give different last bits.
"""

from __future__ import annotations

import contextlib
import os
import sys

from covfeat.core.errors import ConfigError

PRECISIONS = ("float32", "bfloat16")


FPMATH_ENV = "ONEDNN_DEFAULT_FPMATH_MODE"


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


# The faster route per backbone, for each kind of native bfloat16 (:func:`bf16_kind`).
#
# ``avx512_bf16`` measured on an AMD EPYC (Zen 4: avx512_bf16, no AMX), 2 cores, TensorFlow
# 2.21 and Keras 3.15: random-init weights, batch 16, each (backbone, route) in a process of
# its own so the environment variable is read fresh (benchmarks/bench_extract.py), while other
# jobs shared the machine (ratios, not absolute speeds).  There the oneDNN route gives the
# float32 features bit for bit (max difference 0, inception_v3 and densenet201): oneDNN does
# not take this CPU's bfloat16 instructions for these convolutions, so the route would be a
# float32 extraction under a bfloat16 key, and only ``mixed`` is used.  Mixed against float32:
# inception_v3 1.9x, densenet201 1.5x, inception_resnet_v2 1.8x,
# resnet101_v2 3.0x (64 images each, the machine loaded); bench_extract.py --only-bfloat16 on
# 32 bundled images, also loaded: inception_v3 2.6x (cosine >= 0.99997, max difference 1.15% of
# the largest value, pooled 0.81%), densenet201 2.5x (0.99998, 0.64%, pooled 0.41%).
#
# ``amx`` measured on an Intel Xeon (AMX bf16/int8, avx512_bf16), 2 cores, TensorFlow 2.21 and
# Keras 3.15, by ``bench_extract.py`` (32 bundled images, batch 16, two batches at a time on one
# thread per operation as the extract command runs them, each route in a fresh process, the
# median of 5 passes, nothing else running; benchmarks/results/intel-xeon-amx/extract.md),
# 2026-12-02: inception_v3 mixed 2.10x against onednn 1.53x; inception_resnet_v2 mixed 2.31x
# against 1.67x; resnet101_v2 mixed 2.28x against 1.70x; densenet201 onednn 1.42x against mixed
# 1.10x (one batch at a time on TensorFlow's threads: the same order, 1.28x against 1.04x).
# Here, unlike on Zen 4, the oneDNN route does compute in bfloat16 (its features differ from
# float32's: cosine 0.99996-0.99999).
# DenseNet's mixed route loses because Keras computes every BatchNormalization in float32 and
# casts around it, and densenet201 has one before each of its 200 convolutions.  The
# ``mixed_fused_bn`` route, measured the same way later that day (bench_extract.py,
# benchmarks/results/intel-xeon-amx/extract.md), is the fastest for all four on AMX:
# inception_v3 2.92x (mixed 1.99x, onednn 1.42x), inception_resnet_v2 2.88x (2.24x, 1.60x),
# densenet201 1.98x (1.23x, 1.44x), resnet101_v2 3.02x (2.14x, 1.72x).  It was not measured
# on Zen 4 (no such machine in that session), so ``avx512_bf16`` keeps ``mixed``.
ROUTES = {
    "avx512_bf16": {"inception_v3": "mixed", "inception_resnet_v2": "mixed", "densenet201": "mixed",
                    "resnet101_v2": "mixed"},
    "amx": {"inception_v3": "mixed_fused_bn", "inception_resnet_v2": "mixed_fused_bn",
            "densenet201": "mixed_fused_bn", "resnet101_v2": "mixed_fused_bn"},
}

MIXED_ROUTES = ("mixed", "mixed_fused_bn")  # built under Keras's mixed_bfloat16 policy


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_cpu(precision: str) -> None:
    """Refuse ``--precision bfloat16`` on a CPU that would only emulate it (slower than float32).

    Raises
    ------
    ConfigError
    """
    if precision == "bfloat16" and bf16_kind() is None:
        raise ConfigError("--precision bfloat16: this CPU has no native bfloat16 arithmetic (neither "
                          f"{' nor '.join(BF16_FLAGS)} in /proc/cpuinfo), where it is slower than float32; "
                          "extract with --precision float32.")


def bf16_kind(flags: set[str] | None = None) -> str | None:
    """``amx`` (Intel's matrix tiles), ``avx512_bf16`` (vector instructions only), or None."""
    flags = cpu_flags() if flags is None else flags
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def route_of(backbone: str, precision: str) -> str:
    """How the forward pass of ``backbone`` computes at ``precision`` on this CPU: ``float32``,
    or the bfloat16 route of :data:`ROUTES` (``onednn``, ``mixed`` or ``mixed_fused_bn``).

    Raises
    ------
    ConfigError
        bfloat16 on a CPU without it (:func:`check_cpu`).
    """
    if precision == "float32":
        return "float32"
    check_cpu(precision)
    return ROUTES[bf16_kind()][backbone]


def prepare_process(route: str) -> None:
    """Make this process's oneDNN mode what ``route`` needs, before TensorFlow computes anything.

    The ``onednn`` route sets ``ONEDNN_DEFAULT_FPMATH_MODE=BF16`` when TensorFlow has not
    started yet; every other route needs oneDNN's default (strict float32) mode, so a mode
    set by the user's environment is refused rather than silently giving bfloat16 features
    under a float32 key.

    Raises
    ------
    ConfigError
        The mode cannot be what the route needs in this process.
    """
    mode = os.environ.get(FPMATH_ENV, "").upper()
    if route == "onednn":
        if mode == "BF16":
            return
        if "tensorflow" in sys.modules:
            raise ConfigError(f"--precision bfloat16 computes this backbone through oneDNN's {FPMATH_ENV}=BF16, which "
                              "TensorFlow reads when it starts, and it started in this process without it; run the "
                              f"extraction in a new process (or set {FPMATH_ENV}=BF16 before starting Python).")
        os.environ[FPMATH_ENV] = "BF16"
    elif mode not in ("", "STRICT"):
        raise ConfigError(f"{FPMATH_ENV}={os.environ[FPMATH_ENV]} is set in this process, so oneDNN would compute "
                          f"the {route} route in another precision than its cache records; unset it and run again.")


@contextlib.contextmanager
def build_policy(route: str):
    """Keras's dtype policy while a backbone is built: ``mixed_bfloat16`` for the mixed
    routes, restored after, so nothing built later (the head) computes in bfloat16."""
    if route not in MIXED_ROUTES:
        yield
        return
    import keras

    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


_FUSED: dict = {}


def fused_batchnorm_class():
    """``FusedBatchNormalization``: a BatchNormalization whose inference is FusedBatchNormV3 on the
    maps' own dtype (channels last, 4-D) with float32 statistics; registered with Keras (package
    ``covfeat``), so a ``--format keras`` export holding it loads through
    :func:`covfeat.use.keras_layers.load_exported`."""
    if "cls" not in _FUSED:
        import keras
        import numpy as np
        import tensorflow as tf

        @keras.saving.register_keras_serializable(package="covfeat")
        class FusedBatchNormalization(keras.layers.BatchNormalization):
            def call(self, inputs, training=None, mask=None):
                if training or len(inputs.shape) != 4 or self.axis not in (-1, 3, [-1], [3]):
                    return super().call(inputs, training=training, mask=mask)
                c = inputs.shape[-1]
                f32 = tf.float32
                y, *_ = tf.raw_ops.FusedBatchNormV3(  # numpy constants: a Const node, not a Fill
                    x=inputs, scale=tf.cast(self.gamma.value, f32) if self.scale else tf.constant(np.ones(c, np.float32)),
                    offset=tf.cast(self.beta.value, f32) if self.center else tf.constant(np.zeros(c, np.float32)),
                    mean=tf.cast(self.moving_mean.value, f32), variance=tf.cast(self.moving_variance.value, f32),
                    epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=False)
                return y

        _FUSED["cls"] = FusedBatchNormalization
    return _FUSED["cls"]


def fuse_batchnorm(model):
    """``model`` (built under the mixed policy, its weights loaded) with every
    BatchNormalization computed by TensorFlow's fused inference kernel on the bfloat16 maps
    (:func:`fused_batchnorm_class`): the same layers, names and weights, so a weights file and
    Grad-CAM's gradients see the model they expect.  Inference only: a frozen backbone is never
    trained."""
    import keras

    fused_class = fused_batchnorm_class()

    def swap(layer):  # every other layer is reused as it is (its weights with it)
        if type(layer) is keras.layers.BatchNormalization:
            return fused_class.from_config(layer.get_config())
        return layer

    fused = keras.models.clone_model(model, clone_function=swap)
    for layer in fused.layers:  # the swapped layers get their statistics by name; the others are the model's own
        if isinstance(layer, fused_class):
            layer.set_weights(model.get_layer(layer.name).get_weights())
    left = [layer.name for layer in fused._flatten_layers() if type(layer) is keras.layers.BatchNormalization]
    if left:  # in a nested model (clone_model does not recurse): the route would be mixed under another name
        raise ValueError(f"mixed_fused_bn: BatchNormalization layers {left[:3]} were not fused")
    return fused
