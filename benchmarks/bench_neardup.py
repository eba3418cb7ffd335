"""Near-duplicates that survive re-publication: recall per kind of copy, false pairs, search time.

Variants of real radiographs of the reproduction set (cohen + kermany/NORMAL + openist/NORMAL)
are made on the ORIGINAL file's pixels -- CLAHE, gamma, windowing, a one-sided crop of up to
10%, padding, a horizontal flip, a rotation of up to 5 degrees -- saved as JPEG (quality 90),
and decoded by covfeat's own pipeline like any input.  Each variant is searched against the
whole set: found when it is paired with its original.  All pairs of different radiographs of
the set are searched for false pairs; the known true pairs (Cohen's patients 97 and 178,
patient 51's image under two dates, openist's re-crops) are listed apart.  The closest pair of
different radiographs is reported with its score, twice: among the pairs the hashes let
through at a wider radius (aligned score), and over all pairs without alignment.  Finally
100,000 (and 10,000) synthetic fingerprints are searched, timed, with the codes compared.

    python benchmarks/bench_neardup.py [--per-type 60] [--seed 0]

Writes benchmarks/results/neardup.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from common import SHARED, cpu, table, write_results  # noqa: E402

from covfeat.extraction.config import ExtractConfig  # noqa: E402
from covfeat.extraction.images import InputPipeline  # noqa: E402
from covfeat.extraction.sources import load_sources  # noqa: E402
from covfeat.imaging.decode import decode  # noqa: E402
from covfeat.trust import neardup as nd  # noqa: E402

KINDS = ("clahe", "gamma", "window", "crop", "pad", "flip", "rotate")

KNOWN = (  # file-name pairs that are the same radiograph
    *((f"covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-{day}.jpg", f"16660_{k}_1.jpg")
      for k, day in enumerate(("admission", "day-1", "day-2", "day-3"), start=2)),
    ("F4341CE7-73C9-45C6-99C8-8567A5484B63.jpeg", "E63574A7-4188-4C8D-8D17-9D67A18A1AFA.jpeg"),  # patient 51
    ("286-295-500-500-100.jpg", "402-411-500-500-100.jpg"),  # openist re-crops (the third is byte-identical)
    ("277-286-500-500-100.jpg", "403-412-500-500-100.jpg"),
)


def variant(kind: str, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One re-published copy of a uint8 grey radiograph at its own size, and what was done."""
    h, w = img.shape
    if kind == "clahe":
        clip = float(rng.uniform(2, 4))
        return cv2.createCLAHE(clip, (8, 8)).apply(img), f"clip {clip:.1f}"
    if kind == "gamma":
        g = float(rng.choice([rng.uniform(0.5, 0.8), rng.uniform(1.3, 2.0)]))
        return np.clip(255 * (img / 255.0) ** g, 0, 255).astype(np.uint8), f"gamma {g:.2f}"
    if kind == "window":
        lo, hi = np.percentile(img, [rng.uniform(0.5, 10), rng.uniform(90, 99.5)])
        return np.clip((img - lo) * 255.0 / max(hi - lo, 1), 0, 255).astype(np.uint8), f"window {lo:.0f}-{hi:.0f}"
    if kind == "crop":
        a, side = float(rng.uniform(0.03, 0.10)), int(rng.integers(4))
        dy, dx = int(a * h), int(a * w)
        return [img[:, dx:], img[:, :w - dx], img[dy:], img[:h - dy]][side], f"{a:.0%} off side {side}"
    if kind == "pad":
        c = int(rng.choice([0, 255]))
        if rng.random() < 0.5:
            py, px = int(0.05 * h), int(0.05 * w)
            return cv2.copyMakeBorder(img, py, py, px, px, cv2.BORDER_CONSTANT, value=c), f"5% all sides, {c}"
        a, side = float(rng.uniform(0.03, 0.10)), int(rng.integers(4))
        t = [0, 0, 0, 0]
        t[side] = int(a * (h if side < 2 else w))
        return cv2.copyMakeBorder(img, *t, cv2.BORDER_CONSTANT, value=c), f"{a:.0%} on side {side}, {c}"
    if kind == "flip":
        return np.ascontiguousarray(img[:, ::-1]), "horizontal"
    if kind == "rotate":
        ang = float(rng.uniform(1, 5) * rng.choice([-1, 1]))
        m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, 1.0)
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0), f"{ang:+.1f} degrees"
    raise ValueError(kind)


def fingerprints(images) -> tuple[np.ndarray, np.ndarray]:
    fps = [nd.fingerprint(g) for g in images]
    return np.stack([f[0] for f in fps]), np.stack([f[1] for f in fps])


def synthetic(h: np.ndarray, t: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n fingerprints made from the real ones: each a real image's codes with the same 12
    random bits flipped in every view (so its views keep their real relations and the codes
    keep much of the real clustering), and that image's thumbnail shifted by a few pixels."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(h), n)
    masks = np.zeros(n, np.uint64)
    for _ in range(12):
        masks |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    hs = h[src] ^ masks[:, None]
    ts = np.stack([np.roll(t[s], tuple(rng.integers(-3, 4, 2)), axis=(0, 1)) for s in src])
    return hs, ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-type", type=int, default=60, help="radiographs varied per kind of copy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    m = load_sources([SHARED / "cohen", SHARED / "kermany" / "NORMAL", SHARED / "openist" / "NORMAL"])
    recs = m.records
    names = [Path(r.path).name for r in recs]
    pipe = InputPipeline.for_config(ExtractConfig(backbone="inception_v3"))
    decoded = [pipe.decode(r.path, occluded=False) for r in recs]
    t0 = time.perf_counter()
    H, T = fingerprints(decoded)
    t_fp = (time.perf_counter() - t0) / len(recs)
    del decoded

    known = {tuple(sorted((names.index(a), names.index(b)))) for a, b in KNOWN}
    pairs = nd.find_pairs(H, T)
    found = {(i, j): (d, c) for i, j, d, c in pairs}
    false = [(names[i], names[j], d, round(c, 4)) for (i, j), (d, c) in found.items() if (i, j) not in known]
    known_rows = [(names[i], names[j], *((found[(i, j)][0], round(found[(i, j)][1], 4)) if (i, j) in found
                                         else ("-", "not found"))) for i, j in sorted(known)]

    # the closest different radiographs: aligned among the hash candidates at a wider radius ...
    wide, _ = nd.candidates(H, T, max_bits=12)
    scores: dict[tuple[int, int], float] = {}
    for i, j, side, view, _bits in wide:
        if (i, j) in known:
            continue
        q, t = (T[i], T[j]) if side == 0 else (T[j], T[i])
        scores[(i, j)] = max(scores.get((i, j), -1.0), nd.aligned_corr(q, t, int(view)))
    (ci, cj), closest = max(scores.items(), key=lambda kv: kv[1])
    # ... and over all pairs, unaligned
    z = np.stack([nd.lcn(x.astype(np.float32)).ravel() for x in T])
    z -= z.mean(1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cc = z @ z.T
    for i, j in known:
        cc[i, j] = cc[j, i] = -1
    np.fill_diagonal(cc, -1)
    ui, uj = np.unravel_index(np.argmax(cc), cc.shape)

    # recall per kind of copy
    picks = rng.choice(len(recs), args.per_type, replace=False)
    recall, lowest, missed = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            imgs, what = [], []
            for k in picks:
                g = np.clip(np.rint(decode(recs[k].path).mean(axis=2)), 0, 255).astype(np.uint8)
                v, desc = variant(kind, g, rng)
                p = Path(tmp) / f"{kind}-{k}.jpg"
                cv2.imwrite(str(p), v, [cv2.IMWRITE_JPEG_QUALITY, 90])
                imgs.append(pipe.decode(p, occluded=False))
                what.append(desc)
            hv, tv = fingerprints(imgs)
            got = {(i, j): c for i, j, _d, c in nd.find_pairs(hv, tv, H, T)}
            hit = [(k, picks[k]) in got for k in range(len(picks))]
            recall[kind] = float(np.mean(hit))
            lowest[kind] = min((got[(k, picks[k])] for k in range(len(picks)) if hit[k]), default=float("nan"))
            missed[kind] = [f"{names[picks[k]]} ({what[k]})" for k in range(len(picks)) if not hit[k]]
            print(f"{kind}: recall {recall[kind]:.3f}, lowest score {lowest[kind]:.3f}", flush=True)

    # search time on synthetic fingerprints
    timing = []
    for n in (10_000, 100_000):
        hs, ts = synthetic(H, T, n, args.seed)
        t1 = time.perf_counter()
        cands, compared = nd.candidates(hs, ts)
        t_cand = time.perf_counter() - t1
        t1 = time.perf_counter()
        got = nd.find_pairs(hs, ts)
        t_all = time.perf_counter() - t1
        timing.append({"n": n, "seconds": round(t_all, 2), "candidate_seconds": round(t_cand, 2),
                       "codes_compared": int(compared), "all_pairs_codes": n * (n - 1) * nd.FINGERPRINT_HASHES,
                       "candidates": len(cands), "pairs": len(got)})
        print(timing[-1], flush=True)

    true_scores = [c for kind in KINDS for c in [lowest[kind]] if c == c] + [
        found[p][1] for p in known if p in found]
    data = {
        "machine": {"cpu": cpu(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "settings": {"views": [list(v) for v in nd.VIEWS], "max_bits": nd.MAX_BITS, "min_corr": nd.MIN_CORR,
                     "lcn_sigma": nd.LCN_SIGMA, "max_warp": nd.MAX_WARP, "per_type": args.per_type,
                     "seed": args.seed, "fingerprint_ms": round(t_fp * 1e3, 2)},
        "images": len(recs), "recall": recall, "lowest_true_score": lowest, "missed": missed,
        "false_pairs": false, "known_pairs": known_rows,
        "closest_different_aligned": [names[ci], names[cj], round(closest, 4)],
        "closest_different_unaligned": [names[ui], names[uj], round(float(cc[ui, uj]), 4)],
        "margin": {"lowest_true": round(min(true_scores), 4), "highest_different": round(closest, 4)},
        "search": timing,
    }
    c = data["machine"]["cpu"]
    md = ["# Near-duplicates that survive re-publication\n",
          f"Machine: {c['model']}, {data['machine']['cpus']} CPUs, vector extensions "
          f"{' '.join(c['vector_extensions'])}; {data['machine']['date']}.\n",
          f"{len(recs)} images (cohen + kermany/NORMAL + openist/NORMAL); {args.per_type} radiographs varied per "
          f"kind of copy, each copy searched against all {len(recs)}. Thresholds: hashes within {nd.MAX_BITS} bits, "
          f"aligned correlation >= {nd.MIN_CORR}. Fingerprint {t_fp * 1e3:.1f} ms per image.\n",
          table(["copy", "recall", "lowest score found", "missed"],
                [[k, f"{recall[k]:.3f}", f"{lowest[k]:.3f}", "; ".join(missed[k]) or "-"] for k in KINDS]),
          f"\nFalse pairs among all {len(recs) * (len(recs) - 1) // 2:,} pairs of the set: {len(false)}"
          + ("".join(f"\n- {a} ~ {b}: {d} bits, {c:.3f}" for a, b, d, c in false)) + "\n",
          "Known true pairs:\n",
          table(["image", "image", "bits", "score"], [list(r) for r in known_rows]),
          f"\nClosest pair of different radiographs (aligned, among hash candidates within 12 bits): "
          f"{names[ci]} ~ {names[cj]}, {closest:.3f}. Over all pairs, unaligned: {names[ui]} ~ {names[uj]}, "
          f"{cc[ui, uj]:.3f}. Lowest true-pair score {min(true_scores):.3f} against the threshold {nd.MIN_CORR}: "
          f"margins {min(true_scores) - nd.MIN_CORR:.3f} above and {nd.MIN_CORR - closest:.3f} below.\n",
          "Search of synthetic fingerprints (real codes with 12 bits flipped, real thumbnails shifted):\n",
          table(["images", "seconds", "hash search alone (a second run)", "codes compared", "all-pairs codes", "candidates",
                 "pairs"], [[f"{r['n']:,}", r["seconds"], r["candidate_seconds"], f"{r['codes_compared']:,}",
                             f"{r['all_pairs_codes']:,}", r["candidates"], r["pairs"]] for r in timing])]
    write_results("neardup", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
