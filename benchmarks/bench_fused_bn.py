"""Why the mixed_fused_bn route, and why extraction keeps TensorFlow's graph optimiser on for it.

    python benchmarks/bench_fused_bn.py [--backbones inception_v3,densenet201]

Needs a CPU with native bfloat16.  For each backbone, each in a process of its own, the forward
pass's img/s on random tensors (batch 16, two batches at a time on one thread per operation, as
the extract command runs them; the median of 5 passes of 32 images):

- float32;
- ``mixed`` (Keras's mixed_bfloat16 policy; its BatchNormalizations in float32 with casts);
- ``mixed`` with every BatchNormalization replaced by an identity: timing only, its maps are
  wrong, it bounds what a cheaper BatchNormalization could gain;
- ``mixed_fused_bn`` with TensorFlow's graph optimiser on (how the extract command runs it) and
  off (how it runs every other route).

Random-init weights (NOT PRETRAINED): speed does not depend on them.  Writes
benchmarks/results/fused_bn.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import machine, machine_line, table, write_results  # noqa: E402

VARIANTS = ("float32", "mixed", "mixed_without_bn", "mixed_fused_bn", "mixed_fused_bn_optimiser_off")


def child(name: str, variant: str) -> None:
    route = {"float32": "float32", "mixed": "mixed", "mixed_without_bn": "mixed"}.get(variant, "mixed_fused_bn")
    from covfeat.extraction.precision import prepare_process

    prepare_process(route)
    import keras
    import tensorflow as tf

    from covfeat.extraction.backbones import build_backbone, get_backbone, resolve_weights
    from covfeat.extraction.work import STREAMS, one_thread_per_stream

    one_thread_per_stream(tf)
    if variant == "mixed_fused_bn_optimiser_off":
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    bb = get_backbone(name)
    model = build_backbone(bb, resolve_weights(bb, "none"), seed=0, route=route)
    if variant == "mixed_without_bn":
        class Skipped(keras.layers.BatchNormalization):  # the layer's place in the graph, none of its work
            def call(self, inputs, training=None, mask=None):
                return inputs

        model = keras.models.clone_model(model, clone_function=lambda layer: Skipped.from_config(layer.get_config())
                                         if isinstance(layer, keras.layers.BatchNormalization) else layer)
    x = np.random.default_rng(0).random((32, 224, 224, 3), dtype=np.float32)
    fwd = tf.function(lambda b: model(b, training=False))
    fwd(x[:16]).numpy()
    speeds = []
    with ThreadPoolExecutor(max_workers=STREAMS) as streams:
        for _ in range(5):
            t = time.perf_counter()
            list(streams.map(lambda i: fwd(x[i:i + 16]).numpy(), range(0, len(x), 16)))
            speeds.append(len(x) / (time.perf_counter() - t))
    print(json.dumps({"img_s": float(np.median(speeds)), "passes": speeds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="inception_v3,densenet201")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from covfeat.extraction.precision import bf16_kind

    if bf16_kind() is None:
        raise SystemExit("this CPU has no native bfloat16: nothing to measure")
    rows = []
    for name in args.backbones.split(","):
        got = {}
        for v in VARIANTS:
            r = subprocess.run([sys.executable, __file__, "--child", name, v], capture_output=True, text=True, check=True)
            got[v] = json.loads(r.stdout.strip().splitlines()[-1])
            print(name, v, f"{got[v]['img_s']:.1f} img/s", flush=True)
        f32 = got["float32"]["img_s"]
        rows += [{"backbone": name, "variant": v, "img_s": got[v]["img_s"], "passes": got[v]["passes"],
                  "ratio_to_float32": got[v]["img_s"] / f32} for v in VARIANTS]
    m = machine()
    md = "\n".join([
        "# The fused BatchNormalization route", "", machine_line(m) + f" Native bfloat16: {bf16_kind()}.", "",
        "Forward pass on random tensors, batch 16, two batches at a time on one thread per operation, median of 5 "
        "passes of 32 images, each variant in a process of its own; random-init weights (NOT PRETRAINED). "
        "`mixed_without_bn` computes wrong maps (timing only): it bounds what a cheaper BatchNormalization could "
        "gain. `mixed_fused_bn` runs with TensorFlow's graph optimiser on, as the extract command runs it; "
        "`..._optimiser_off` as the command runs every other route.", "",
        table(["backbone", "variant", "img/s", "ratio to float32"],
              [[r["backbone"], r["variant"], f"{r['img_s']:.1f}", f"{r['ratio_to_float32']:.2f}"] for r in rows]), "",
        "Command: `python benchmarks/bench_fused_bn.py" + (f" --backbones {args.backbones}"
                                                          if args.backbones != "inception_v3,densenet201" else "")
        + "`", ""])
    write_results("fused_bn", {"machine": m, "weights": "none (random init, NOT PRETRAINED)", "rows": rows}, md)


if __name__ == "__main__":
    main()
