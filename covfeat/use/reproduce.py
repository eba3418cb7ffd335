"""The paper in one command: extract, fit-head and report for the four backbones, and the
published Table 2 beside the measured one, cell by cell with the difference.

The backbones are ranked by their validation ROC AUC (their cross-validated mean with
``--folds``), never by their test numbers, and the chosen one's test numbers are reported;
backbone against backbone is the paired difference on the same test rows, with Holm's
correction across the pairs (:mod:`covfeat.use.select`).

Each stage is cached (extraction by its key, each head run by the cache key and the head
settings), so an interrupted reproduction resumes where it stopped; with ``--folds`` only
the extraction resumes (cross-validation names its own folder) and the heads, seconds each,
are fitted again.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

from covfeat.core.errors import DataError
from covfeat.core.fingerprint import fingerprint
from covfeat.extraction.backbones import list_backbones
from covfeat.extraction.config import ExtractConfig
from covfeat.extraction.run import extract
from covfeat.head.config import FitConfig
from covfeat.head.fit import fit_head
from covfeat.head.runs import Run, is_finished
from covfeat.store.reader import open_cache
from covfeat.trust.metrics import COUNT_KEYS
from covfeat.trust.paper import CELLS, PAPER_TEST_COUNTS, paper_table2
from covfeat.use.report import NOT_PRETRAINED, banners, load_run, render_text, report, table_cells
from covfeat.use.select import paired_differences, ranking


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
            m = ms[name]
            got = m["cv"][key]["mean"] if "cv" in m else m["argmax"].get(key)
            want = paper[name].get(key, PAPER_TEST_COUNTS.get(key))
            if key in COUNT_KEYS and "cv" in m:  # a mean over folds
                row += [str(want), f"{got:.1f}", f"{got - want:+.1f}"]
            elif key in COUNT_KEYS:
                row += [str(want), str(got), f"{got - want:+d}"]
            else:
                row += [f"{want:.2f}", f"{got:.2f}", f"{got - want:+.2f}"]
        body.append(row)
    notes = banners(list(ms.values()))
    notes.append("The paper tested 42 COVID-19 and 282 NORMAL images; count cells (TP, FP, FN, TN) only compare "
                 "directly when the test sets have the same size.")
    return "\n".join(notes + ["", render_text(header, body)])


def selection(runs: dict[str, Path], metric: str = "roc_auc") -> str:
    """Which backbone validation (or cross-validation) chooses, that one's test numbers, and
    every pair of backbones compared on the same test rows (paired, Holm-adjusted)."""
    cv = all(Run(r).is_cv for r in runs.values())
    on = "cv" if cv else "validation"
    where = "cross-validated mean" if cv else "validation images"
    lines = [f"Backbones ranked by {metric} on their {where} (test rows are not used to choose):"]
    try:
        ranked = ranking(list(runs.values()), metric, on)
    except DataError as exc:
        return "\n".join(lines + [f"  not ranked: {exc}"])
    name_of = {Path(r): n for n, r in runs.items()}
    for i, (path, iv) in enumerate(ranked, 1):
        ci = "" if math.isnan(iv.lo) else f" [{iv.lo:.2f}, {iv.hi:.2f}]"
        lines.append(f"  {i}. {name_of[path]}: {iv.estimate:.3f}{ci} ({iv.method}"
                     + ("" if cv else f"; {sum(iv.n_images)} images, {sum(iv.n_groups)} patient groups") + ")")
    best = ranked[0][0]
    cells = table_cells(load_run(best))
    shown = [k for k in ("COVID-19 recall", "specificity", "ROC AUC", "accuracy") if k in cells]
    lines.append(f"Chosen: {name_of[best]}; its test numbers: " + "; ".join(f"{k} {cells[k]}" for k in shown))
    if cv:
        lines.append("With --folds every fold has its own test rows: no paired test between backbones.")
        return "\n".join(lines)
    pairs = paired_differences(runs, metric)
    if pairs:
        lines.append(f"Backbone vs backbone on the same test rows: paired difference of {metric} (patient bootstrap), "
                     "p-values Holm-adjusted across the pairs:")
        lines += [f"  {d['a']} - {d['b']}: {d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}], p {d['p_value']:.3f}, "
                  f"Holm p {d['holm_p']:.3f}" for d in pairs]
    return "\n".join(lines)


def full_report(runs: dict[str, Path], out: Path) -> str:
    text = compare(runs) + "\n\n" + selection(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_vs_measured.txt").write_text(text + "\n")
    return text + "\n\n" + report(list(runs.values()), out)


__all__ = ["reproduce", "compare", "selection", "paper_table2", "NOT_PRETRAINED"]
