"""Does bfloat16 extraction change the reproduction set's results?  Table 2 (with its intervals)
and the test labels of a float32 cache against a bfloat16 one, beside what a second float32 head
seed already changes.

    python benchmarks/bench_precision.py [--backbones all] [--augment 0] [--epochs 100]

For each backbone, through the CLI as a user runs it: `covfeat extract --precision float32` and
`--precision bfloat16` on the reproduction set (../shared/data/covid-cxr cohen + kermany/NORMAL,
`--weights none`: NOT PRETRAINED), and `covfeat fit-head --seed S` on each cache for S = 0 .. --seeds - 1
(5 by default).  The split is the same in all of them (its seed is not the head's).  Reported:

- the feature maps' fidelity over every image's view 0: the minimum per-image cosine to float32's,
  the largest difference relative to float32's largest value;
- the share of test labels that flip from float32 to bfloat16 (same head seed), against the share
  that flips between two float32 head seeds (the noise a user already accepts): for seed 0 against
  seeds 0 and 1, and over every seed (one float32 seed pair is one draw of that noise: with the
  paper's jitter, inception_resnet_v2's seeds 0 and 1 flipped no label, so one bfloat16 flip read as
  a miss);
- the largest |difference in p_covid| of each pair;
- Table 2's rows (precision, recall, F1 per class, accuracy, ROC AUC) with their 95% intervals for
  float32 and bfloat16: whether any value leaves the other's interval.

Writes benchmarks/results/precision.json and .md (precision_augment<N>.* with --augment N > 0).  Speed is not measured here (bench_extract.py);
this can run beside other work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import SHARED, cpu, table, write_results  # noqa: E402

BACKBONES = ("inception_v3", "inception_resnet_v2", "densenet201", "resnet101_v2")
METRICS = ("covid_precision", "covid_recall", "covid_f1", "normal_precision", "normal_recall", "normal_f1",
           "accuracy", "roc_auc")


def cli(*args: str) -> str:
    env = {**os.environ, "COVFEAT_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"covfeat {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {folder}, found {[str(f) for f in found]}")
    return found[0]


def predictions(run: Path) -> dict:
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    return {r["path"]: (float(r["p_covid"]), int(r["pred"])) for r in rows}


def compare(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys(), "the two runs tested different images"
    keys = sorted(a)
    pa, la = np.array([a[k][0] for k in keys]), np.array([a[k][1] for k in keys])
    pb, lb = np.array([b[k][0] for k in keys]), np.array([b[k][1] for k in keys])
    return {"test_images": len(keys), "flipped": int((la != lb).sum()), "flipped_share": float((la != lb).mean()),
            "max_abs_dp": float(np.abs(pa - pb).max())}


def fidelity(f32: Path, bf16: Path) -> dict:
    from covfeat.store.reader import open_cache

    a, b = open_cache(f32), open_cache(bf16)
    assert list(a.manifest["sha256"]) == list(b.manifest["sha256"]), "the two caches hold different images"
    rows = np.flatnonzero(a.has_features() & b.has_features())
    cos, rel = [], 0.0
    for s in range(0, len(rows), 64):
        x = a.read_features(a.originals(rows[s:s + 64])).reshape(len(rows[s:s + 64]), -1)
        y = b.read_features(b.originals(rows[s:s + 64])).reshape(len(x), -1)
        cos += list((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
        rel = max(rel, float((np.abs(x - y).max(1) / np.abs(x).max(1)).max()))
    return {"images": len(rows), "min_cosine": float(min(cos)), "max_rel_diff": rel}


def table2(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())["argmax"]
    out = {}
    for k in METRICS:
        iv = m.get("intervals", {}).get(k, {})
        out[k] = {"value": m.get(k), "lo": iv.get("lo"), "hi": iv.get("hi")}
    return out


def outside(a: dict, b: dict) -> list[str]:
    """Metrics whose value in one run lies outside the other's interval."""
    bad = []
    for k in METRICS:
        x, y = a[k], b[k]
        if None in (x["value"], y["value"], x["lo"], y["lo"]) or np.isnan([x["value"], y["value"]]).any():
            continue
        tol = 1e-9  # an interval's end at 1.0 may come out as 1 - 1e-16
        if not (y["lo"] - tol <= x["value"] <= y["hi"] + tol and x["lo"] - tol <= y["value"] <= x["hi"] + tol):
            bad.append(k)
    return bad


def one(backbone: str, work: Path, args) -> dict:
    data = ["--data", str(SHARED / "cohen"), "--data", str(SHARED / "kermany" / "NORMAL")]
    caches, runs = {}, {}
    for precision in ("float32", "bfloat16"):
        cdir = work / "cache" / precision
        t = time.perf_counter()
        out = cli("extract", "-b", backbone, "--weights", "none", *data, "--augment", str(args.augment),
                  "--precision", precision, "--cache-dir", str(cdir))
        print(f"{backbone} {precision}: extracted in {time.perf_counter() - t:.0f} s", flush=True)
        caches[precision] = Path(out.strip().splitlines()[-1])  # the command's last line: its cache (another
        # route's cache may share the folder)
    for precision, seed in [(pr, sd) for sd in range(args.seeds) for pr in ("float32", "bfloat16")]:
        # the cache's name (its key) in the folder's: a head of another cache (another route) is not reused
        rdir = work / "runs" / f"{backbone}-{precision}-{seed}-{caches[precision].stem}"
        if list(rdir.glob(f"{backbone}-*/metrics.json")):  # run again on the same folder: finished heads are kept
            runs[(precision, seed)] = only(rdir, f"{backbone}-*")
            continue
        cli("fit-head", "--cache", str(caches[precision]), "--runs-dir", str(rdir), "--seed", str(seed),
            "--epochs", str(args.epochs))
        runs[(precision, seed)] = only(rdir, f"{backbone}-*")
    p = {k: predictions(v) for k, v in runs.items()}
    t = {k: table2(runs[k]) for k in (("float32", 0), ("bfloat16", 0))}
    from covfeat.store.reader import open_cache

    return {"backbone": backbone, "route": open_cache(caches["bfloat16"]).config.get("precision_route"),
            "fidelity": fidelity(caches["float32"], caches["bfloat16"]),
            "bf16_vs_f32": compare(p[("float32", 0)], p[("bfloat16", 0)]),
            "f32_seed1_vs_seed0": compare(p[("float32", 0)], p[("float32", 1)]),
            # every seed: bfloat16 against float32 with the same head seed, and float32's seed pairs
            "bf16_vs_f32_by_seed": [compare(p[("float32", sd)], p[("bfloat16", sd)])["flipped"]
                                    for sd in range(args.seeds)],
            "f32_seed_pairs": [compare(p[("float32", a)], p[("float32", b)])["flipped"]
                               for a in range(args.seeds) for b in range(a + 1, args.seeds)],
            "table2": {"float32": t[("float32", 0)], "bfloat16": t[("bfloat16", 0)]},
            "outside_the_others_interval": outside(t[("float32", 0)], t[("bfloat16", 0)])}


def fmt(c: dict) -> str:
    if c["value"] is None or np.isnan(c["value"]):
        return "n/a"
    return f"{c['value']:.3f} [{c['lo']:.2f}, {c['hi']:.2f}]" if c["lo"] is not None else f"{c['value']:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="all")
    ap.add_argument("--augment", type=int, default=0, help="jittered views per image (the paper: 4)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--work", default=None, help="folder for caches and runs (default: a temporary one, kept)")
    ap.add_argument("--seeds", type=int, default=5,
                    help="head seeds trained on each cache (at least 2): one pair of float32 seeds is one draw of the noise")
    args = ap.parse_args()
    if args.seeds < 2:
        raise SystemExit("--seeds: at least 2 (the float32 seed pair is the yardstick)")
    from covfeat.extraction.precision import bf16_kind

    if bf16_kind() is None:
        raise SystemExit("this CPU has no native bfloat16: nothing to compare")
    names = BACKBONES if args.backbones == "all" else tuple(args.backbones.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-precision-"))
    results = [one(b, work, args) for b in names]
    c = cpu()
    out = {"machine": {"cpu": c, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "bf16": bf16_kind()},
           "augment": args.augment, "epochs": args.epochs, "weights": "none (random init, NOT PRETRAINED)",
           "results": results}
    rows = [[r["backbone"], r.get("route") or "not recorded", r["fidelity"]["images"], f"{r['fidelity']['min_cosine']:.6f}",
             f"{100 * r['fidelity']['max_rel_diff']:.2f}%", r["bf16_vs_f32"]["test_images"],
             f"{r['bf16_vs_f32']['flipped']} ({100 * r['bf16_vs_f32']['flipped_share']:.1f}%)",
             f"{r['bf16_vs_f32']['max_abs_dp']:.3f}",
             f"{r['f32_seed1_vs_seed0']['flipped']} ({100 * r['f32_seed1_vs_seed0']['flipped_share']:.1f}%)",
             f"{r['f32_seed1_vs_seed0']['max_abs_dp']:.3f}", ", ".join(r["outside_the_others_interval"]) or "none"]
            for r in results]
    srows = [[r["backbone"], ", ".join(map(str, r["bf16_vs_f32_by_seed"])), f"{np.median(r['bf16_vs_f32_by_seed']):g}",
              ", ".join(map(str, r["f32_seed_pairs"])), f"{np.median(r['f32_seed_pairs']):g}",
              f"{max(r['f32_seed_pairs'])}",
              "yes" if np.median(r["bf16_vs_f32_by_seed"]) <= np.median(r["f32_seed_pairs"]) else "**no**"]
             for r in results]
    t2 = [[r["backbone"], k, fmt(r["table2"]["float32"][k]), fmt(r["table2"]["bfloat16"][k])]
          for r in results for k in METRICS]
    md = "\n".join([
        "# bfloat16 extraction on the reproduction set", "",
        f"Machine: {c['model']}, {os.cpu_count()} CPUs, vector extensions {' '.join(c['vector_extensions'])}; "
        f"native bfloat16: {bf16_kind()}; {out['machine']['date']}.", "",
        f"Reproduction set (cohen + kermany/NORMAL), `--weights none` (random init, NOT PRETRAINED: the values "
        f"below say nothing about ImageNet transfer, only whether bfloat16 moves them), `--augment {args.augment}`, "
        f"{args.epochs} epochs, the default split. Each backbone: a float32 and a bfloat16 cache, the head "
        f"trained with seeds 0-{args.seeds - 1} on each; the first table compares seed 0 (and float32's seed 1).", "",
        table(["backbone", "bfloat16 route (its cache's record)", "images", "min cosine (view 0)", "largest difference / largest value", "test images",
               "labels flipped, bfloat16 vs float32", "largest |Δp_covid|", "labels flipped, float32 seed 1 vs 0",
               "largest |Δp_covid|", "Table 2 values outside the other's interval"], rows), "",
        f"One float32 seed pair is one draw of the noise a user already accepts. Over head seeds 0-{args.seeds - 1}: "
        "the labels that flip from float32 to bfloat16 with the same head seed, one count per seed, against the "
        f"labels that flip between two float32 seeds, one count per pair ({args.seeds * (args.seeds - 1) // 2} "
        "pairs). Within the noise when the median of the first is at most the median of the second.", "",
        table(["backbone", "flipped, bfloat16 vs float32, per seed", "median", "flipped, float32 seed pairs",
               "median", "largest", "bfloat16 within the seeds' median"], srows), "",
        "Table 2 (argmax; 95% patient-level intervals), float32 and bfloat16 caches, head seed 0:", "",
        table(["backbone", "metric", "float32", "bfloat16"], t2), "",
        f"Command: `python benchmarks/bench_precision.py --augment {args.augment} --epochs {args.epochs} --seeds {args.seeds}"
        + (f" --backbones {args.backbones}" if args.backbones != "all" else "") + "`", ""])
    # the paper's jitter (--augment 4) is its own result: it does not replace the run without jitter
    write_results("precision" if args.augment == 0 else f"precision_augment{args.augment}", out, md)


if __name__ == "__main__":
    main()
