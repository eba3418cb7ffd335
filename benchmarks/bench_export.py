"""Size, speed and fidelity of `covfeat export` per format, against `covfeat predict`'s own Predictor.

A small run is made first (untimed): `covfeat extract --weights none` (a real backbone, random
weights: NOT PRETRAINED, so its probabilities say nothing about radiographs, only about the
export) on the bundled sample, then `covfeat fit-head`.  Then `covfeat export --run RUN --format
F --out P` for F in keras, savedmodel, onnx (a format whose export fails is skipped, with its
reason), and per format:

- the file's size (a SavedModel: its whole folder);
- latency of one image (median of --runs calls) and throughput on a batch of 32 (img/s, median
  of --runs calls), on the run's pipeline pixels, beside `Predictor(run).p_covid` on the same;
- fidelity on the `pixels` input: the largest |Δp_covid_raw| from Predictor on the same pixels;
- for the SavedModel's `image_bytes` signature, on --fidelity-images radiographs of the shared
  data (cohen, kermany, openist: 16-bit and RGBA PNGs, JPEGs decoded at reduced scale) or the
  bundled sample: the largest |pixel difference| of its decoding from covfeat's, the largest
  |Δp_covid_raw| and the share of labels flipped from `covfeat predict`'s.

    python benchmarks/bench_export.py [--backbone inception_v3] [--runs 10] [--fidelity-images 100]
                                      [--formats keras,savedmodel,onnx] [--work DIR]

Writes benchmarks/results/export.json and .md.  Run it alone: other processes on the machine
inflate latencies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, machine, machine_line, table, write_results  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "covfeat" / "data" / "sample"
SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH = 32
OUT_NAME = {"keras": "model.keras", "savedmodel": "savedmodel", "onnx": "model.onnx"}


def cli(*args: str, env: dict) -> str:
    """The last stdout line of a covfeat command (its result's path); SystemExit with its error."""
    r = subprocess.run([sys.executable, "-m", "covfeat.cli", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
    return r.stdout.strip().splitlines()[-1]


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and "masks" not in p.parts)


def fidelity_images(n: int) -> tuple[list[Path], str]:
    """About n radiographs spread over cohen, kermany and openist (every 16-bit PNG and a share of
    the others, every k-th file of each source), or the bundled sample without the shared data."""
    if not SHARED.is_dir():
        return images(SAMPLE), "the bundled sample (no ../shared/data/covid-cxr here)"
    from covfeat.use.serving_decode import file_kind

    sources = [images(SHARED / s) for s in ("cohen", "kermany", "openist")]
    per = max(1, n // len(sources))
    picked = []
    for files in sources:
        kinds = {p: file_kind(p) for p in files}  # every 16-bit PNG first, then RGBA ones
        special = sorted((p for p in files if "16-bit" in kinds[p] or "4ch" in kinds[p]),
                         key=lambda p: "16-bit" not in kinds[p])[:max(1, per // 3)]
        step = max(1, len(files) // (per - len(special)))
        picked += special + [p for p in files[::step] if p not in special][:per - len(special)]
    return picked, f"{len(picked)} radiographs of ../shared/data/covid-cxr (cohen, kermany, openist)"


def timed(fn, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loaders(fmt: str, path: Path):
    """fmt -> (pixels -> raw p_covid) of the exported file, loaded as a server would."""
    if fmt == "keras":
        from covfeat.use.predict import load_exported

        model = load_exported(path)
        raw = __import__("keras").Model(model.input, model.get_layer("probabilities_raw").output)
        return lambda x: np.asarray(raw.predict_on_batch(x))[:, 1]
    if fmt == "savedmodel":
        import tensorflow as tf

        sig = tf.saved_model.load(str(path)).signatures["pixels"]
        return lambda x: sig(pixels=tf.constant(x))["p_covid_raw"].numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["p_covid_raw"], {"pixels": x.astype(np.float32)})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="inception_v3")
    ap.add_argument("--weights", default="none", help="none (random: NOT PRETRAINED) or imagenet when cached")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--fidelity-images", type=int, default=100)
    ap.add_argument("--formats", default="keras,savedmodel,onnx")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="default: a temporary folder, removed after")
    ap.add_argument("--run", default=None, help="export this finished run instead of making one on the bundled sample "
                    "(a head trained on more images spreads p_covid, so the fidelity numbers mean more)")
    args = ap.parse_args()
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.run:
            from covfeat.head.runs import Run

            run, given = args.run, Run(args.run)
            backbone, weights = given.extract_config["backbone"], given.cache_info.get("weights", {}).get("kind", "?")
            run_data = f"the given run {Path(run).name} ({given.metrics.get('n_train_real', '?')} training images)"
        else:
            print(f"making a run on the bundled sample ({args.backbone}, --weights {args.weights}; untimed) ...",
                  flush=True)
            cache = cli("extract", "--backbone", args.backbone, "--weights", args.weights, "--cache-dir",
                        str(work / "cache"), env=env)
            run = cli("fit-head", "--cache", cache, "--runs-dir", str(work / "runs"), "--epochs", str(args.epochs),
                      env=env)
            backbone, weights, run_data = args.backbone, args.weights, "the bundled sample"
        data = {"machine": machine(), "load_average": os.getloadavg(), "backbone": backbone, "weights": weights,
                "not_pretrained": weights == "none", "run_data": run_data, "runs": args.runs, "batch": BATCH}
        exported, skipped = {}, {}
        for fmt in args.formats.split(","):
            out = work / "export" / fmt / OUT_NAME[fmt]  # one model per folder: its card and serving.json beside it
            t = time.perf_counter()
            try:
                cli("export", "--run", run, "--format", fmt, "--out", str(out), env=env)
            except RuntimeError as exc:
                skipped[fmt] = str(exc)
                print(f"{fmt}: export failed, skipped: {exc}", flush=True)
                continue
            exported[fmt] = {"path": out, "size_mb": size_mb(out), "export_s": time.perf_counter() - t}

        from covfeat.use.predict import Predictor
        from covfeat.use.serving_decode import by_kind, pixel_gap

        pr = Predictor(run)
        sample = images(SAMPLE)
        pixels = np.stack([pr.pipeline.decode(p) for p in sample] * (BATCH // len(sample) + 1))[:BATCH]
        scaled = pr.pipeline.scale(pixels.copy())
        want = pr.p_covid(scaled, batch_size=BATCH)
        rows = {"covfeat predict (Predictor)": {
            "size_mb": None, "latency_ms": 1e3 * timed(lambda: pr.p_covid(pr.pipeline.scale(pixels[:1].copy())),
                                                       args.runs),
            "img_s": BATCH / timed(lambda: pr.p_covid(pr.pipeline.scale(pixels.copy()), batch_size=BATCH), args.runs),
            "max_dp_pixels": 0.0}}
        for fmt, e in exported.items():
            f = loaders(fmt, e["path"])
            got = f(pixels)
            rows[fmt] = {"size_mb": e["size_mb"], "export_s": e["export_s"],
                         "latency_ms": 1e3 * timed(lambda: f(pixels[:1]), args.runs),
                         "img_s": BATCH / timed(lambda: f(pixels), args.runs),
                         "max_dp_pixels": float(np.abs(got - want).max())}
            print(f"{fmt}: {rows[fmt]}", flush=True)
        data.update(formats=rows, skipped=skipped)

        if "savedmodel" in exported:
            import tensorflow as tf

            paths, what = fidelity_images(args.fidelity_images)
            sig = tf.saved_model.load(str(exported["savedmodel"]["path"])).signatures["image_bytes"]
            served, ref = [], []
            for s in range(0, len(paths), BATCH):
                chunk = paths[s:s + BATCH]
                served.append(sig(image_bytes=tf.constant([p.read_bytes() for p in chunk]))["p_covid_raw"].numpy())
                ref.append(pr.p_covid(np.stack([pr.pipeline(p) for p in chunk]), batch_size=BATCH))
            served, ref = np.concatenate(served), np.concatenate(ref)
            flips = (served >= pr.threshold) != (ref >= pr.threshold)
            one = [sample[0].read_bytes()]
            batch_bytes = tf.constant([p.read_bytes() for p in (sample * (BATCH // len(sample) + 1))[:BATCH]])
            data["image_bytes"] = {
                "images": len(paths), "data": what, "threshold": float(pr.threshold),
                "max_dp": float(np.abs(served - ref).max()), "mean_dp": float(np.abs(served - ref).mean()),
                "flipped_share": float(flips.mean()), "flipped": int(flips.sum()),
                "p_range": [float(ref.min()), float(ref.max())],
                "pixels_by_kind": by_kind(pixel_gap(paths, pr.pipeline)),
                "latency_ms": 1e3 * timed(lambda: sig(image_bytes=tf.constant(one)), args.runs),
                "img_s": BATCH / timed(lambda: sig(image_bytes=batch_bytes), args.runs)}
            print(f"image_bytes: {data['image_bytes']}", flush=True)
    write_results("export", data, render(data))


def render(data: dict) -> str:
    md = ["# covfeat export: size, speed and fidelity per format", "", machine_line(data["machine"]),
          f"Load average {data['load_average'][0]:.2f} at the end.", "",
          f"A run of {data['backbone']} with --weights {data['weights']}"
          + (" (random weights: NOT PRETRAINED; the probabilities say nothing about radiographs, only whether the "
             "export computes what covfeat predict does)" if data["not_pretrained"] else "") + ", head fitted on "
          f"{data['run_data']}. Latency: one image, median of {data['runs']} calls after a warm-up; throughput: a "
          f"batch of {data['batch']}, median of {data['runs']} calls. |Δp|: p_covid before the prevalence correction, "
          "against Predictor(run).p_covid on the same pipeline pixels.", "",
          table(["model", "size (MB)", "latency, 1 image (ms)", f"throughput, batch {data['batch']} (img/s)",
                 "largest Δp on pixels (abs)"],
                [[name, "" if r["size_mb"] is None else f"{r['size_mb']:.1f}", f"{r['latency_ms']:.0f}",
                  f"{r['img_s']:.1f}", f"{r['max_dp_pixels']:.2g}"] for name, r in data["formats"].items()])]
    for fmt, why in data["skipped"].items():
        md += ["", f"{fmt}: not exported ({why})."]
    b = data.get("image_bytes")
    if b:
        md += ["", f"## SavedModel `image_bytes` against covfeat predict ({b['data']})", "",
               f"Largest |Δp_covid| {b['max_dp']:.2g} (mean {b['mean_dp']:.2g}); labels flipped at the run's threshold "
               f"{b['threshold']:.3g}: {b['flipped']} of {b['images']} ({100 * b['flipped_share']:.1f} %); the "
               f"reference p_covid ranged over [{b['p_range'][0]:.3g}, {b['p_range'][1]:.3g}]. Latency of one image "
               f"with decoding {b['latency_ms']:.0f} ms; a batch of {data['batch']} {b['img_s']:.1f} img/s."
               + (" The reference p_covid hardly varies here, so this |Δp| and flip share do not bound a trained "
                  "run's: the pixel differences below are the measure that carries over."
                  if b["p_range"][1] - b["p_range"][0] < 0.05 else ""), "",
               "Largest pixel difference of the in-graph decoding from covfeat's, per kind of file (grey levels):", "",
               table(["kind", "files", "largest", "mean"],
                     [[k, v["files"], f"{v['max']:.3g}", f"{v['mean']:.2g}"] for k, v in b["pixels_by_kind"].items()])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
