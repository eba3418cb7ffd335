"""New radiographs through a finished run: the same decoding, preprocessing, backbone and head.

Everything is taken from the run's recorded extraction config, never from defaults,
because a model fed differently scaled pixels than it was trained on tends to call every
image one class.  ``export`` folds preprocessing, backbone and head into one Keras model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backbones import INPUT_SIZE, build_backbone, file_digest, get_backbone, resolve_weights, WeightsSpec
from .errors import RunError, WeightsUnavailable
from .images import UnreadableImage, load, to_model_input
from .occlusion import Occlusion
from .sources import IMAGE_SUFFIXES


@dataclass
class LoadedRun:
    path: Path
    config: dict
    extract: dict
    threshold: float
    head: object
    backbone: object
    spec: WeightsSpec


def _weights_for(extract_cfg: dict, weights_path: str | None) -> WeightsSpec:
    w = extract_cfg["weights"]
    bb = get_backbone(extract_cfg["backbone"])
    if w["kind"] == "none":
        return resolve_weights(bb, "none", seed=extract_cfg["seed"])
    if w["kind"] == "imagenet":
        return resolve_weights(bb, "imagenet")
    if not weights_path or not Path(weights_path).is_file():
        raise WeightsUnavailable(f"The run's backbone weights file {weights_path!r} is gone; put it back to predict.")
    if f"file:sha256={file_digest(weights_path)}" != w["identity"]:
        raise WeightsUnavailable(f"{weights_path} has changed since extraction (its hash differs); refusing to predict with other weights.")
    return resolve_weights(bb, weights_path)


def load_run(run: str | Path) -> LoadedRun:
    """Load a run's head and rebuild its backbone with the very weights of its cache.

    Raises
    ------
    RunError, WeightsUnavailable
    """
    import keras

    run = Path(run)
    if not (run / "head.keras").is_file() or not (run / "config.json").is_file():
        raise RunError(f"{run} is not a finished covfeat run folder (no head.keras); pass a folder printed by `covfeat fit-head`.")
    config = json.loads((run / "config.json").read_text())
    cache_info = json.loads((run / "cache.json").read_text())
    ex = config["extract"]
    spec = _weights_for(ex, cache_info.get("weights", {}).get("path"))
    bb = get_backbone(ex["backbone"])
    head = keras.models.load_model(run / "head.keras")
    return LoadedRun(run, config, ex, float(config["threshold"]), head, build_backbone(bb, spec, seed=ex["seed"]), spec)


def list_images(items: list[str | Path]) -> list[Path]:
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def model_inputs(lr: LoadedRun, path: str | Path, img: np.ndarray | None = None) -> np.ndarray:
    """Decode, resize, occlude (if the run's cache was occluded) and scale one image;
    pass ``img`` (from :func:`covfeat.images.load`) if it is already decoded."""
    bb = get_backbone(lr.extract["backbone"])
    from .extract import decode_min_side

    if img is None:
        img = load(path, min_side=decode_min_side(lr.extract.get("scaled_decode", False)))
    occ = lr.extract.get("occlusion", {"kind": "none"})
    if occ.get("kind", "none") != "none":
        img = Occlusion(**{**occ, "box": tuple(occ["box"])}).apply(img, str(path))
    return to_model_input(img, lr.extract["preprocess"], bb)


def predict(run: str | Path, items: list[str | Path], batch_size: int = 16) -> list[dict]:
    """P(COVID-19) and the label at the run's threshold for every image; unreadable ones get an error."""
    lr = load_run(run)
    rows, xs, where = [], [], []
    for p in list_images(items):
        try:
            xs.append(model_inputs(lr, p))
            where.append(len(rows))
            rows.append({"path": str(p), "p_covid": None, "label": None, "error": ""})
        except UnreadableImage as exc:
            rows.append({"path": str(p), "p_covid": None, "label": None, "error": str(exc)})
        except OSError as exc:
            rows.append({"path": str(p), "p_covid": None, "label": None, "error": f"cannot read file ({exc})"})
    for s in range(0, len(xs), batch_size):
        x = np.stack(xs[s:s + batch_size])
        feats = lr.backbone.predict(x, verbose=0)
        probs = lr.head.predict(feats, verbose=0)[:, 1]
        for i, pc in zip(where[s:s + batch_size], probs):
            rows[i]["p_covid"] = float(pc)
            rows[i]["label"] = "COVID-19" if pc >= lr.threshold else "NORMAL"
    if not lr.spec.pretrained:
        print("NOTE: this run's backbone is NOT PRETRAINED (random init); its predictions are for testing only.",
              file=sys.stderr)
    return rows


def export(run: str | Path, out: str | Path):
    """One Keras model: 224x224 RGB in [0, 255] -> preprocessing -> backbone -> head -> 2 probabilities.

    Decode and resize first (``covfeat.images.load``); the scaling the run
    was trained with is inside the model, as Keras layers.
    """
    import keras

    lr = load_run(run)
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="rgb_0_255")
    x = _preprocess_layers(lr.extract["preprocess"], lr.extract["backbone"])(inp)
    x = lr.backbone(x, training=False)
    outp = lr.head(x, training=False)
    model = keras.Model(inp, outp, name=f"covfeat_{lr.extract['backbone']}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out


def _preprocess_layers(preprocess: str, backbone: str):
    """The same scaling as :func:`covfeat.images.to_model_input`, as serialisable layers."""
    import keras
    from keras import layers

    if preprocess == "paper":
        return keras.Sequential([layers.Rescaling(1.0 / 255.0)], name="preprocess")
    module = get_backbone(backbone).module
    if module in ("inception_v3", "inception_resnet_v2", "resnet_v2"):  # "tf" mode: [-1, 1]
        return keras.Sequential([layers.Rescaling(1.0 / 127.5, offset=-1.0)], name="preprocess")
    if module == "densenet":  # "torch" mode: /255 then ImageNet mean/std
        mean = np.array([0.485, 0.456, 0.406])
        std = np.array([0.229, 0.224, 0.225])
        return keras.Sequential([layers.Rescaling(1.0 / 255.0),
                                 layers.Normalization(mean=mean, variance=std ** 2)], name="preprocess")
    raise RunError(f"No export preprocessing for {backbone} with --preprocess {preprocess}.")
