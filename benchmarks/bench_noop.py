"""A no-op costs nothing: wall time of fresh `covfeat` processes that have no work to do.

On the bundled sample's complete cache (made first, untimed, with --weights none): a re-run
`covfeat extract` (which finds the cache complete and verified), `covfeat info` and `covfeat
verify`, each started as a fresh process 5 times (median, and the child's CPU time beside it,
which a loaded machine does not inflate).  Targets (covfeat issue 20): under 1 s each.  Each
row also says whether the process imported TensorFlow or Keras (it should not: they take
seconds), and the interpreter's own start is timed as the floor.

    python benchmarks/bench_noop.py [--backbone inception_v3] [--runs 5] [--cache-dir DIR]

Writes benchmarks/results/noop.json and .md.  Run it alone: other processes on the machine
inflate wall times.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu, table, write_results  # noqa: E402

TARGET_S = 1.0

# The real command line, then a note on stderr of which heavy modules the process imported.
RUN_CLI = ("import sys\nfrom covfeat.cli import app\ntry:\n    app(prog_name='covfeat')\nexcept SystemExit as e:\n"
           "    code = e.code\nheavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
           "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\nsys.exit(code)\n")


def timed(argv: list[str], env: dict) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + system) of one fresh process, and its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), r.stderr


def lib_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="inception_v3")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = ap.parse_args()
    env = dict(os.environ, COVFEAT_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        extract = ["extract", "--backbone", args.backbone, "--weights", "none", "--cache-dir", str(cache_dir)]
        print(f"making the bundled sample's cache ({args.backbone}, --weights none; untimed) ...", flush=True)
        made = subprocess.run([sys.executable, "-m", "covfeat.cli", *extract], capture_output=True, text=True, env=env)
        if made.returncode != 0:
            raise SystemExit(f"extraction failed:\n{made.stderr}")
        cache = made.stdout.strip().splitlines()[-1]
        commands = {"python -c pass (floor)": [sys.executable, "-c", "pass"],
                    "covfeat extract (no-op)": [sys.executable, "-c", RUN_CLI, *extract],
                    "covfeat info": [sys.executable, "-c", RUN_CLI, "info", cache],
                    "covfeat verify": [sys.executable, "-c", RUN_CLI, "verify", cache]}
        rows = {}
        for name, argv in commands.items():
            timed(argv, env)  # once untimed: the files in the page cache, as in a user's re-run
            walls, cpus, heavy = [], [], set()
            for _ in range(args.runs):
                wall, cpu_s, err = timed(argv, env)
                walls.append(wall)
                cpus.append(cpu_s)
                for line in err.splitlines():
                    if line.startswith("HEAVY="):
                        heavy |= {m for m in line[len("HEAVY="):].split(",") if m}
            rows[name] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                          "median_cpu_s": statistics.median(cpus), "runs": walls,
                          "imported": sorted(heavy), "target_s": None if "floor" in name else TARGET_S}
            print(f"{name}: median {rows[name]['median_s']:.2f} s (cpu {rows[name]['median_cpu_s']:.2f} s)", flush=True)
    data = {"machine": {"cpu": cpu(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "tensorflow": lib_version("tensorflow")
                        or lib_version("tensorflow-cpu"), "load_average": os.getloadavg(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S")},
            "backbone": args.backbone, "weights": "none", "data": "the bundled sample", "runs": args.runs,
            "data_line": next((ln for ln in made.stderr.splitlines() if ln.startswith("Data: ")), ""),
            "commands": rows, "met": all(r["median_s"] < TARGET_S for r in rows.values() if r["target_s"])}
    c = data["machine"]["cpu"]
    md = ["# A no-op costs nothing (fresh processes with no work to do)", "",
          f"Machine: {c['model']}, {data['machine']['cpus']} CPUs, vector extensions "
          f"{' '.join(c['vector_extensions'])}; TensorFlow {data['machine']['tensorflow']}; load average "
          f"{data['machine']['load_average'][0]:.2f} at the end; {data['machine']['date']}.", "",
          f"The bundled sample's complete cache ({args.backbone}, --weights none; {data['data_line'][6:]}). "
          f"Each command started {args.runs} times as a fresh process, after one untimed start; wall time median "
          "(min-max), and the process's CPU time (user + system, median).", "",
          table(["command", "wall median", "min-max", "CPU", "imports TensorFlow/Keras", f"< {TARGET_S:g} s"],
                [[name, f"{r['median_s']:.2f} s", f"{r['min_s']:.2f}-{r['max_s']:.2f} s", f"{r['median_cpu_s']:.2f} s",
                  ", ".join(r["imported"]) or "no", "" if r["target_s"] is None else
                  ("yes" if r["median_s"] < r["target_s"] else "NO")] for name, r in rows.items()]),
          "", f"Targets met: {'yes' if data['met'] else 'NO'}."]
    write_results("noop", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
