"""The paper in one command: extract, fit-head and report for the four backbones, and the
published Table 2 beside the measured one, cell by cell with the difference.

Each stage is cached (extraction by its key, each head run by the cache key and the head
settings), so an interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from covfeat.core.fingerprint import fingerprint
from covfeat.extraction.backbones import list_backbones
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.run import extract
from covfeat.head.config import FitConfig
from covfeat.head.fit import fit_head
from covfeat.head.runs import is_finished
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import COUNT_KEYS
from covfeat.trust.paper import CELLS, PAPER_TEST_COUNTS, paper_table2
from covfeat.use.report import NOT_PRETRAINED, banners, load_run, render_text, report


def _fit_tag(fit: FitConfig) -> str:
    return fingerprint(fit.run_dict(), length=8)


def reproduce(sources, base: ExtractConfig, fit: FitConfig, cache_dir="cache", runs_dir="runs",
              backbones: list[str] | None = None, progress: bool = True) -> tuple[dict[str, Path], str]:
    """Run (or resume) the reproduction; returns the run folder per backbone and the comparison text."""
    runs = {}
    for name in backbones or list_backbones():
        print(f"== {name}", file=sys.stderr, flush=True)
        cache = extract(sources, replace(base, backbone=name), cache_dir, progress=progress)
        fc = open_cache(cache)
        tag = f"reproduce-{name}-{fc.content_hash()}-{_fit_tag(fit)}"
        run = Path(runs_dir) / tag
        if is_finished(run):
            print(f"Head run already finished: {run}", file=sys.stderr)
        else:
            run = fit_head(cache, fit, runs_dir, name=tag, progress=progress, fc=fc)
        runs[name] = run
    return runs, compare(runs)


def report_folder(runs_dir: str | Path, runs: dict[str, Path]) -> Path:
    """Where the side-by-side report of a reproduction goes: named by its runs' keys."""
    return Path(runs_dir) / f"reproduce-report-{'-'.join(sorted(Path(p).name.split('-')[-1] for p in runs.values()))}"


def compare(runs: dict[str, Path]) -> str:
    """Paper vs measured, cell by cell, for every backbone."""
    paper = paper_table2()
    ms = {name: load_run(run) for name, run in runs.items()}
    header = ["metric"]
    for name in runs:
        header += [f"{name} paper", "measured", "diff"]
    body = []
    for label, key in CELLS:
        row = [label]
        for name in runs:
            got = ms[name]["argmax"].get(key)
            want = paper[name].get(key, PAPER_TEST_COUNTS.get(key))
            if key in COUNT_KEYS:
                row += [str(want), str(got), f"{got - want:+d}"]
            else:
                row += [f"{want:.2f}", f"{got:.2f}", f"{got - want:+.2f}"]
        body.append(row)
    notes = banners(list(ms.values()))
    notes.append("The paper tested 42 COVID-19 and 282 NORMAL images; count cells (TP, FP, FN, TN) only compare "
                 "directly when the test sets have the same size.")
    return "\n".join(notes + ["", render_text(header, body)])


def full_report(runs: dict[str, Path], out: Path) -> str:
    text = compare(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_vs_measured.txt").write_text(text + "\n")
    return text + "\n\n" + report(list(runs.values()), out)


__all__ = ["reproduce", "compare", "paper_table2", "NOT_PRETRAINED"]
