"""The lung segmenter's target: `covfeat lungs fit` on openist's 275 radiographs and masks gives a
held-out Dice of at least 0.93 in under 15 minutes on 2 CPU cores (issue 17).

Runs the command itself, as a user would (a fresh process: TensorFlow's import and every
decoding included), with its default settings, and reads the held-out scores from the lungs
folder it writes.  Reports wall time, the process's CPU time, and the held-out Dice and IoU
(mean, median, worst image).  Run it with nothing else computing: the wall time is the target.

    python benchmarks/bench_lungs.py

Writes benchmarks/results/lungs.json and .md.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, machine, machine_line, write_results  # noqa: E402

TARGET_DICE, TARGET_MINUTES = 0.93, 15.0


def main() -> None:
    images, masks = SHARED / "openist" / "NORMAL", SHARED / "openist" / "masks"
    if not images.is_dir():
        sys.exit(f"needs {images} (the shared data); not found")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lungs"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "covfeat.cli", "lungs", "fit", "--images", str(images),
                            "--masks", str(masks), "--out", str(out)], capture_output=True, text=True,
                           env={**os.environ, "COVFEAT_NO_PROGRESS": "1"})
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode:
            sys.exit(f"covfeat lungs fit failed:\n{r.stderr[-2000:]}")
        info = json.loads((out / "lungs.json").read_text())
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    held = info["heldout"]
    data = {"machine": machine(), "command": "covfeat lungs fit --images openist/NORMAL --masks openist/masks",
            "settings": info.get("settings"), "wall_s": wall, "cpu_s": cpu_s, "heldout": held,
            "targets": {"dice": TARGET_DICE, "minutes": TARGET_MINUTES},
            "met": {"dice": held["dice"]["mean"] >= TARGET_DICE, "time": wall <= TARGET_MINUTES * 60}}
    d, i = held["dice"], held["iou"]
    md = "\n".join([
        "# Lung segmenter on openist (benchmarks/bench_lungs.py)", "",
        machine_line(data["machine"]), "",
        f"`{data['command']}`, default settings, {held['images']} held-out images.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| wall time | {wall / 60:.1f} min ({wall:.0f} s) | < {TARGET_MINUTES:.0f} min: "
        f"{'met' if data['met']['time'] else 'MISSED'} |",
        f"| process CPU time | {cpu_s:.0f} s | |",
        f"| held-out Dice, mean | {d['mean']:.3f} | >= {TARGET_DICE}: {'met' if data['met']['dice'] else 'MISSED'} |",
        f"| held-out Dice, median / worst | {d['median']:.3f} / {d['worst']['value']:.3f} | |",
        f"| held-out IoU, mean / worst | {i['mean']:.3f} / {i['worst']['value']:.3f} | |", ""])
    write_results("lungs", data, md)


if __name__ == "__main__":
    main()
