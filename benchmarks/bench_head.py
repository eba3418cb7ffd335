"""Head training speed: the paper's 100-epoch fit with SMOTE on cached densenet201 maps,
three ways, measured side by side in one process on the same cache and the same rows:

1. ``covfeat fit-head`` (the library call, and the command in a fresh process);
2. the same head through plain ``keras.Model.fit`` on the same balanced rows;
3. the paper's way: frozen backbone + head trained on the images, the backbone recomputed
   for every image in every epoch; one epoch timed, extrapolated to 100 (labelled so).

Also a 5-fold cross-validation of the head on the same cache, peak memory, and how close
the epochs come to the machine's limit: the dropout + pooling pass and the head's batch
steps timed alone, their bytes/s, elements/s and GFLOP/s, beside the read bandwidth
measured in the same run.  The fresh command is timed twice with a new head-template
folder: the first run with a head makes its template (Keras imported once), the second is
every later run.

    python benchmarks/bench_head.py [--cache FILE] [--keras-epochs 100]

Without --cache, the densenet201 cache of ../shared/data/covid-cxr (Cohen PA + Kermany
NORMAL, --weights none, --augment 4, the default split) is made first (about 10 minutes).
Writes benchmarks/results/head.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import SHARED, machine, machine_line, peak_rss_mb, table, write_results  # noqa: E402


def ensure_cache(cache_dir: Path) -> tuple[Path, float | None]:
    from covfeat.extraction.config import ExtractConfig
    from covfeat.extraction.run import extract

    cfg = ExtractConfig(backbone="densenet201", weights="none", augment=4)
    t = time.perf_counter()
    path = extract([SHARED / "cohen", SHARED / "kermany" / "NORMAL"], cfg, cache_dir, progress=True)
    return path, time.perf_counter() - t


def kernel_rates(fc, tr, bal, cfg, m) -> dict:
    """The epochs stage against the machine's limit: the dropout + pooling pass (every core)
    and the head's batch steps (one core) timed alone on the same pool, and what the stage
    achieved, beside the read bandwidth measured now."""
    from common import head_state, read_bandwidth_gb_s

    from covfeat.head.dropout import keep_q
    from covfeat.head.kernels import head_epoch
    from covfeat.head.loop import MemorySource, epoch_plan
    from covfeat.store.reader import populated_empty

    n_real, n_syn, V = len(tr), len(bal.parents), fc.n_views
    shape = fc.feature_shape
    S, C = shape[0] * shape[1], shape[2]
    pool = populated_empty((n_real, V, S, C), np.uint16)
    idx = np.concatenate([fc.samples()[int(r)] for r in tr])
    fc.read_features(idx, out=pool.view(np.float16).reshape(n_real * V, *shape))
    src = MemorySource(pool, bal.parents, bal.weights)
    n = n_real + n_syn
    plan = epoch_plan(cfg.seed, 20, n, np.full(n, V, np.int64))
    out = np.zeros((n, C), np.float32)
    q = keep_q(cfg.dropout)
    src.pooled(0, *plan[0], q, cfg.seed, out)  # compiled code loaded
    t = time.perf_counter()
    for e in range(1, 20):
        src.pooled(e, *plan[e], q, cfg.seed, out)
    pool_s = (time.perf_counter() - t) / 19
    bytes_epoch = (n_real + 2 * n_syn) * S * C * 2  # a SMOTE row reads both parents
    elems_epoch = n * S * C
    H = cfg.dense_units
    P, M, consts = head_state(C, cfg, seed=0)
    y = np.eye(2, dtype=np.float32)[bal.labels]
    w = np.ones(n, np.float32)
    head_epoch(out, y, w, P, M, cfg.batch_size, *consts)
    t = time.perf_counter()
    for _ in range(10):
        head_epoch(out, y, w, P, M, cfg.batch_size, *consts)
    head_s = (time.perf_counter() - t) / 10
    flops = 2 * 2 * n * C * H  # the first dense layer: forward sums and kernel gradient, multiply + add each
    bw = read_bandwidth_gb_s()
    stage = m["fit_stages_seconds"]["epochs"]
    return {
        "read_bandwidth_gb_s": bw,
        "dropout_pool_ms_per_epoch": pool_s * 1e3, "dropout_pool_gb_s": bytes_epoch / pool_s / 1e9,
        "dropout_pool_g_elements_s": elems_epoch / pool_s / 1e9,
        "dropout_pool_share_of_bandwidth": bytes_epoch / pool_s / 1e9 / bw,
        "head_epoch_ms_per_epoch": head_s * 1e3, "head_epoch_gflop_s_one_core": flops / head_s / 1e9,
        "epochs_stage_seconds": stage, "epochs_stage_gb_s": bytes_epoch * cfg.epochs / stage / 1e9,
        "epochs_stage_g_elements_s": elems_epoch * cfg.epochs / stage / 1e9,
        "bytes_per_epoch": bytes_epoch, "elements_per_epoch": elems_epoch,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--keras-epochs", type=int, default=100, help="epochs of the plain Model.fit run (100 = the paper's)")
    ap.add_argument("--paper-images", type=int, default=0, help="images in the paper-way epoch (0 = the full balanced set)")
    args = ap.parse_args()

    import h5py

    from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
    from covfeat.head.balance import balance
    from covfeat.head.config import FitConfig
    from covfeat.head.fit import cross_validate, fit_head, make_split, rows_by_split
    from covfeat.head.model import build_head, compile_head, one_hot
    from covfeat.store.reader import open_cache

    if args.cache is None:
        if not SHARED.is_dir():
            sys.exit(f"benchmark data not found: {SHARED}")
        cache, _ = ensure_cache(args.cache_dir)
    else:
        cache = args.cache
    fc = open_cache(cache)
    with h5py.File(cache) as h:
        extract_timings = json.loads(h.attrs["timings"]) if "timings" in h.attrs else {}
    V = fc.n_views
    fit = FitConfig()  # the paper's head, the default split
    parts = rows_by_split(fc, make_split(fc, fit.split))
    tr, va = parts[0], parts[1]
    y_tr = fc.manifest["label"][tr]
    bb = get_backbone(fc.backbone)
    fit = fit.resolved(bb)
    cfg = fit.head
    shape = fc.feature_shape
    out = {"machine": machine(), "cache": str(cache), "backbone": fc.backbone, "weights": "none (random init, NOT PRETRAINED)",
           "epochs": cfg.epochs, "batch_size": cfg.batch_size, "dropout": bb.dropout, "feature_shape": list(shape)}

    # Same balanced rows for the plain Keras run: the originals plus SMOTE rows (view 0).
    X0 = fc.read_features(fc.originals(tr))
    bal = balance(X0.reshape(len(tr), -1), y_tr, cfg)
    syn = X0[bal.parents[:, 0]] * bal.weights[:, :1, None, None].astype(np.float32) + \
        X0[bal.parents[:, 1]] * bal.weights[:, 1:, None, None].astype(np.float32)
    Xb = np.concatenate([X0, syn])
    yb = one_hot(bal.labels)
    Xv = fc.read_features(fc.originals(va))
    yv = one_hot(fc.manifest["label"][va])
    out["train_rows"] = {"real": int(len(tr)), "smote": int(len(syn)), "views": int(V)}

    # 2. plain keras.Model.fit, run first so TensorFlow keeps its default threading for it
    model, _ = build_head(shape, cfg)
    compile_head(model, cfg)
    t = time.perf_counter()
    model.fit(Xb, yb, batch_size=cfg.batch_size, epochs=args.keras_epochs, validation_data=(Xv, yv), verbose=0)
    keras_s = (time.perf_counter() - t) * cfg.epochs / args.keras_epochs
    out["keras_fit"] = {"seconds_for_100_epochs": keras_s, "epochs_run": args.keras_epochs,
                        "extrapolated": args.keras_epochs != cfg.epochs, "peak_rss_mb_after": peak_rss_mb()}
    print("keras fit", out["keras_fit"], flush=True)
    del model, Xb

    # 3. the paper's way: backbone + head on images, one epoch timed
    import keras

    from covfeat.imaging.decode import decode, resize

    n_img = args.paper_images or len(bal.labels)
    paths = [fc.manifest["path"][tr[i % len(tr)]] for i in range(n_img)]
    imgs = np.stack([bb.scaling_for("paper").apply(resize(decode(p))) for p in paths])
    labels = one_hot(np.array([y_tr[i % len(tr)] for i in range(n_img)]))
    backbone = build_backbone(bb, resolve_weights(bb, "none"), seed=0)
    head, _ = build_head(shape, cfg)
    inp = keras.Input((224, 224, 3))
    full = keras.Model(inp, head(backbone(inp, training=False)))
    compile_head(full, cfg)
    full.fit(imgs[:8], labels[:8], batch_size=8, epochs=1, verbose=0)  # build and trace, not timed
    t = time.perf_counter()
    full.fit(imgs, labels, batch_size=cfg.batch_size, epochs=1, verbose=0)
    epoch_s = (time.perf_counter() - t) * len(bal.labels) / n_img
    out["paper_way"] = {"seconds_one_epoch": epoch_s, "images_timed": n_img,
                        "seconds_100_epochs_extrapolated": epoch_s * cfg.epochs, "peak_rss_mb_after": peak_rss_mb(),
                        "note": "images decoded and preprocessed in memory beforehand (not timed): generous to the paper's way"}
    print("paper way", out["paper_way"], flush=True)
    del imgs, full, backbone

    # 1. covfeat fit-head: first call in this process (numba kernels loaded), then again
    runs = Path("runs-bench")
    t = time.perf_counter()
    fit_head(cache, fit, runs, progress=False)  # loads the numba kernels in this process
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    second = fit_head(cache, fit, runs, progress=False)
    fit_s = time.perf_counter() - t
    m = json.loads((second / "metrics.json").read_text())
    # the same call with the head's steps not flushing subnormals (covfeat.head.kernels.head_epoch):
    # what the flush is worth on this CPU, and whether the predictions move
    import covfeat.head.kernels as kernels

    flushing = kernels.head_epoch
    kernels.head_epoch = kernels._head_epoch
    try:
        t = time.perf_counter()
        plain = fit_head(cache, fit, runs / "without-flush", progress=False)
        plain_s = time.perf_counter() - t
    finally:
        kernels.head_epoch = flushing
    m_plain = json.loads((plain / "metrics.json").read_text())
    same = (plain / "predictions.csv").read_bytes() == (second / "predictions.csv").read_bytes()
    out["without_subnormal_flush"] = {"seconds": plain_s, "stages_seconds": m_plain["fit_stages_seconds"],
                                      "predictions_identical": same}
    print("without the flush", out["without_subnormal_flush"], flush=True)

    def command(template_cache: Path) -> tuple[float, float]:
        env = dict(os.environ, COVFEAT_NO_PROGRESS="1", COVFEAT_HEAD_CACHE=str(template_cache))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "covfeat.cli", "fit-head", "--cache", str(cache), "--runs-dir",
                            str(runs)], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(r.stderr)
        # the command's own peak (VmHWM of its process, in its metrics.json)
        return wall, json.loads((Path(r.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())["peak_rss_mb"]

    import tempfile

    with tempfile.TemporaryDirectory() as tmpl:
        cold_s, _ = command(Path(tmpl))  # the first run with this head: Keras makes its template
        cli_s, cli_peak_mb = command(Path(tmpl))
    out["covfeat_fit_head"] = {"seconds": fit_s, "seconds_first_call_in_process": first_s, "cli_seconds_fresh_process": cli_s,
                               "cli_seconds_first_run_with_this_head": cold_s,
                               "stages_seconds": m["fit_stages_seconds"], "peak_rss_mb_fit_head_command": cli_peak_mb,
                               "test_accuracy": m["argmax"]["accuracy"], "run": str(second)}
    print("fit-head", out["covfeat_fit_head"], flush=True)
    out["kernels"] = kernel_rates(fc, tr, bal, cfg, m)
    print("kernels", out["kernels"], flush=True)

    # 5-fold cross-validation of the same head on the same cache
    t = time.perf_counter()
    cv = cross_validate(cache, replace(fit, folds=5), runs, progress=False)
    out["cv_5fold_seconds"] = time.perf_counter() - t
    out["cv_run"] = str(cv)

    n_samples = len(fc.labels)
    if extract_timings:
        extract_s = extract_timings["pipeline_s"] + extract_timings["build_model_s"]
        out["extraction_seconds"] = extract_s
        out["extraction_note"] = "measured when this cache was made (its HDF5 attrs), not in this run"
    else:
        ext = json.loads((Path(__file__).parent / "results" / "extract.json").read_text())
        rate = next(r["pipeline_img_s"] for r in ext["results"] if r["backbone"] == fc.backbone)
        extract_s = n_samples / rate
        out["extraction_seconds"] = extract_s
        out["extraction_note"] = (f"{n_samples} maps / {rate:.2f} img/s, the {fc.backbone} files->HDF5 throughput "
                                  "of benchmarks/results/extract.json (extrapolated)")
    out["ratios"] = {
        "keras_fit_over_fit_head": keras_s / fit_s,
        "paper_way_over_fit_head": out["paper_way"]["seconds_100_epochs_extrapolated"] / fit_s,
        "paper_way_over_extraction_plus_fit_head": out["paper_way"]["seconds_100_epochs_extrapolated"] / (extract_s + fit_s),
    }
    out["targets"] = {"fit_head_seconds_max": 5, "keras_ratio_min": 20, "cli_seconds_max": 8, "cv_5fold_seconds_max": 25}
    k = out["kernels"]
    out["targets_met"] = {"fit_head": fit_s <= 5, "keras_ratio": keras_s / fit_s >= 20, "cli": cli_s <= 8,
                          "cv_5fold": out["cv_5fold_seconds"] <= 25}
    out["peak_rss_mb"] = peak_rss_mb()

    rows = [
        ["covfeat fit-head (library call)", f"{fit_s:.1f}", "1.0", "measured"],
        ["covfeat fit-head, first call in a process", f"{first_s:.1f}", "", "measured (numba kernels loaded)"],
        ["`covfeat fit-head` command, fresh process", f"{cli_s:.1f}", "", "measured (wall, process start to exit)"],
        ["the same, first run ever with this head", f"{cold_s:.1f}", "",
         "measured (Keras imported once to make the head's template)"],
        ["plain keras.Model.fit, same head, same rows", f"{keras_s:.1f}", f"{keras_s / fit_s:.1f}",
         "measured" if args.keras_epochs == cfg.epochs else f"{args.keras_epochs} epochs measured, extrapolated"],
        ["paper's way: backbone + head on images", f"{epoch_s * cfg.epochs:.0f}", f"{epoch_s * cfg.epochs / fit_s:.0f}",
         f"1 epoch measured ({epoch_s:.1f} s), x100 extrapolated"],
        ["one-off extraction + fit-head", f"{extract_s + fit_s:.0f}",
         f"paper's way / this = {out['ratios']['paper_way_over_extraction_plus_fit_head']:.1f}",
         out["extraction_note"]],
        ["5-fold cross-validation (fit-head x 5)", f"{out['cv_5fold_seconds']:.1f}", "", "measured"],
    ]
    md = "\n".join([
        "# Head-training benchmark", "", machine_line(out["machine"]), "",
        f"{out['machine']['date']}, {os.cpu_count()} CPUs. Cache: {fc.backbone}, {n_samples} cached maps "
        f"({len(tr)} training rows + {len(syn)} SMOTE rows, {V} views each), shape {tuple(shape)}, "
        "weights none (random init, NOT PRETRAINED). 100 epochs, batch 8, SGD(1e-4, momentum 0.5), "
        f"dropout {bb.dropout} on the pre-pool map.", "",
        table(["method", "seconds for 100 epochs", "x slower than fit-head", "how"], rows), "",
        "Targets: fit-head <= 5 s; plain Model.fit / fit-head >= 20; fresh command <= 8 s; 5-fold CV <= 25 s. Met: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out["targets_met"].items()) + ".",
        "Stages of the fit-head call (s): " + ", ".join(f"{k} {v:.2f}" for k, v in m["fit_stages_seconds"].items()) + ".",
        *([f"The same call with the head's steps not flushing subnormal floats to zero: "
           f"{out['without_subnormal_flush']['seconds']:.1f} s, epochs "
           f"{out['without_subnormal_flush']['stages_seconds']['epochs']:.2f} s (against {m['fit_stages_seconds']['epochs']:.2f}); "
           f"test predictions {'identical' if out['without_subnormal_flush']['predictions_identical'] else 'DIFFERENT'}, "
           "byte for byte."] if "without_subnormal_flush" in out else []),
        "",
        "How close the epochs are to the machine's limit (measured in this run):", "",
        table(["measure", "value"], [
            ["read bandwidth, every core (compiled integer sum over 1 GiB)", f"{k['read_bandwidth_gb_s']:.1f} GB/s"],
            ["dropout + pooling pass alone, every core", f"{k['dropout_pool_ms_per_epoch']:.1f} ms/epoch: "
             f"{k['dropout_pool_gb_s']:.1f} GB/s read ({k['dropout_pool_share_of_bandwidth']:.0%} of the bandwidth), "
             f"{k['dropout_pool_g_elements_s']:.2f} G elements/s"],
            ["head batch steps alone, one core", f"{k['head_epoch_ms_per_epoch']:.1f} ms/epoch, "
             f"{k['head_epoch_gflop_s_one_core']:.1f} GFLOP/s (first dense layer, multiply and add counted apart)"],
            ["epochs stage of fit-head (both overlapped, plus validation)", f"{k['epochs_stage_seconds']:.2f} s for "
             f"{cfg.epochs} epochs: {k['epochs_stage_gb_s']:.1f} GB/s, {k['epochs_stage_g_elements_s']:.2f} G elements/s"],
        ]), "",
        f"One epoch reads {k['bytes_per_epoch'] / 1e6:.0f} MB of float16 maps (a SMOTE row reads both parents) and "
        f"draws {k['elements_per_epoch'] / 1e6:.0f} M dropout decisions.",
        f"Peak RSS of this benchmark process: {out['peak_rss_mb']:.0f} MB; of the fit-head command process: "
        f"{cli_peak_mb:.0f} MB.", "",
        "Command: `python benchmarks/bench_head.py`", ""])
    write_results("head", out, md)


if __name__ == "__main__":
    main()
