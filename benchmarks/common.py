"""Shared helpers of the benchmarks: results files, machine facts, FLOP counts, matmul peak."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-cxr"


def cpu() -> dict:
    """The CPU model and its vector extensions, so numbers from different machines are never
    compared blindly (TensorFlow runs about twice as fast on AVX-512 here)."""
    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown"  # platform.processor() is "x86_64" on some systems
    vec = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "sse4_2"))
    return {"model": model, "vector_extensions": vec}


def machine() -> dict:
    import tensorflow as tf

    return {"cpu": cpu(), "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def machine_line(m: dict) -> str:
    """One Markdown line naming the machine of a result."""
    c = m["cpu"]
    return (f"Machine: {c['model']}, {m['cpus']} CPUs, vector extensions {' '.join(c['vector_extensions'])}; "
            f"GPUs: {', '.join(m['gpus']) or 'none'}; TensorFlow {m['tensorflow']}; {m['date']}.")


def peak_rss_mb() -> float:
    from covfeat.head.fit import peak_rss_mb as own

    return own()


def cpu_family(c: dict | None = None) -> str:
    """A folder name for the kind of CPU a result was measured on: its model name in lower case
    (``intel-xeon``, ``amd-epyc``), with ``-amx`` where it has AMX.  The machines here change
    family from one session to the next, and TensorFlow's speed (and so every ratio to it)
    with them."""
    import re

    c = cpu() if c is None else c
    model = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*", " ", c["model"].lower())
    slug = "-".join(re.findall(r"[a-z0-9]+", model)[:2]) or "unknown"
    return slug + ("-amx" if "amx_bf16" in c["vector_extensions"] else "")


def write_results(name: str, data: dict, markdown: str) -> None:
    """``results/<name>.json`` and ``.md`` (the latest run), and the same in
    ``results/<cpu family>/``, where each family's latest run stays when the other's is newer."""
    fam = RESULTS / cpu_family((data.get("machine") or {}).get("cpu") or data.get("cpu") or cpu())
    for folder in (RESULTS, fam):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(data, indent=2, default=float))
        (folder / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {RESULTS / (name + '.json')} and .md, and the same in {fam.relative_to(RESULTS.parent)}/")


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul throughput of this machine through TensorFlow, best of ``repeats``."""
    import tensorflow as tf

    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    f = tf.function(lambda x, y: tf.matmul(x, y))
    f(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def model_flops(model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers of one forward pass of one image."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            out = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * out[1] * out[2] * kh * kw * cin * out[3] / layer.groups
        elif kind == "DepthwiseConv2D":
            out = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * out[1] * out[2] * kh * kw * out[3]
        elif kind == "Dense":
            total += 2 * layer.input.shape[-1] * layer.units
    return total


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def rng_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 224, 224, 3), dtype=np.float32)


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth with every core: a compiled integer sum over ``gib`` GiB (far
    larger than any cache), best of ``repeats``, in GB/s (1e9 bytes).  Integer adds vectorise
    freely, so the loop is bound by reading memory, as the head's dropout pass is."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def total(a):
        parts = np.zeros(a.shape[0], np.uint32)
        for i in prange(a.shape[0]):
            s = np.uint32(0)
            row = a[i]
            for j in range(row.shape[0]):
                s += row[j]
            parts[i] = s
        return parts.sum()

    a = np.ones((int(gib * 2**30) // (1 << 20), (1 << 20) // 4), np.uint32)
    total(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        total(a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def head_state(channels: int, cfg=None, seed: int = 0) -> tuple[tuple, tuple, tuple]:
    """(weights, momenta, constants) for timing covfeat.head.kernels.head_epoch on its own: random
    weights of the paper's head shape and the numba engine's own constants (as loop.py passes them)."""
    from covfeat.head.config import HeadConfig
    from covfeat.head.model import BN_EPSILON, BN_MOMENTUM, CLIP_EPSILON

    cfg = cfg or HeadConfig()
    H = cfg.dense_units
    rng = np.random.default_rng(seed)
    P = (rng.standard_normal((channels, H)).astype(np.float32) * 0.02, np.zeros(H, np.float32),
         np.ones(H, np.float32), np.zeros(H, np.float32), np.zeros(H, np.float32), np.ones(H, np.float32),
         rng.standard_normal((H, 2)).astype(np.float32) * 0.1, np.zeros(2, np.float32))
    M = tuple(np.zeros_like(P[i]) for i in (0, 1, 2, 3, 6, 7))
    consts = tuple(np.float32(v) for v in (cfg.learning_rate, cfg.momentum, cfg.activity_l1, cfg.activity_l2,
                                           BN_EPSILON, BN_MOMENTUM, CLIP_EPSILON))
    return P, M, consts
