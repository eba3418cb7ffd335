"""What a backbone is: the registry of frozen CNNs (the paper's four) and their weights.

Each entry owns every fact about its backbone: how to build it without its top, its own
pixel scaling (one :class:`Scaling`, applied in numpy for extraction and prediction and
as Keras layers in an exported model), the shape of its pre-pool feature map at
224x224, the paper's dropout rate for its head, and where Keras publishes (and caches)
its ImageNet weights.  Adding a backbone is one :func:`register` call.

Weights are resolved *before* any other work, so an offline machine without the cached
file stops at once with one message saying which file to put where.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from covfeat.core.errors import ConfigError, WeightsUnavailable
from covfeat.core.fsutil import file_digest
from covfeat.core.registry import Registry
from covfeat.extraction.precision import MIXED_ROUTES, build_policy, fuse_batchnorm
from covfeat.imaging.decode import INPUT_SIZE

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Scaling:
    """Pixel scaling from RGB in [0, 255] to a network's input: ``x / divide + offset``, then,
    when ``mean`` is set, ``(x - mean) / std`` per channel.

    One definition serves both paths: :meth:`apply` in numpy for extraction and prediction,
    :meth:`layers` as Keras layers inside an exported model.
    """

    name: str
    divide: float
    offset: float = 0.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def apply(self, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = np.multiply(img, np.float32(1.0 / self.divide), out=out, dtype=np.float32)
        if self.offset:
            x += np.float32(self.offset)
        if self.mean is not None:
            x -= np.asarray(self.mean, np.float32)
            x /= np.asarray(self.std, np.float32)
        return x

    def layers(self):
        import keras
        from keras import layers

        steps = [layers.Rescaling(1.0 / self.divide, offset=self.offset)]
        if self.mean is not None:
            steps.append(layers.Normalization(mean=np.asarray(self.mean), variance=np.square(self.std)))
        return keras.Sequential(steps, name=f"preprocess_{self.name}")


PAPER_SCALING = Scaling("paper", 255.0)  # the paper: RGB / 255


TF_SCALING = Scaling("tf", 127.5, -1.0)  # keras.applications "tf" mode: [-1, 1]


TORCH_SCALING = Scaling("torch", 255.0, 0.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # "torch" mode


@dataclass(frozen=True)
class ImagenetWeights:
    """Where Keras publishes a backbone's top-less ImageNet weights, and their hash."""

    file: str  # file name in Keras's cache
    url: str
    md5: str  # the hash Keras itself checks the cached file against


@dataclass(frozen=True)
class Backbone:
    """One registered backbone: how to build it, its own scaling, its feature shape, the
    paper's dropout for its head, and its published ImageNet weights (if any)."""

    name: str
    build: Callable  # build(input_shape=...) -> a top-less keras.Model, weights not loaded
    scaling: Scaling  # its own preprocess_input (used with --preprocess backbone)
    feature_shape: tuple[int, int, int]  # pre-pool map at 224 x 224
    dropout: float  # paper section 4.3
    imagenet: ImagenetWeights | None = None

    def scaling_for(self, preprocess: str) -> Scaling:
        """The scaling of ``--preprocess paper|backbone``."""
        return PAPER_SCALING if preprocess == "paper" else self.scaling


def keras_application(attr: str) -> Callable:
    """A builder of ``keras.applications.<attr>`` without its top, imported only when called."""

    def build(input_shape):
        import keras

        return getattr(keras.applications, attr)(include_top=False, weights=None, input_shape=input_shape)

    build.__name__ = f"build_{attr}"
    return build


def _imagenet(folder: str, file: str, md5: str) -> ImagenetWeights:
    return ImagenetWeights(file, f"{_KERAS_URL}{folder}/{file}", md5)


REGISTRY: Registry[Backbone] = Registry("backbone", option="--backbone")


def register(backbone: Backbone) -> Backbone:
    """Add a backbone; everything else (CLI, cache, head, export) reads it from here."""
    return REGISTRY.register(backbone)


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return REGISTRY.names()


def get_backbone(name: str) -> Backbone:
    return REGISTRY.get(name)


def keras_home() -> str:
    """Keras's home folder, read without importing Keras (seconds, and a no-op extraction needs
    none of it): once Keras is imported, the very value it holds (what get_file asks); before,
    what Keras would set at its import ($KERAS_HOME, else ~/.keras, or /tmp/.keras when the
    home folder is not writable)."""
    config = sys.modules.get("keras.src.backend.config")
    if config is not None:
        return config.keras_home()
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def keras_cache_dir() -> Path:
    """The folder where Keras's get_file caches application weights ($KERAS_HOME/models,
    or /tmp/.keras/models when that is not writable, as get_file itself decides)."""
    base = os.path.expanduser(keras_home())
    if os.path.isdir(base) and not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


@dataclass(frozen=True)
class WeightsSpec:
    """Resolved weights: what to pass to Keras and the identity recorded in the cache."""

    kind: str  # "imagenet" | "file" | "none"
    path: str | None  # local file holding the weights, if any
    identity: str  # enters the cache key
    pretrained: bool

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "NOT PRETRAINED (random init)"
        if self.kind == "file":
            return f"file {Path(self.path).name} ({self.identity[-12:]})"
        return "imagenet"


def resolve_weights(backbone: Backbone, weights: str, seed: int = 0) -> WeightsSpec:
    """Turn ``--weights imagenet|none|FILE`` into a local file and an identity.

    ``imagenet`` goes through Keras's own ``get_file`` (download once, then the cache
    under ``$KERAS_HOME/models``), checked against the hash Keras publishes.  A file
    already in that cache whose hash differs is refused rather than handed to Keras,
    which would delete it while trying to download the real one.

    Raises
    ------
    WeightsUnavailable
        Offline and not cached, a wrong file in the cache, or a missing FILE.
    """
    if weights == "none":
        # Random init is seeded, so the same seed rebuilds the same backbone later.
        return WeightsSpec("none", None, f"none:seed={seed}", False)
    if weights == "imagenet":
        w = backbone.imagenet
        if w is None:
            raise WeightsUnavailable(
                f"{backbone.name} has no published ImageNet weights; pass --weights FILE or --weights none."
            )
        target = keras_cache_dir() / w.file
        if target.exists():
            md5 = file_digest(target, "md5")
            if md5 != w.md5:
                raise WeightsUnavailable(
                    f"{target} is not the published ImageNet weights for {backbone.name} "
                    f"(md5 {md5}, expected {w.md5}). Remove it so Keras can "
                    f"download the real file, or pass it as --weights {target}."
                )
            # The hash get_file would check, checked: the cached file is the one, and Keras (an
            # import of seconds) is left for the model build, which a complete cache never needs.
            return WeightsSpec("imagenet", str(target), f"imagenet:md5={w.md5}", True)
        from covfeat.core.quiet import import_tensorflow

        import_tensorflow()  # quietly, before get_file's import of Keras could print TensorFlow's notices
        from keras.utils import get_file

        try:
            # Keras prints its download progress on stdout, whose last line is our result.
            with contextlib.redirect_stdout(sys.stderr):
                path = get_file(w.file, w.url, cache_subdir="models", file_hash=w.md5)
        except Exception as exc:  # Keras wraps every URL failure in a bare Exception
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsUnavailable(
                f"ImageNet weights for {backbone.name} are not cached and could not be "
                f"downloaded ({reason}). Put {w.file} (from "
                f"{w.url}) in {keras_cache_dir()}/, or pass "
                f"--weights FILE or --weights none."
            ) from None
        return WeightsSpec("imagenet", str(path), f"imagenet:md5={w.md5}", True)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"--weights {weights!r}: no such file; expected 'imagenet', 'none' or the path "
            f"of a weights file for {backbone.name}."
        )
    return WeightsSpec("file", str(path.resolve()), f"file:sha256={file_digest(path)}", True)


def weights_from_config(stored: dict, path: str | None, purpose: str) -> str:
    """The ``--weights`` argument that rebuilds the backbone a cache was extracted with.

    A cache records its weights by identity.  ``none`` (seeded) and ``imagenet`` (Keras's
    published file, whose hash :func:`resolve_weights` checks) rebuild as they were; a file is
    recorded by its SHA-256 and the path it was read from, and must still be there with the
    same bytes: other weights give other features under the same run, and predictions or an
    audit's retrained heads would then belong to another backbone.

    Parameters
    ----------
    stored
        The cache's recorded extraction config (``fc.config``, a run's ``extract_config``).
    path
        The weights file the cache was extracted from, as recorded beside it; ``None`` if none.
    purpose
        What the weights are for, in the error: ``"predict"``, ``"audit the run"``.

    Raises
    ------
    WeightsUnavailable
        The weights file is gone, or its bytes have changed since extraction.
    """
    w = stored["weights"]
    if w["kind"] in ("none", "imagenet"):
        return w["kind"]
    if not path or not Path(path).is_file():
        raise WeightsUnavailable(f"The run's backbone weights file {path!r} is gone; put it back to {purpose}.")
    if f"file:sha256={file_digest(path)}" != w["identity"]:
        raise WeightsUnavailable(f"{path} has changed since extraction (its hash differs); refusing to {purpose} "
                                 "with other weights.")
    return path


def build_backbone(backbone: Backbone, spec: WeightsSpec, seed: int = 0, route: str = "float32"):
    """Build the frozen, top-less backbone at 224x224 with the resolved weights, computing by
    ``route`` (:mod:`covfeat.extraction.precision`): under the mixed routes its layers
    compute in bfloat16 and a last float32 layer casts the feature maps back, so every caller
    (the cache, a head, Grad-CAM's gradients) gets float32 maps.

    Raises
    ------
    WeightsUnavailable
        The weights file does not fit this architecture.
    """
    import keras

    keras.utils.set_random_seed(seed)
    with build_policy(route):  # the variables are float32 under either policy, so the weights load alike
        model = backbone.build(input_shape=(INPUT_SIZE, INPUT_SIZE, 3))
    if spec.path is not None:
        try:
            model.load_weights(spec.path)
        except Exception as exc:
            raise WeightsUnavailable(
                f"Could not load weights from {spec.path} into {backbone.name}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
    if route == "mixed_fused_bn":  # after the weights, as the cast below
        model = fuse_batchnorm(model)
    if route in MIXED_ROUTES:  # after the weights: the files name the backbone's own layers
        maps = keras.layers.Activation("linear", dtype="float32", name="features_float32")(model.outputs[0])
        model = keras.Model(model.inputs, maps, name=model.name)
    model.trainable = False
    if tuple(model.output_shape[1:]) != backbone.feature_shape:
        raise ConfigError(
            f"{backbone.name} gave feature maps of shape {model.output_shape[1:]}, "
            f"expected {backbone.feature_shape}."
        )
    return model


for _b in (
    Backbone("inception_v3", keras_application("InceptionV3"), TF_SCALING, (5, 5, 2048), 0.5,
             _imagenet("inception_v3", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "bcbd6486424b2319ff4ef7d526e38f63")),
    Backbone("inception_resnet_v2", keras_application("InceptionResNetV2"), TF_SCALING, (5, 5, 1536), 0.2,
             _imagenet("inception_resnet_v2", "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "d19885ff4a710c122648d3b5c3b684e4")),
    Backbone("densenet201", keras_application("DenseNet201"), TORCH_SCALING, (7, 7, 1920), 0.5,
             _imagenet("densenet", "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "c13680b51ded0fb44dff2d8f86ac8bb1")),
    Backbone("resnet101_v2", keras_application("ResNet101V2"), TF_SCALING, (7, 7, 2048), 0.2,
             _imagenet("resnet", "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "c0ed64b8031c3730f411d2eb4eea35b5")),
):
    register(_b)
