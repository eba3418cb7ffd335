"""The paper in one command: extract, fit-head and report for the four backbones, and the
published Table 2 beside the measured one, cell by cell with the difference.

Each stage is cached (extraction by its key, each head run by the cache key and the head
settings), so an interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

from .backbones import list_backbones
from .cache import open_cache
from .extract import ExtractConfig, extract
from .head import HeadConfig
from .report import NOT_PRETRAINED, banners, load_run, render_text, report
from .train import fit_head

CELLS = [("COVID-19 precision", "covid_precision"), ("COVID-19 recall", "covid_recall"), ("COVID-19 f1", "covid_f1"),
         ("NORMAL precision", "normal_precision"), ("NORMAL recall", "normal_recall"), ("NORMAL f1", "normal_f1"),
         ("TP", "TP"), ("FP", "FP"), ("FN", "FN"), ("TN", "TN"), ("accuracy", "accuracy")]


def paper_table2() -> dict:
    """The published Table 2 (packaged data)."""
    return json.loads(resources.files("covfeat").joinpath("data/paper_table2.json").read_text())


def _head_tag(cfg: HeadConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode()).hexdigest()[:8]


def reproduce(sources, base: ExtractConfig, head: HeadConfig, cache_dir="cache", runs_dir="runs",
              backbones: list[str] | None = None, progress: bool = True) -> tuple[dict[str, Path], str]:
    """Run (or resume) the reproduction; returns the run folder per backbone and the comparison text."""
    runs = {}
    for name in backbones or list_backbones():
        print(f"== {name}", file=sys.stderr, flush=True)
        cache = extract(sources, replace(base, backbone=name), cache_dir, progress=progress)
        fc = open_cache(cache)
        tag = f"reproduce-{name}-{fc.content_hash()}-{_head_tag(head)}"
        run = Path(runs_dir) / tag
        if (run / "metrics.json").is_file():
            print(f"Head run already finished: {run}", file=sys.stderr)
        else:
            run = fit_head(cache, head, runs_dir, name=tag, progress=progress, fc=fc)
        runs[name] = run
    return runs, compare(runs)


def compare(runs: dict[str, Path]) -> str:
    """Paper vs measured, cell by cell, for every backbone."""
    paper = paper_table2()
    ms = {name: load_run(run) for name, run in runs.items()}
    header = ["metric"]
    for name in runs:
        header += [f"{name} paper", "measured", "diff"]
    body = []
    for label, key in CELLS + [("test COVID-19 images", "n_covid"), ("test NORMAL images", "n_normal")]:
        row = [label]
        for name in runs:
            got = ms[name]["argmax"].get(key)
            want = paper[name].get(key, {"n_covid": 42, "n_normal": 282}.get(key))
            if key in ("TP", "FP", "FN", "TN", "n_covid", "n_normal"):
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_vs_measured.txt").write_text(text + "\n")
    return text + "\n\n" + report(list(runs.values()), out)


__all__ = ["reproduce", "compare", "paper_table2", "NOT_PRETRAINED"]
