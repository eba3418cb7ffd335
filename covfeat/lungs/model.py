"""What a lungs model is: the U-Net's architecture, the one conversion from pixels to its input,
and the lungs folder that keeps a trained one.

A lungs folder holds two files and nothing else: ``lungs.json`` (the architecture's settings,
the SHA-256 of the weights file, the training data's hashes, the held-out scores, versions)
and ``weights.npz`` (the weight arrays, in the order the architecture creates them).  Loading
builds the architecture again from the settings and puts the arrays in place; nothing in the
folder is ever deserialised into Python objects (no pickle, no Keras model file), so a lungs
folder from someone else can be read without trusting it.  The weights' SHA-256 is checked
against ``lungs.json`` before they are used: a damaged or swapped file is refused.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np

from covfeat.core import __version__
from covfeat.core.errors import ConfigError
from covfeat.core.fingerprint import fingerprint, keras_versions
from covfeat.core.fsutil import AtomicDir, sha256_file

INFO = "lungs.json"

WEIGHTS = "weights.npz"

KIND = "covfeat-lungs"

FORMAT = 1  # of the lungs folder: lungs.json's layout and the weights file's

INPUT_VERSION = 1  # of model_input: grey, resized with area interpolation, 1st-99th percentile stretch

ARCHITECTURE = ("size", "filters", "depth")  # the settings that make the network; all of them are in lungs.json

STRETCH = (1.0, 99.0)  # percentiles mapped to 0 and 1 by model_input


def model_input(img: np.ndarray, size: int) -> np.ndarray:
    """The one conversion training and prediction share: a decoded image (H, W, 3) float32 RGB
    in [0, 255] -> (size, size) float32 in [0, 1].

    Grey (the mean of the channels), resized with area interpolation when shrinking, then
    the 1st and 99th percentiles stretched to 0 and 1 and clipped.  The stretch makes the
    network see radiographs of every exposure and windowing alike (the cohen collection's
    range from washed-out scans to burnt-in contrast), and a burnt-in label or a black
    border cannot move it much."""
    g = np.asarray(img, np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    shrink = g.shape[0] > size or g.shape[1] > size
    g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    lo, hi = np.percentile(g, STRETCH)
    if hi <= lo:
        return np.zeros((size, size), np.float32)
    return np.clip((g - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def build_unet(size: int, filters: int, depth: int):
    """The U-Net (Ronneberger et al. 2015), small: ``depth`` poolings, ``filters`` channels at
    full resolution doubling at each level, two 3x3 convolutions with batch normalisation per
    block, bilinear upsampling, and a sigmoid output of one channel.  Input (size, size, 1).

    Every layer is made here in a fixed order, so the same settings give the same list of
    weights; that order is what ``weights.npz`` follows."""
    import keras
    from keras import layers

    def block(x, f):
        for _ in range(2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=0.9)(x)  # few steps per run: the running statistics must keep up
            x = layers.Activation("relu")(x)
        return x

    inp = keras.Input((size, size, 1))
    x, skips = inp, []
    for level in range(depth):
        x = block(x, filters * 2 ** level)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = block(x, filters * 2 ** depth)
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, interpolation="bilinear")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = block(x, filters * 2 ** level)
    out = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inp, out, name="lungs_unet")


def check_architecture(settings: dict) -> None:
    """A size the poolings can halve evenly, and sane filters and depth."""
    size, filters, depth = (settings.get(k) for k in ARCHITECTURE)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, filters, depth)):
        raise ConfigError(f"lungs settings: expected integers size, filters and depth, got {size!r}, {filters!r}, "
                          f"{depth!r}.")
    if not 1 <= depth <= 6 or not 1 <= filters <= 256:
        raise ConfigError(f"lungs settings: expected depth from 1 to 6 and filters from 1 to 256, got {depth} and "
                          f"{filters}.")
    if size < 2 ** depth * 4 or size % 2 ** depth:
        raise ConfigError(f"lungs settings: size {size} must be a multiple of 2^depth = {2 ** depth} and at least "
                          f"{2 ** depth * 4}.")


def save_lungs(parent: str | Path, name: str, settings: dict, weights: list[np.ndarray], info: dict) -> Path:
    """Write a lungs folder ``parent/name`` atomically (``name-2``... when it exists): the
    weights, then ``lungs.json`` with their SHA-256, ``settings`` and the rest of ``info``
    (training data hashes, scores...).  Returns the folder."""
    check_architecture(settings)
    with AtomicDir(parent, name) as d:
        path = d.path / WEIGHTS
        with open(path, "wb") as f:
            np.savez(f, **{f"w{i:03d}": np.asarray(w) for i, w in enumerate(weights)})
        doc = {"kind": KIND, "format": FORMAT, "settings": settings,
               "weights": {"file": WEIGHTS, "sha256": sha256_file(path), "arrays": len(weights)},
               "versions": {"covfeat": __version__, **keras_versions()}, **info}
        (d.path / INFO).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return d.final


class LungsModel:
    """A trained segmenter's folder.  Loading reads and checks ``lungs.json`` and the weights'
    SHA-256 only; the network is built (and TensorFlow imported) at the first call of
    :meth:`probabilities`, so reading a model's hash for a cache key costs no TensorFlow."""

    def __init__(self, folder: Path, info: dict):
        self.folder = folder
        self.info = info
        self.settings = info["settings"]
        self.size = int(self.settings["size"])
        self.threshold = float(self.settings.get("threshold", 0.5))
        self.hash = fingerprint({"kind": KIND, "format": FORMAT, "settings": self.settings,
                                 "weights_sha256": info["weights"]["sha256"]})
        self._net = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | Path) -> "LungsModel":
        """Read and check a lungs folder.

        Raises
        ------
        ConfigError
            Not a lungs folder, a format of another covfeat, or damaged (the weights' SHA-256
            is not lungs.json's).
        """
        folder = Path(folder)
        what = f"{folder}: not a lungs model"
        make = "make one with `covfeat lungs fit --images DIR --masks DIR --out DIR`."
        try:
            info = json.loads((folder / INFO).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{what} (no {INFO} in it); {make}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what} ({INFO} cannot be read: {type(exc).__name__}); {make}") from None
        if not isinstance(info, dict) or info.get("kind") != KIND:
            raise ConfigError(f"{what} ({INFO} is not a covfeat lungs file); {make}")
        if info.get("format") != FORMAT:
            raise ConfigError(f"{folder}: lungs folder of format {info.get('format')!r}, this covfeat reads format "
                              f"{FORMAT}; train it again with `covfeat lungs fit`.")
        try:
            check_architecture(info["settings"])
            want = info["weights"]["sha256"]
        except (KeyError, TypeError):
            raise ConfigError(f"{folder}: damaged lungs model ({INFO} lacks its settings or weights' hash); train it "
                              "again with `covfeat lungs fit`.") from None
        if info["settings"].get("input_version") != INPUT_VERSION:
            raise ConfigError(f"{folder}: lungs model made for input conversion {info['settings'].get('input_version')!r}, "
                              f"this covfeat converts images with version {INPUT_VERSION}; train it again with "
                              "`covfeat lungs fit`.")
        path = folder / WEIGHTS
        try:
            got = sha256_file(path)
        except OSError as exc:
            raise ConfigError(f"{folder}: damaged lungs model ({WEIGHTS} cannot be read: "
                              f"{exc.strerror or type(exc).__name__}); train it again with `covfeat lungs fit`.") from None
        if got != want:
            raise ConfigError(f"{folder}: damaged lungs model: the SHA-256 of {WEIGHTS} ({got[:12]}...) is not the one "
                              f"{INFO} records ({want[:12]}...); train it again with `covfeat lungs fit`.")
        return cls(folder, info)

    def network(self):
        """The Keras model with the folder's weights (built once, on first use)."""
        with self._lock:
            if self._net is None:
                self._net = self._build()
            return self._net

    def _build(self):
        from covfeat.core.quiet import import_tensorflow

        import_tensorflow()
        s = self.settings
        net = build_unet(s["size"], s["filters"], s["depth"])
        damaged = f"{self.folder}: damaged lungs model ({WEIGHTS} does not fit the architecture of {INFO}"
        with np.load(self.folder / WEIGHTS, allow_pickle=False) as z:
            arrays = [z[k] for k in sorted(z.files)]
        shapes = [tuple(w.shape) for w in net.get_weights()]
        if [tuple(a.shape) for a in arrays] != shapes:
            raise ConfigError(f"{damaged}: {len(arrays)} arrays, the architecture has {len(shapes)} of other shapes); "
                              "train it again with `covfeat lungs fit`.")
        net.set_weights(arrays)
        return net

    def probabilities(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, size, size) float32 in [0, 1] (model inputs) -> the lung probability of every
        pixel, (N, size, size) float32.  Thread-safe: calls are served one at a time."""
        x = np.asarray(x, np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected model inputs of shape (N, {self.size}, {self.size}), got {x.shape}")
        net = self.network()
        out = np.empty(x.shape, np.float32)
        with self._lock:
            for i in range(0, len(x), batch_size):
                out[i:i + batch_size] = np.asarray(net.predict_on_batch(x[i:i + batch_size, :, :, None]))[..., 0]
        return out
