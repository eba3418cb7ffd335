"""Training a lungs model from image/mask pairs, and scoring it on images it never saw.

The images are split three ways by groups of near-duplicates (covfeat.trust.neardup: openist
holds re-cropped copies of one radiograph, and a copy on each side would inflate the Dice):
a held-out share, scored once at the end; a validation part of the rest, which picks the
epoch (the best validation Dice is kept, and training stops after ``patience`` epochs
without a better one); and the training images.  The held-out Dice and IoU are measured
as a user will meet the masks: predicted, resized to each mask's own size, post-processed,
then compared with it.

Augmentation is small rotations, shifts and zooms, and brightness, contrast and gamma;
never a left/right flip: the heart lies left, the left lung is the smaller one and the
mediastinum's outline differs on each side, so a flipped radiograph is a dextrocardia
patient, not a normal one, and would teach the network a shape it must not expect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covfeat.core.errors import DataError
from covfeat.core.fsutil import sha256_file
from covfeat.imaging.decode import INPUT_SIZE, resize
from covfeat.lungs.config import LungsFitConfig
from covfeat.lungs.data import Pair, load_pairs, match
from covfeat.lungs.model import build_unet, model_input, save_lungs
from covfeat.lungs.segment import at_size, postprocess
from covfeat.trust.neardup import find_pairs, fingerprint, join_groups

ROTATE, SHIFT, ZOOM = 8.0, 0.06, 0.10  # degrees, share of the side, relative scale (each +/-)
BRIGHTNESS, CONTRAST, GAMMA = 0.08, 0.15, 0.35  # added, relative, exp of +/- (in the [0, 1] input)


@dataclass
class LungsFit:
    folder: Path
    info: dict


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks (1 and 1 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def split(groups: np.ndarray, holdout: float, validation: float, seed: int) -> np.ndarray:
    """A part per image, 0 train, 1 validation, 2 held out, whole groups at a time: groups in
    a seeded random order, the held-out share filled first, then the validation share of
    the rest.  Each part gets at least one image.

    Raises
    ------
    DataError
        Too few groups for three parts.
    """
    uniq, inv = np.unique(groups, return_inverse=True)
    if len(uniq) < 3:
        raise DataError(f"{len(groups)} images in {len(uniq)} near-duplicate group(s): a lungs model needs images of "
                        "at least 3 distinct radiographs (training, validation, held out); give more image/mask pairs.")
    order = np.random.default_rng(seed).permutation(len(uniq))
    sizes = np.bincount(inv, minlength=len(uniq))
    n = len(groups)
    want_test = max(1.0, holdout * n)
    want_val = max(1.0, validation * (n - want_test))
    part_of_group = np.zeros(len(uniq), int)
    taken = {1: 0, 2: 0}
    k = 0
    for part, want in ((2, want_test), (1, want_val)):
        while taken[part] < want and k < len(order) - 1:  # the last group always trains
            part_of_group[order[k]] = part
            taken[part] += sizes[order[k]]
            k += 1
    return part_of_group[inv]


def near_duplicate_groups(images: list[np.ndarray], stems: list[str]) -> tuple[np.ndarray, list]:
    """One group label per image, near-duplicates joined (fingerprints of the 224 x 224 image,
    as extraction makes them); and the pairs found."""
    prints = [fingerprint(resize(img, INPUT_SIZE)) for img in images]
    hashes = np.stack([h for h, _ in prints])
    thumbs = np.stack([t for _, t in prints])
    pairs = find_pairs(hashes, thumbs)
    return join_groups(np.array(stems), pairs), pairs


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random small affine change of each image and its mask together, then brightness,
    contrast and gamma of the image."""
    n, size, _ = x.shape
    xa, ya = np.empty_like(x), np.empty_like(y)
    for i in range(n):
        m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-ROTATE, ROTATE), 1 + rng.uniform(-ZOOM, ZOOM))
        m[:, 2] += rng.uniform(-SHIFT, SHIFT, 2) * size
        xa[i] = cv2.warpAffine(x[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        ya[i] = cv2.warpAffine(y[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        g = np.clip(xa[i], 0, 1) ** np.exp(rng.uniform(-GAMMA, GAMMA))
        g = (g - 0.5) * (1 + rng.uniform(-CONTRAST, CONTRAST)) + 0.5 + rng.uniform(-BRIGHTNESS, BRIGHTNESS)
        xa[i] = np.clip(g, 0, 1)
    return xa, ya


def _loss(y_true, y_pred):
    """Binary cross-entropy plus soft Dice of the batch: the cross-entropy trains every pixel,
    the Dice keeps the smaller lung from being traded for the background."""
    from keras import ops

    bce = ops.mean(ops.binary_crossentropy(y_true, y_pred))
    inter = ops.sum(y_true * y_pred)
    dice = (2 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
    return bce + 1.0 - dice


def _summary(values: list[float], stems: list[str]) -> dict:
    k = int(np.argmin(values))
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "worst": {"image": stems[k], "value": float(values[k])}}


def score(net, images: list[np.ndarray], masks: list[np.ndarray], stems: list[str], size: int,
          threshold: float) -> dict:
    """Dice and IoU of each image at its mask's own size, after post-processing."""
    x = np.stack([model_input(img, size) for img in images])
    prob = np.asarray(net.predict(x[..., None], batch_size=16, verbose=0))[..., 0]
    dice, iou = [], []
    for p, m in zip(prob, masks):
        d, j = dice_iou(postprocess(at_size(p, m.shape), threshold), m)
        dice.append(d)
        iou.append(j)
    return {"images": len(stems), "dice": _summary(dice, stems), "iou": _summary(iou, stems),
            "per_image": {s: {"dice": round(d, 4), "iou": round(j, 4)} for s, d, j in zip(stems, dice, iou)}}


def fit_lungs(images: str | Path, masks: str | Path, out: str | Path, config: LungsFitConfig | None = None,
              log=None) -> LungsFit:
    """Train a lungs model on the pairs of ``images`` and ``masks`` (matched by file stem) and
    write its folder at ``out`` (``out-2``... when it exists).

    ``log`` receives a line per stage and per epoch (None: silent).

    Raises
    ------
    SourceNotFound, DataError
        Missing folders, unmatched files, unusable masks, too few images.
    """
    config = config or LungsFitConfig()
    say = log or (lambda _: None)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    pairs: list[Pair] = match(images, masks)
    imgs, msks = load_pairs(pairs)
    stems = [p.stem for p in pairs]
    groups, dups = near_duplicate_groups(imgs, stems)
    part = split(groups, config.holdout, config.validation, config.seed)
    say(f"{len(pairs)} image/mask pairs, {len(np.unique(groups))} distinct radiographs ({len(dups)} near-duplicate "
        f"pair(s) kept on one side); {int((part == 0).sum())} train, {int((part == 1).sum())} validation, "
        f"{int((part == 2).sum())} held out")
    s = config.size
    x = np.stack([model_input(img, s) for img in imgs])
    y = np.stack([cv2.resize(m.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA) for m in msks])
    net, best_epoch, epochs_run, history = train(x[part == 0], y[part == 0], x[part == 1], y[part == 1], config, say)
    held = np.flatnonzero(part == 2)
    scores = score(net, [imgs[i] for i in held], [msks[i] for i in held], [stems[i] for i in held], s,
                   config.threshold)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    names = ("train", "validation", "held out")
    info = {
        "training": {
            "config": config.as_dict(),
            "images": str(Path(images).resolve()), "masks": str(Path(masks).resolve()),
            "data": [{"stem": p.stem, "image_sha256": sha256_file(p.image), "mask_sha256": sha256_file(p.mask),
                      "part": names[k]} for p, k in zip(pairs, part)],
            "near_duplicates": [[stems[i], stems[j]] for i, j, *_ in dups],
            "epochs_run": epochs_run, "best_epoch": best_epoch, "validation_dice": history,
            "seconds": {"wall": round(wall, 1), "cpu": round(cpu, 1)},
        },
        "heldout": scores,
    }
    folder = save_lungs(Path(out).parent, Path(out).name, config.architecture(), net.get_weights(), info)
    return LungsFit(folder, info)


def train(xt, yt, xv, yv, config: LungsFitConfig, say):
    """The U-Net trained on (xt, yt), the epoch picked by the Dice on (xv, yv); returns the
    network with the best epoch's weights, that epoch (1-based), the epochs run and the
    validation Dice of each."""
    from covfeat.core.quiet import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(config.seed)
    net = build_unet(config.size, config.filters, config.depth)
    steps = -(-len(xt) // config.batch_size)
    rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, steps * config.epochs, alpha=0.05)
    net.compile(optimizer=keras.optimizers.Adam(rate), loss=_loss)
    rng = np.random.default_rng(config.seed)
    truth = yv > 0.5
    best, best_epoch, best_weights, history = -1.0, 0, None, []
    for epoch in range(1, config.epochs + 1):
        xa, ya = augment(xt, yt, rng) if config.augment else (xt, yt)
        loss = net.fit(xa[..., None], ya[..., None], batch_size=config.batch_size, epochs=1, verbose=0,
                       shuffle=True).history["loss"][-1]
        pv = np.asarray(net.predict(xv[..., None], batch_size=16, verbose=0))[..., 0]
        dv = float(np.mean([dice_iou(postprocess(p, config.threshold), t)[0] for p, t in zip(pv, truth)]))
        history.append(round(dv, 4))
        if dv > best:
            best, best_epoch, best_weights = dv, epoch, net.get_weights()
        say(f"epoch {epoch}: loss {loss:.4f}, validation Dice {dv:.4f}" + (" (best)" if best_epoch == epoch else ""))
        if epoch - best_epoch >= config.patience:
            break
    net.set_weights(best_weights)
    return net, best_epoch, len(history), history
