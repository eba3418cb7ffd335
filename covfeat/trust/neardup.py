"""Near-duplicate radiographs: perceptual fingerprints, the pairs they find, and the groups a split must keep together.

The same radiograph is often published twice -- re-encoded, resized, re-cropped, flipped,
contrast-enhanced, under another patient ID (Cohen's patients 97 and 178 are the same four
images).  Byte hashes cannot see that, and a split that puts the two copies on both sides
inflates every metric.  Near-duplicates are joined with their patients into one group
(union-find) before any split or fold.

Each image gets a fingerprint when it is decoded for extraction (the 224 x 224 image):

- a 64-bit hash of each of :data:`VIEWS`: the image, its mirror image, two CLAHE versions,
  one-sided crops of 5% and 10% of each side, a central crop, and two small rotations.  A
  copy that was cropped, padded, flipped, rotated or contrast-enhanced looks like one of
  these views of the original (or the original like one of the copy's), so their hashes
  land within :data:`MAX_BITS` bits.  Each hash is a DCT hash of the central 90% of the view
  after rank normalisation (histogram equalisation), so a monotone change of contrast
  (gamma, windowing) leaves it alone, and the signs of the first non-constant frequencies
  (not of the constant term) tell radiographs apart.
- a 64 x 64 grey thumbnail of the image, for the confirmation.

Candidates come from the image's own hash against every view of every other image, found by
multi-index hashing (:mod:`covfeat.trust.neardup_index`), so the search is not all-pairs.  A
candidate is confirmed when the thumbnails, brought into line by the matched view and then
aligned by an affine refinement (ECC), correlate at least :data:`MIN_CORR` after local
contrast normalisation -- the correlation looks at detail (ribs, vessels, lines), which two
radiographs of the same patient on different days do not share.

Numbers on the reproduction set are in ``benchmarks/results/neardup.md``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from covfeat.core.lazyjit import lazy_njit
from covfeat.trust.neardup_index import near_codes

VIEWS = (("full", 0.0), ("flip", 0.0), ("clahe", 2.0), ("clahe", 4.0),
         *((side, a) for a in (0.05, 0.10) for side in ("left", "right", "top", "bottom")),
         ("centre", 0.045), ("rotate", 3.0), ("rotate", -3.0))
"""(kind, amount) of each hashed view: a crop removes ``amount`` of one side (``centre``: of
every side), a rotation turns by ``amount`` degrees, a CLAHE view uses ``amount`` as its clip
limit (OpenCV's default 8 x 8 tiles, the setting most re-publications use)."""

FINGERPRINT_HASHES = len(VIEWS)  # 64-bit hashes per image

FINGERPRINT_THUMB_SHAPE = (64, 64)  # uint8 grey thumbnail per image

FINGERPRINT_VERSION = 2  # 1: four central crops, 32 x 32 thumbnails, no views; enters the cache key

HASH_SIDE = 32  # the view is shrunk to this before its DCT

HASH_CENTRE = 0.9  # the hash sees the central 90% of a view: rotation corners and padding stay outside

MAX_BITS = 6  # hash bits that may differ between an image and a view of its copy

MIN_CORR = 0.835  # aligned, contrast-normalised thumbnail correlation that confirms a candidate: midway
# between the lowest copy (0.867, gamma) and the closest different radiographs (0.802) of the benchmark

LCN_SIGMA = 2.0  # pixels of the 64 x 64 thumbnail: the scale of local contrast normalisation

MAX_WARP = 0.10  # largest change of the view's geometry the refinement may make (scale, shear)


def _view(g: np.ndarray, kind: str, amount: float) -> np.ndarray:
    """One view of a square grey float32 image, at the image's own size or cropped."""
    h, w = g.shape
    if kind == "full":
        return g
    if kind == "flip":
        return g[:, ::-1]
    if kind == "clahe":
        u = np.clip(np.rint(g), 0, 255).astype(np.uint8)
        return cv2.createCLAHE(amount, (8, 8)).apply(u).astype(np.float32)
    if kind == "rotate":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), amount, 1.0)
        return cv2.warpAffine(g, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    dy, dx = int(round(amount * h)), int(round(amount * w))
    if kind == "centre":
        return g[dy:h - dy, dx:w - dx]
    return {"left": g[:, dx:], "right": g[:, :w - dx], "top": g[dy:], "bottom": g[:h - dy]}[kind]


def _hash(v: np.ndarray) -> np.uint64:
    h, w = v.shape
    my, mx = int(round(h * (1 - HASH_CENTRE) / 2)), int(round(w * (1 - HASH_CENTRE) / 2))
    t = cv2.resize(np.ascontiguousarray(v[my:h - my, mx:w - mx]), (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    t = _rank(t)
    bits = cv2.dct(t)[1:9, 1:9].ravel() > 0
    return np.packbits(bits.astype(np.uint8)).view(">u8")[0]


def _rank(t: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each pixel replaced by its rank, so gamma and windowing do not matter."""
    r = np.empty(t.size, np.float32)
    r[np.argsort(t.ravel(), kind="stable")] = np.arange(t.size, dtype=np.float32)
    return r.reshape(t.shape)


def fingerprint(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hashes (FINGERPRINT_HASHES,) uint64, thumbnail FINGERPRINT_THUMB_SHAPE uint8) of one
    decoded RGB (or grey) image in [0, 255]."""
    g = np.asarray(img, np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    hashes = np.array([_hash(_view(g, kind, a)) for kind, a in VIEWS], np.uint64)
    thumb = cv2.resize(g, FINGERPRINT_THUMB_SHAPE[::-1], interpolation=cv2.INTER_AREA)
    return hashes, np.clip(np.rint(thumb), 0, 255).astype(np.uint8)


def lcn(t: np.ndarray) -> np.ndarray:
    """Local contrast normalisation: what is left is detail, whatever CLAHE, gamma or windowing did."""
    t = _rank(t)
    m = cv2.GaussianBlur(t, (0, 0), LCN_SIGMA)
    v = cv2.GaussianBlur((t - m) ** 2, (0, 0), LCN_SIGMA)
    return (t - m) / np.sqrt(v + 1.0)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    h, w = a.shape
    my, mx = int(round(h * (1 - HASH_CENTRE) / 2)), int(round(w * (1 - HASH_CENTRE) / 2))
    a = a[my:h - my, mx:w - mx].ravel() - a[my:h - my, mx:w - mx].mean()
    b = b[my:h - my, mx:w - mx].ravel() - b[my:h - my, mx:w - mx].mean()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / d if d > 1e-6 else -1.0


def aligned_corr(query: np.ndarray, target: np.ndarray, view: int) -> float:
    """Correlation of the query's thumbnail with ``VIEWS[view]`` of the target's, after an
    affine refinement of at most :data:`MAX_WARP`; -1 when the thumbnails cannot be aligned."""
    kind, amount = VIEWS[view]
    t = target.astype(np.float32)
    side = t.shape[::-1]
    ref = lcn(cv2.resize(np.ascontiguousarray(_view(t, kind, amount)), side, interpolation=cv2.INTER_LINEAR))
    mov = lcn(query.astype(np.float32))
    warp = np.eye(2, 3, dtype=np.float32)
    try:
        _, warp = cv2.findTransformECC(ref, mov, warp, cv2.MOTION_AFFINE,
                                       (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 60, 1e-5), None, 5)
    except cv2.error:  # no convergence: the two do not line up
        return -1.0
    if np.abs(warp[:, :2] - np.eye(2)).max() > MAX_WARP:
        return -1.0
    moved = cv2.warpAffine(mov, warp, side, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)
    return _corr(ref, moved)


def usable_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """Rows with a fingerprint: a flat thumbnail (no fingerprint, a blank image) never matches.

    A row is read only up to its first pixel unlike its first (max > min over the whole row
    read 4 KiB an image twice: 0.7 us an image at 10^5 images, out of cache, against 0.26 at 10^3)."""
    return _not_flat(np.ascontiguousarray(thumbs).reshape(len(thumbs), -1))


@lazy_njit(cache=True, nogil=True)
def _not_flat(rows):
    out = np.zeros(rows.shape[0], np.bool_)
    for i in range(rows.shape[0]):
        first = rows[i, 0]
        for j in range(1, rows.shape[1]):
            if rows[i, j] != first:
                out[i] = True
                break
    return out


def candidates(hashes: np.ndarray, thumbs: np.ndarray, other_hashes: np.ndarray | None = None,
               other_thumbs: np.ndarray | None = None, max_bits: int = MAX_BITS) -> tuple[list, int]:
    """Hash candidates (i, j, query side, view, bits) and the number of codes compared.

    Each image's own hash (view 0) is looked up among every view of the others, both ways
    between two sets; ``query side`` 0 means image i's own hash met view ``view`` of j, 1 the
    other way round."""
    cross = other_hashes is not None
    hb, tb = (other_hashes, other_thumbs) if cross else (hashes, thumbs)
    ia = np.flatnonzero(usable_thumbnails(thumbs))
    ib = np.flatnonzero(usable_thumbnails(tb)) if cross else ia
    ha, hb = np.asarray(hashes, np.uint64)[ia], np.asarray(hb, np.uint64)[ib]
    if not len(ia) or not len(ib):
        return [], 0
    out = []
    if cross:
        rows, compared = near_codes(ha[:, 0], hb, max_bits)
        out += [(ia[q], ib[t], 0, v, b) for q, t, v, b in rows]
        rows, more = near_codes(hb[:, 0], ha, max_bits)
        out += [(ia[t], ib[q], 1, v, b) for q, t, v, b in rows]
        return out, compared + more
    rows, compared = near_codes(ha[:, 0], ha, max_bits, skip_self=True)
    for q, t, v, b in rows:
        i, j = ia[q], ia[t]
        out.append((i, j, 0, v, b) if i < j else (j, i, 1, v, b))
    return out, compared


def find_pairs(hashes: np.ndarray, thumbs: np.ndarray, other_hashes: np.ndarray | None = None,
               other_thumbs: np.ndarray | None = None, max_bits: int = MAX_BITS,
               min_corr: float = MIN_CORR) -> list[tuple[int, int, int, float]]:
    """Near-duplicate pairs (i, j, bits, corr), within one set (i < j) or between two sets
    (i in the first, j in the other): hash candidates, each confirmed by its aligned
    thumbnail correlation (the best over the views that made it a candidate)."""
    tb = other_thumbs if other_hashes is not None else thumbs
    found, _ = candidates(hashes, thumbs, other_hashes, other_thumbs, max_bits)
    best: dict[tuple[int, int], tuple[int, float]] = {}
    for i, j, side, view, bits in found:
        q, t = (thumbs[i], tb[j]) if side == 0 else (tb[j], thumbs[i])
        corr = aligned_corr(q, t, int(view))
        prev = best.get((int(i), int(j)))
        if corr >= min_corr and (prev is None or corr > prev[1]):
            best[(int(i), int(j))] = (int(bits), corr)
    return sorted((i, j, d, c) for (i, j), (d, c) in best.items())


def join_groups(groups: np.ndarray, pairs) -> np.ndarray:
    """Union-find: every group joined with the groups of its near-duplicates; returns a
    group label per row (the smallest original label of its joined set)."""
    groups = np.asarray(groups).astype(str)
    uniq, inv = np.unique(groups, return_inverse=True)
    parent = np.arange(len(uniq))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, *_ in pairs:
        a, b = root(inv[i]), root(inv[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return uniq[[root(g) for g in inv]]


def label_conflicts(pairs, labels) -> list[list[int]]:
    """The images joined by near-duplicate ``pairs`` into one radiograph whose copies carry
    different labels: one sorted list of rows per such group.  Like the same bytes under two
    labels, a radiograph cannot be both COVID-19 and NORMAL; its copies are a labelling error
    (or a copy filed in the wrong class), and no split can put them right."""
    labels = np.asarray(labels)
    members = sorted({int(r) for i, j, *_ in pairs for r in (i, j)})
    if not members:
        return []
    joined = join_groups(np.array([str(r) for r in members]), [(members.index(int(i)), members.index(int(j)))
                                                                 for i, j, *_ in pairs])
    out = []
    for g in np.unique(joined):
        rows = [members[k] for k in np.flatnonzero(joined == g)]
        if len({int(labels[r]) for r in rows}) > 1:
            out.append(sorted(rows))
    return sorted(out)


def describe(pairs, paths, patients, limit: int = 10) -> list[str]:
    """One line per pair: the two files, their patients, and how close they are."""
    out = []
    for i, j, d, c in pairs[:limit]:
        out.append(f"  {Path(paths[i]).name} ({patients[i]}) ~ {Path(paths[j]).name} ({patients[j]}): "
                   f"{d} bits, correlation {c:.3f}")
    if len(pairs) > limit:
        out.append(f"  ... and {len(pairs) - limit} more (all listed in the cache's near_duplicates)")
    return out
