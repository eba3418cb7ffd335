"""Near-duplicate radiographs: perceptual fingerprints, the pairs they find, and the groups a split must keep together.

The same radiograph is often published twice -- re-encoded, resized, re-cropped, under
another patient ID (Cohen's patients 97 and 178 are the same four images).  Byte hashes
cannot see that, and a split that puts the two copies on both sides inflates every
metric.  Each image gets a fingerprint when it is decoded for extraction: for the full
224 x 224 image and three central crops (92%, 85%, 78% of each side), a 64-bit DCT
perceptual hash and a 32 x 32 grey thumbnail.  Two images are near-duplicates when, for
the full image of one and the full image or a central crop of the other, the hashes
differ in at most :data:`MAX_BITS` bits *and* the thumbnails correlate at least
:data:`MIN_CORR` (the hash finds candidates, the correlation confirms them).  Near-
duplicates are joined with their patients into one group (union-find) before any split
or fold.

On the reproduction set (cohen + kermany/NORMAL + openist/NORMAL) the true pairs sit at
0-2 bits and correlation >= 0.988; the closest pairs of different radiographs reach 0.95.
What it does not catch: a re-crop much larger than a fifth of a side, or one far off
centre (one of openist's re-cropped pairs is of that kind), flips and rotations.
"""

from __future__ import annotations

import cv2
import numpy as np

CROPS = (1.0, 0.92, 0.85, 0.78)  # the full image, then central crops


MAX_BITS = 4  # hash bits that may differ


MIN_CORR = 0.97  # thumbnail correlation that confirms a candidate


THUMB = 32


def fingerprint(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hashes (4,) uint64, thumbnails (4, 32, 32) uint8) of one decoded RGB image in [0, 255]."""
    g = np.asarray(img, np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    h, w = g.shape
    hashes = np.zeros(len(CROPS), np.uint64)
    thumbs = np.zeros((len(CROPS), THUMB, THUMB), np.uint8)
    for k, s in enumerate(CROPS):
        ch, cw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        t = cv2.resize(g[y0:y0 + ch, x0:x0 + cw], (THUMB, THUMB), interpolation=cv2.INTER_AREA)
        thumbs[k] = np.clip(np.rint(t), 0, 255).astype(np.uint8)
        low = cv2.dct(t.astype(np.float32))[:8, :8].ravel()
        bits = low > np.median(low[1:])
        hashes[k] = np.packbits(bits.astype(np.uint8)).view(">u8")[0]
    return hashes, thumbs


def _unit(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean unit-norm thumbnails; flat ones (no fingerprint, blank images) are marked unusable."""
    z = thumbs.reshape(*thumbs.shape[:2], -1).astype(np.float32)
    z -= z.mean(-1, keepdims=True)
    norm = np.linalg.norm(z, axis=-1, keepdims=True)
    ok = norm[..., 0] > 1e-3
    return z / np.where(norm > 1e-3, norm, 1.0), ok[:, 0]


def find_pairs(hashes: np.ndarray, thumbs: np.ndarray, other_hashes: np.ndarray | None = None,
               other_thumbs: np.ndarray | None = None, max_bits: int = MAX_BITS, min_corr: float = MIN_CORR,
               block: int = 2048) -> list[tuple[int, int, int, float]]:
    """Near-duplicate pairs (i, j, bits, corr), within one set (i < j) or between two sets.

    All pairs are compared (hash distances in blocks, correlation only for candidates),
    which suits up to a few tens of thousands of images.
    """
    cross = other_hashes is not None
    hb, tb = (other_hashes, other_thumbs) if cross else (hashes, thumbs)
    za, oka = _unit(thumbs)
    zb, okb = _unit(tb)
    n, m = len(hashes), len(hb)
    best: dict[tuple[int, int], tuple[int, float]] = {}
    combos = [(a, b) for a in range(len(CROPS)) for b in range(len(CROPS)) if a == 0 or b == 0]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0 in range(0 if cross else i0, m, block):
            j1 = min(m, j0 + block)
            for a, b in combos:
                bits = np.bitwise_count(hashes[i0:i1, a][:, None] ^ hb[j0:j1, b][None, :])
                ii, jj = np.nonzero(bits <= max_bits)
                ii, jj = ii + i0, jj + j0
                keep = oka[ii] & okb[jj] & ((ii < jj) if not cross else True)
                for i, j in zip(ii[keep], jj[keep]):
                    corr = float(za[i, a] @ zb[j, b])
                    if corr >= min_corr:
                        d = int(bits[i - i0, j - j0])
                        prev = best.get((int(i), int(j)))
                        if prev is None or corr > prev[1]:
                            best[(int(i), int(j))] = (d, corr)
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


def describe(pairs, paths, patients, limit: int = 10) -> list[str]:
    """One line per pair: the two files, their patients, and how close they are."""
    from pathlib import Path

    out = []
    for i, j, d, c in pairs[:limit]:
        out.append(f"  {Path(paths[i]).name} ({patients[i]}) ~ {Path(paths[j]).name} ({patients[j]}): "
                   f"{d} bits, correlation {c:.3f}")
    if len(pairs) > limit:
        out.append(f"  ... and {len(pairs) - limit} more (all listed in the cache's near_duplicates)")
    return out
