"""The head's compiled kernels under several code-generation targets, on this machine.

The CPU family changes between machines (AMD EPYC with AVX2 or AVX-512, Intel Xeon with
AVX-512).  numba compiles covfeat's kernels for the CPU it runs on; with NUMBA_CPU_NAME it
compiles them for another one, so one machine can run the AVX2 code (haswell), Intel's
AVX-512 code (skylake-avx512, icelake-server) and its own (host) side by side.  Each target
runs in its own process on the same synthetic densenet201-sized data (481 real + 313 SMOTE
rows x 5 views x 7x7x1920 float16, dropout 0.5, the paper's head):

- dropout + pooling, one epoch, every core: ms, GB/s read, share of the read bandwidth
  measured in the same process;
- the head's batch steps, one epoch, one core: ms;
- a SHA-256 of every output, which must be the same for every target (the kernels' sums are
  separate IEEE operations in a fixed order).

    python benchmarks/bench_kernels.py [--targets host,haswell,skylake-avx512,icelake-server]

Writes benchmarks/results/kernels.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import head_state, machine, machine_line, read_bandwidth_gb_s, table, write_results  # noqa: E402

R, V, S, C, N_SYN, H = 481, 5, 49, 1920, 313, 128


def measure() -> dict:
    """Run in the child process: time the kernels compiled for NUMBA_CPU_NAME."""
    from covfeat.head.dropout import dropout_pool, keep_q
    from covfeat.head.kernels import head_epoch

    rng = np.random.default_rng(0)
    pool = (rng.random((R, V, S, C), np.float32) * 3).astype(np.float16).view(np.uint16)
    parents = rng.integers(0, R, (N_SYN, 2)).astype(np.int64)
    w = rng.random((N_SYN, 2)).astype(np.float32)
    n = R + N_SYN
    order = rng.permutation(n).astype(np.int64)
    views = rng.integers(0, V, n).astype(np.int64)
    out = np.zeros((n, C), np.float32)
    q = keep_q(0.5)
    t = time.perf_counter()
    dropout_pool(pool, order, views, q, 0, 0, out, parents, w, R)
    compile_s = time.perf_counter() - t
    times = []
    for e in range(1, 11):
        t = time.perf_counter()
        dropout_pool(pool, order, views, q, 0, e, out, parents, w, R)
        times.append(time.perf_counter() - t)
    pool_s = float(np.median(times))
    digest = hashlib.sha256(out.tobytes())
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    sw = np.ones(n, np.float32)
    P, M, consts = head_state(C, seed=1)  # the paper's head: 128 units, its SGD and regularisers
    head_epoch(out, y, sw, P, M, 8, *consts)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        loss = head_epoch(out, y, sw, P, M, 8, *consts)
        times.append(time.perf_counter() - t)
        digest.update(np.float64(loss[0]).tobytes())
    for a in P + M:
        digest.update(a.tobytes())
    bw = read_bandwidth_gb_s()
    nbytes = (R + 2 * N_SYN) * S * C * 2
    return {"dropout_pool_ms": pool_s * 1e3, "dropout_pool_gb_s": nbytes / pool_s / 1e9,
            "read_bandwidth_gb_s": bw, "share_of_bandwidth": nbytes / pool_s / 1e9 / bw,
            "head_epoch_ms": float(np.median(times)) * 1e3, "first_call_s": compile_s,
            "sha256": digest.hexdigest()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="host,haswell,skylake-avx512,icelake-server")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    results = []
    for target in args.targets.split(","):
        env = dict(os.environ)
        env.pop("NUMBA_CPU_NAME", None)
        if target != "host":
            env["NUMBA_CPU_NAME"] = target
        r = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(r.stderr)
        res = {"target": target, **json.loads(r.stdout.strip().splitlines()[-1])}
        print(res, flush=True)
        results.append(res)
    same = len({r["sha256"] for r in results}) == 1
    data = {"machine": machine(), "results": results, "same_bits_on_every_target": same,
            "shape": {"real_rows": R, "smote_rows": N_SYN, "views": V, "positions": S, "channels": C, "units": H}}
    rows = [[r["target"], f"{r['dropout_pool_ms']:.1f}", f"{r['dropout_pool_gb_s']:.1f}",
             f"{r['share_of_bandwidth']:.0%} of {r['read_bandwidth_gb_s']:.1f} GB/s", f"{r['head_epoch_ms']:.1f}",
             r["sha256"][:12]] for r in results]
    md = "\n".join([
        "# The head's kernels under several code-generation targets", "", machine_line(data["machine"]), "",
        f"Synthetic densenet201-sized epoch: {R} real + {N_SYN} SMOTE rows x {V} views x 7x7x{C} float16, dropout "
        f"0.5; head with {H} units, batch 8. Each target compiled (NUMBA_CPU_NAME) and run in its own process on "
        "this machine; medians of 10 epochs.", "",
        table(["code generated for", "dropout + pooling ms/epoch (every core)", "GB/s read",
               "share of read bandwidth (same process)", "head steps ms/epoch (one core)", "SHA-256 of outputs"], rows),
        "", f"Same bits on every target: {'yes' if same else 'NO'}.", "",
        "Command: `python benchmarks/bench_kernels.py`", ""])
    write_results("kernels", data, md)


if __name__ == "__main__":
    main()
