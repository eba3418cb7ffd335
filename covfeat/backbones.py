"""What a backbone is: the registry of the paper's four frozen ImageNet CNNs and their weights.

Each entry says how to build the network without its top, which ``preprocess_input``
belongs to it, the shape of its pre-pool feature map at 224x224, the paper's dropout
rate for its head, and where Keras publishes (and caches) its ImageNet weights.
Adding a backbone is adding one entry to :data:`REGISTRY`.

Weights are resolved *before* any other work, so an offline machine without the cached
file stops at once with one message saying which file to put where.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError, WeightsUnavailable

INPUT_SIZE = 224

_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """One registered backbone (name, constructor, preprocessing, feature shape, weights)."""

    name: str
    keras_name: str  # attribute of keras.applications
    module: str  # keras.applications submodule holding preprocess_input
    feature_shape: tuple[int, int, int]
    dropout: float  # paper section 4.3
    weights_file: str  # file name of the ImageNet no-top weights in Keras's cache
    weights_url: str
    weights_md5: str  # the hash Keras itself checks the cached file against

    def constructor(self) -> Callable:
        import keras

        return getattr(keras.applications, self.keras_name)

    def preprocess_input(self):
        import keras

        return getattr(keras.applications, self.module).preprocess_input


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "inception_v3", "InceptionV3", "inception_v3", (5, 5, 2048), 0.5,
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "bcbd6486424b2319ff4ef7d526e38f63",
        ),
        Backbone(
            "inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", (5, 5, 1536), 0.2,
            "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "d19885ff4a710c122648d3b5c3b684e4",
        ),
        Backbone(
            "densenet201", "DenseNet201", "densenet", (7, 7, 1920), 0.5,
            "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "c13680b51ded0fb44dff2d8f86ac8bb1",
        ),
        Backbone(
            "resnet101_v2", "ResNet101V2", "resnet_v2", (7, 7, 2048), 0.2,
            "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _KERAS_URL + "resnet/resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "c0ed64b8031c3730f411d2eb4eea35b5",
        ),
    )
}


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return list(REGISTRY)


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"Unknown backbone {name!r}; expected one of: {', '.join(REGISTRY)}."
        ) from None


def keras_cache_dir() -> Path:
    """The folder where Keras's get_file caches application weights ($KERAS_HOME/models,
    or /tmp/.keras/models when that is not writable, as get_file itself decides)."""
    from keras.src.backend import config  # the same function get_file asks

    base = os.path.expanduser(config.keras_home())
    if os.path.isdir(base) and not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        target = keras_cache_dir() / backbone.weights_file
        if target.exists():
            md5 = file_digest(target, "md5")
            if md5 != backbone.weights_md5:
                raise WeightsUnavailable(
                    f"{target} is not the published ImageNet weights for {backbone.name} "
                    f"(md5 {md5}, expected {backbone.weights_md5}). Remove it so Keras can "
                    f"download the real file, or pass it as --weights {target}."
                )
        from keras.utils import get_file

        try:
            # Keras prints its download progress on stdout, whose last line is our result.
            with contextlib.redirect_stdout(sys.stderr):
                path = get_file(
                    backbone.weights_file,
                    backbone.weights_url,
                    cache_subdir="models",
                    file_hash=backbone.weights_md5,
                )
        except Exception as exc:  # Keras wraps every URL failure in a bare Exception
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsUnavailable(
                f"ImageNet weights for {backbone.name} are not cached and could not be "
                f"downloaded ({reason}). Put {backbone.weights_file} (from "
                f"{backbone.weights_url}) in {keras_cache_dir()}/, or pass "
                f"--weights FILE or --weights none."
            ) from None
        return WeightsSpec("imagenet", str(path), f"imagenet:md5={backbone.weights_md5}", True)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(
            f"--weights {weights!r}: no such file; expected 'imagenet', 'none' or the path "
            f"of a weights file for {backbone.name}."
        )
    return WeightsSpec("file", str(path.resolve()), f"file:sha256={file_digest(path)}", True)


def build_backbone(backbone: Backbone, spec: WeightsSpec, seed: int = 0):
    """Build the frozen, top-less backbone at 224x224 with the resolved weights.

    Raises
    ------
    WeightsUnavailable
        The weights file does not fit this architecture.
    """
    import keras

    keras.utils.set_random_seed(seed)
    model = backbone.constructor()(
        include_top=False, weights=None, input_shape=(INPUT_SIZE, INPUT_SIZE, 3)
    )
    if spec.path is not None:
        try:
            model.load_weights(spec.path)
        except Exception as exc:
            raise WeightsUnavailable(
                f"Could not load weights from {spec.path} into {backbone.name}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
    model.trainable = False
    if tuple(model.output_shape[1:]) != backbone.feature_shape:
        raise ConfigError(
            f"{backbone.name} gave feature maps of shape {model.output_shape[1:]}, "
            f"expected {backbone.feature_shape}."
        )
    return model
