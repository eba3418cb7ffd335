"""Extraction speed: image files on disk to a complete HDF5 cache, against the backbone's
forward-only throughput on ready tensors, for each of the paper's four backbones, measured
side by side in one process.

    python benchmarks/bench_extract.py [--images 24] [--augment 4] [--backbones all] [--no-bfloat16]

Uses ``../shared/data/covid-cxr`` (half COVID-19, half NORMAL), random-init weights
(``--weights none``: NOT PRETRAINED; speed does not depend on the weights).  Writes
``benchmarks/results/extract.json`` and ``.md``.

Where the CPU has native bfloat16, each backbone's forward pass is also measured by every
bfloat16 route (covfeat.extraction.precision), each in a process of its own (oneDNN reads its
mode once per process), on the same real images as float32: img/s, the ratio to float32, and
the fidelity of the feature maps (the minimum per-image cosine to float32's, the largest
difference relative to float32's largest value, before and after average pooling).  The route
covfeat uses for the backbone (precision.ROUTES) is marked; it should be the fastest one.
Random-init BatchNormalizations are identities, so this fidelity does not see how a route
normalises (tests/test_precision.py checks the fused route's normalisation with real statistics).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import SHARED, machine, machine_line, model_flops, peak_rss_mb, table, write_results  # noqa: E402,E501


def subset(root: Path, n: int) -> list[Path]:
    """n/2 Cohen COVID-19 PA images (their metadata kept) and n/2 Kermany NORMAL images."""
    import csv

    out = root / "cohen"
    (out / "images").mkdir(parents=True)
    rows = [r for r in csv.DictReader(open(SHARED / "cohen" / "metadata.csv"))
            if r["view"] == "PA" and "COVID-19" in r["finding"] and (SHARED / "cohen" / "images" / r["filename"]).exists()]
    rows = rows[: n // 2]
    for r in rows:
        shutil.copy(SHARED / "cohen" / "images" / r["filename"], out / "images" / r["filename"])
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    normal = root / "NORMAL"
    normal.mkdir()
    for p in sorted((SHARED / "kermany" / "NORMAL").iterdir())[: n - n // 2]:
        shutil.copy(p, normal / p.name)
    return [out, normal]


def forward_only(model, n: int, bs: int = 16, streams: int = 1) -> float:
    """images/s of the forward pass alone on ready float32 tensors, batch 16 as extraction,
    ``streams`` batches at once (extraction runs STREAMS; 1 = a plain Keras loop)."""
    import tensorflow as tf

    fwd = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    xs = [np.random.default_rng(i).random((bs, 224, 224, 3), dtype=np.float32) for i in range(streams)]
    fwd(xs[0]).numpy()  # trace
    batches = max(streams, n // bs)
    with ThreadPoolExecutor(max_workers=streams) as pool:
        t = time.perf_counter()
        list(pool.map(lambda i: fwd(xs[i % streams]).numpy(), range(batches)))
        return batches * bs / (time.perf_counter() - t)


PASSES = 5  # timed passes over the images per route (the median is reported)


def precision_child(name: str, route: str, images: int, out: str) -> None:
    """In a process of its own: the forward pass of ``name`` computing by ``route`` on the
    first ``images`` images of the bundled sample (original views, the paper's scaling), its img/s on
    batches of 16, two at a time on one thread per operation as the extract command runs them (the
    median of PASSES timed passes), and its feature maps saved to ``out`` (.npz)."""
    from covfeat.extraction.precision import prepare_process

    prepare_process(route)  # before TensorFlow starts
    import tensorflow as tf

    from covfeat.extraction.work import STREAMS, one_thread_per_stream

    one_thread_per_stream(tf)  # as the extract command runs
    from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.images import InputPipeline

    bb = get_backbone(name)
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0, route=route)
    pipe = InputPipeline.for_config(ExtractConfig(backbone=name, weights="none"), bb)
    from covfeat.extraction.plan import SAMPLE_DIR

    both = [sorted((SAMPLE_DIR / d).iterdir()) for d in ("cohen/images", "kermany/NORMAL")]
    files = [p for pair in zip(*both) for p in pair][:images]  # alternating COVID-19 and NORMAL
    x = np.stack([pipe(p) for p in files])
    fwd = tf.function(lambda b: model(b, training=False))
    maps = np.concatenate([fwd(x[i:i + 16]).numpy() for i in range(0, len(x), 16)])  # also the trace
    speeds = []
    with ThreadPoolExecutor(max_workers=STREAMS) as streams:  # batches STREAMS at a time, as extraction
        for _ in range(PASSES):  # one pass is a second or two: the median of several
            t = time.perf_counter()
            list(streams.map(lambda i: fwd(x[i:i + 16]).numpy(), range(0, len(x), 16)))
            speeds.append(len(x) / (time.perf_counter() - t))
    np.savez(out, maps=maps.astype(np.float32), img_s=float(np.median(speeds)), passes=np.array(speeds))


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """How far ``got``'s feature maps are from ``ref``'s (float32): the minimum cosine per image
    and the largest absolute difference relative to the largest |value|, of the maps and of
    their average pooling (what the head reads)."""
    def one(a, b):
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return float(cos.min()), float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))

    c, r = one(ref, got)
    cp, rp = one(ref.mean(axis=(1, 2)), got.mean(axis=(1, 2)))
    return {"min_cosine": c, "max_rel_diff": r, "pooled_min_cosine": cp, "pooled_max_rel_diff": rp}


def bfloat16_rows(names: list[str], images: int, work: Path) -> list[dict]:
    """float32 and every bfloat16 route per backbone, each in a fresh process (see the docstring)."""
    import subprocess

    from covfeat.extraction.precision import MIXED_ROUTES, ROUTES, bf16_kind

    rows = []
    for name in names:
        got = {}
        for route in ("float32", "onednn", *MIXED_ROUTES):
            out = work / f"{name}-{route}.npz"
            env = {k: v for k, v in os.environ.items() if k != "ONEDNN_DEFAULT_FPMATH_MODE"}
            subprocess.run([sys.executable, __file__, "--precision-child", name, route, str(images), str(out)],
                           check=True, env=env)
            with np.load(out) as z:
                got[route] = (z["maps"], float(z["img_s"]), z["passes"].tolist())
        ref, f32, f32_passes = got["float32"]
        for route in ("onednn", *MIXED_ROUTES):
            maps, speed, passes = got[route]
            rows.append({"backbone": name, "route": route, "chosen": ROUTES[bf16_kind()][name] == route, "images": images,
                         "float32_img_s": f32, "bfloat16_img_s": speed, "ratio": speed / f32, "passes": PASSES, "streams": 2,
                         "float32_img_s_passes": f32_passes, "bfloat16_img_s_passes": passes,
                         **fidelity(ref, maps)})
            print(rows[-1], flush=True)
    return rows


def render_bfloat16(rows: list[dict]) -> list[str]:
    if not rows:
        return ["bfloat16: not measured (no native bfloat16 on this CPU, or --no-bfloat16).", ""]
    return [
        "## bfloat16 beside float32", "",
        ("Forward pass alone, batch 16, two batches at a time on one thread per operation (as the extract command "
         f"runs them), img/s the median of {rows[0]['passes']} timed passes" if rows[0].get("streams") else
         "Forward pass alone, batch 16, one batch at a time, img/s " + (f"the median of {rows[0]['passes']} timed passes"
                                                                       if "passes" in rows[0] else "of one timed pass"))
        + f", on the first {rows[0]['images']} images of the bundled sample (original views), each route in a fresh "
        "process; fidelity against float32's feature maps of the same images. * = the route "
        "covfeat uses for the backbone (covfeat.extraction.precision.ROUTES). Random-init BatchNormalizations are "
        "identities (mean 0, variance 1), so this fidelity does not see how a route normalises; "
        "tests/test_precision.py checks mixed_fused_bn's normalisation against Keras's with real statistics.", "",
        table(["backbone", "route", "float32 img/s", "bfloat16 img/s", "ratio", "min cosine (maps)",
               "max rel. diff (maps)", "min cosine (pooled)", "max rel. diff (pooled)"],
              [[r["backbone"], r["route"] + (" *" if r["chosen"] else ""), f"{r['float32_img_s']:.2f}",
                f"{r['bfloat16_img_s']:.2f}", f"{r['ratio']:.2f}", f"{r['min_cosine']:.6f}",
                f"{100 * r['max_rel_diff']:.2f}%", f"{r['pooled_min_cosine']:.6f}",
                f"{100 * r['pooled_max_rel_diff']:.2f}%"] for r in rows]), ""]


def render(data: dict, images: int, augment: int) -> str:
    results, gflops_peak = data["results"], data["matmul_gflop_s"]
    rows = [[r["backbone"], f"{r['keras_loop_img_s']:.2f}" if "keras_loop_img_s" in r else "not measured",
             f"{r['forward_only_img_s']:.2f}", f"{r['pipeline_img_s']:.2f}", f"{r['ratio']:.3f}",
             f"{r['whole_command_seconds']:.1f} s ({r['whole_command_ratio']:.2f}; backbone ready in {r['build_model_seconds']:.1f} s)",
             (f"{r['first_run_whole_command_seconds']:.1f} s ({r['first_run_whole_command_ratio']:.2f}; "
              f"Keras build {r['first_run_build_model_seconds']:.1f} s)") if "first_run_whole_command_seconds" in r
             else "not measured",
             f"{r['gflop_per_image']:.2f}", f"{r['achieved_gflop_s']:.1f}", f"{r['fraction_of_matmul_peak']:.2f}"]
            for r in results]
    return "\n".join([
        "# Extraction benchmark", "", machine_line(data["machine"]) if "cpu" in data["machine"] else
        "Machine: not recorded (a result from before covfeat named the CPU).", "",
        f"{data['machine']['date']}, {data['machine']['cpus']} CPUs, TensorFlow {data['machine']['tensorflow']}, "
        f"GPUs: {data['machine']['gpus'] or 'none'}. Weights: none (random init, NOT PRETRAINED). "
        f"{images} image files per backbone, --augment {augment}, batch 16.",
        f"Dense float32 matmul on this machine in this run: {gflops_peak:.1f} GFLOP/s"
        + (" (TensorFlow's threads, in a process of its own). Every other measure runs as the extract command does, one "
           "thread per operation (covfeat.extraction.work.one_thread_per_stream), the Keras loop's one batch at a time "
           "included." if data.get("one_thread_per_operation") else "."),
        "Whole command: the `extract` library call from file paths to a verified HDF5 cache (hashing, "
        "getting the backbone ready, decoding, forward passes, shards, assembly), as images/s against "
        "forward-only. The first extraction with a backbone on a machine builds it with Keras and keeps "
        "its traced graph (covfeat.extraction.graphfile); later ones load it.", "",
        table(["backbone", "Keras loop img/s (one batch at a time)", "forward-only img/s (the faster of that and "
               "extraction's 2 batches at once)", "files -> HDF5 img/s", "ratio (target >= 0.9)",
               "whole command (ratio, target >= 0.85; graph from covfeat's graph cache)",
               "first run on a machine (Keras builds and traces the backbone)", "GFLOP/img",
               "achieved GFLOP/s", "fraction of matmul"], rows), "",
        *render_bfloat16(data.get("bfloat16", [])),
        "Command: `python benchmarks/bench_extract.py`", ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96, help="image files per backbone (x (augment+1) forward passes)")
    ap.add_argument("--augment", type=int, default=4)
    ap.add_argument("--backbones", default="all")
    ap.add_argument("--render", action="store_true", help="only re-render the Markdown from results/extract.json")
    ap.add_argument("--no-bfloat16", action="store_true", help="skip the bfloat16 routes")
    ap.add_argument("--bfloat16-images", type=int, default=32, help="images of the bfloat16 comparison")
    ap.add_argument("--only-bfloat16", action="store_true", help="only the bfloat16 comparison (printed, not written)")
    ap.add_argument("--precision-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision_child:
        name, route, n, out = args.precision_child
        precision_child(name, route, int(n), out)
        return
    if args.render:
        import json

        from common import RESULTS

        data = json.loads((RESULTS / "extract.json").read_text())
        r0 = data["results"][0]
        write_results("extract", data, render(data, r0["images"], r0["forward_passes"] // r0["images"] - 1))
        return
    if not SHARED.is_dir() and not args.only_bfloat16:
        sys.exit(f"benchmark data not found: {SHARED}")

    from covfeat.extraction.backbones import build_backbone, get_backbone, list_backbones, resolve_weights
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.precision import BF16_FLAGS, cpu_flags
    from covfeat.extraction.run import extract
    from covfeat.extraction.work import STREAMS

    names = list_backbones() if args.backbones == "all" else args.backbones.split(",")
    work = Path(tempfile.mkdtemp(prefix="covfeat-bench-"))
    bf16 = [] if args.no_bfloat16 or not set(BF16_FLAGS) & cpu_flags() else \
        bfloat16_rows(names, args.bfloat16_images, work)
    if args.only_bfloat16:
        print("\n".join(render_bfloat16(bf16)))
        shutil.rmtree(work, ignore_errors=True)
        return
    import subprocess

    import tensorflow as tf

    import covfeat.extraction.work
    from covfeat.extraction.work import one_thread_per_stream

    # The matmul peak with TensorFlow's threads (every core), in a process of its own; this one
    # runs every measure as the extract command does: one thread per operation.
    gflops_peak = float(subprocess.run([sys.executable, "-c", "from common import matmul_gflops; print(matmul_gflops())"],
                                       cwd=Path(__file__).parent, capture_output=True, text=True, check=True
                                       ).stdout.split()[-1])
    covfeat.extraction.work.OWN_PROCESS = True
    one_thread_per_stream(tf)
    os.environ["COVFEAT_GRAPH_CACHE"] = str(work / "graphs")  # empty: each backbone's first run makes its graph
    sources = subset(work / "data", args.images)
    results = []
    for name in names:
        bb = get_backbone(name)
        model = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
        flops = model_flops(model)
        n_fwd = args.images * (args.augment + 1)
        # forward-only and end-to-end back to back, forward first, then again after, averaged;
        # forward-only both as a plain Keras loop and as extraction runs it (STREAMS batches at
        # once), and every ratio against the faster of the two
        k1, f1 = forward_only(model, n_fwd), forward_only(model, n_fwd, streams=STREAMS)
        cfg = ExtractConfig(backbone=name, weights="none", augment=args.augment)
        import json

        import h5py

        runs = []
        # First run on a machine: covfeat's graph cache (a fresh folder here) has no graph for
        # this backbone, so Keras builds and traces it and the cache keeps it.  Second run, on
        # the same files into another feature cache: the graph comes from the graph cache.
        for run in ("first", "later"):
            cache_dir = work / f"cache-{name}-{run}"
            t = time.perf_counter()
            path = extract(sources, cfg, cache_dir, progress=False)
            e2e_s = time.perf_counter() - t
            with h5py.File(path) as h:
                timings = json.loads(h.attrs["timings"])
            runs.append((e2e_s, timings))
            shutil.rmtree(cache_dir, ignore_errors=True)
        (first_s, first_t), (e2e_s, timings) = runs
        k2, f2 = forward_only(model, n_fwd), forward_only(model, n_fwd, streams=STREAMS)
        keras_fwd, streams_fwd = (k1 + k2) / 2, (f1 + f2) / 2
        fwd = max(keras_fwd, streams_fwd)
        e2e = n_fwd / e2e_s
        pipe = timings["forward_passes"] / timings["pipeline_s"]
        results.append({
            "backbone": name, "forward_only_img_s": fwd, "forward_only_runs": [f1, f2],
            "forward_only_streams": STREAMS, "keras_loop_img_s": keras_fwd, "keras_loop_runs": [k1, k2],
            "pipeline_img_s": pipe, "ratio": pipe / fwd,
            "whole_command_img_s": e2e, "whole_command_seconds": e2e_s, "whole_command_ratio": e2e / fwd,
            "build_model_seconds": timings["build_model_s"], "images": args.images,
            "first_run_whole_command_seconds": first_s, "first_run_whole_command_ratio": n_fwd / first_s / fwd,
            "first_run_build_model_seconds": first_t["build_model_s"],
            "forward_passes": n_fwd, "gflop_per_image": flops / 1e9,
            "achieved_gflop_s": fwd * flops / 1e9, "fraction_of_matmul_peak": fwd * flops / 1e9 / gflops_peak,
        })
        print(results[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    data = {"machine": machine(), "matmul_gflop_s": gflops_peak, "one_thread_per_operation": True, "weights": "none (random init, NOT PRETRAINED)",
            "note": "files -> HDF5 = the whole extraction (the later run) minus getting the backbone ready (decoding "
                    "that overlapped it is counted as if it had not): decode once, resize, K jittered views, forward, "
                    "float16 shards. Whole command adds getting the backbone ready (graph cache), hashing the files "
                    "and assembling the HDF5 file; first run = the same with an empty graph cache (Keras builds).",
            "target_ratio": 0.9, "results": results, "bfloat16": bf16, "peak_rss_mb": peak_rss_mb()}
    md = render(data, args.images, args.augment)
    write_results("extract", data, md)


if __name__ == "__main__":
    main()
