"""Reports: the paper's Table 2 for one or more runs, side by side, and their figures.

Every report says which weights the features came from, loudly when they were not
pretrained, prints the test count of each class beside the metrics, and gives intervals
(Wilson for a single split, a t interval over folds for cross-validation).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .metrics import COUNT_KEYS, METRIC_ROWS
from .runs import Run

NOT_PRETRAINED = "!!! NOT PRETRAINED: features from a random-init backbone; these numbers say nothing about ImageNet transfer !!!"

def load_run(run: str | Path) -> dict:
    """A run's metrics (and audit) as the report reads them."""
    return Run(run).as_report_dict()


def _fmt(key: str, v, ci=None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if key in COUNT_KEYS:
        return str(int(round(v))) if float(v).is_integer() else f"{v:.1f}"
    s = f"{v:.2f}"
    if ci is not None and not any(math.isnan(c) for c in ci):
        s += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return s


def _fraction(a: dict, key: str) -> str:
    """The counts behind a proportion, so the test size is seen beside every metric."""
    tp, fp, fn, tn = (a.get(k, 0) for k in ("TP", "FP", "FN", "TN"))
    parts = {"covid_recall": (tp, tp + fn), "covid_precision": (tp, tp + fp), "normal_recall": (tn, tn + fp),
             "normal_precision": (tn, tn + fn), "specificity": (tn, tn + fp), "accuracy": (tp + tn, tp + fp + fn + tn)}
    if key not in parts:
        return ""
    k, n = parts[key]
    return f"{k}/{n}"


def table_cells(m: dict) -> dict[str, str]:
    """One column of the side-by-side table: label -> formatted value (with interval)."""
    out = {}
    if "cv" in m:
        cv = m["cv"]
        for label, key in METRIC_ROWS:
            if key in cv:
                mean, lo, hi = cv[key]
                out[label] = _fmt(key, mean, None if key in COUNT_KEYS else (lo, hi))
        out["folds"] = f"{cv['n_folds']} folds x {cv['n_repeats']} repeats (mean [95% t interval])"
    else:
        a = m["argmax"]
        ci = a.get("ci", {})
        for label, key in METRIC_ROWS:
            out[label] = _fmt(key, a.get(key), ci.get(key))
            frac = _fraction(a, key)
            if frac and out[label] != "n/a":
                out[label] += f" ({frac})"
        op = m.get("operating_point")
        if op:
            t = op["test"]
            out[f"at recall target {op['target_recall']:.2f}: threshold"] = f"{op['threshold']:.3f}"
            for k, nm in (("covid_recall", "recall"), ("covid_precision", "precision"), ("specificity", "specificity")):
                out[f"at recall target {op['target_recall']:.2f}: test {nm}"] = _fmt(k, t[k], t["ci"].get(k))
    out["weights"] = "NOT PRETRAINED" if not m.get("pretrained", True) else m["weights"]["label"]
    for k, v in m.get("audit", {}).items():
        if isinstance(v, dict) and "status" in v:
            out[f"audit: {k} probe"] = v["status"]
    return out


def side_by_side(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = [table_cells(m) for m in runs]
    labels = []
    for c in cols:
        for k in c:
            if k not in labels:
                labels.append(k)
    header = ["metric"] + [f"{m['backbone']} ({m['_name']})" for m in runs]
    body = [[lab] + [c.get(lab, "") for c in cols] for lab in labels]
    return header, body


def render_text(header, body) -> str:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def render_markdown(header, body) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in body]
    return "\n".join(out)


def banners(runs: list[dict]) -> list[str]:
    out = []
    if any(not m.get("pretrained", True) for m in runs):
        out.append(NOT_PRETRAINED)
    srcs = set()
    for m in runs:
        srcs |= {k.split("/")[0] for k in m.get("sources_test", {})}
    by_class = {}
    for m in runs:
        for k in m.get("sources_test", {}):
            s, c = k.split("/")
            by_class.setdefault(c, set()).add(s)
    for m in runs:
        for k, v in m.get("audit", {}).items():
            if isinstance(v, dict) and "verdict" in v:
                out.append(f"audit of {m['_name']}, {k} probe: {v['verdict']}")
    if len(by_class) == 2 and all(len(v) == 1 for v in by_class.values()) and by_class["COVID-19"] != by_class["NORMAL"]:
        out.append(f"CAUTION: every COVID-19 test image comes from {', '.join(by_class['COVID-19'])} and every NORMAL one "
                   f"from {', '.join(by_class['NORMAL'])}: the classes are confounded with their source. High scores "
                   "may measure where an image came from, not the disease. Run `covfeat audit`.")
    return out


def plot_run(m: dict, out_dir: Path) -> list[Path]:
    """Curves (the paper's Figures 4-7), confusion matrix, ROC and PR for one run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    run = Run(m["_path"])
    tag = "" if m.get("pretrained", True) else "  [NOT PRETRAINED]"
    files = []
    hist = run.history()
    if hist:
        ep = [int(h["epoch"]) for h in hist]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for i, key in enumerate(("accuracy", "loss")):
            ax[i].plot(ep, [float(h[key]) for h in hist], label=f"training {key}")
            ax[i].plot(ep, [float(h["val_" + key]) for h in hist], label=f"validation {key}")
            ax[i].set_xlabel("epoch")
            ax[i].set_title(f"{m['backbone']}: {key}{tag}")
            ax[i].legend()
        fig.tight_layout()
        files.append(out_dir / f"{m['_name']}_curves.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    if run.has_predictions:
        pr = run.predictions()
        y, p, yhat = pr["label"], pr["p_covid"], pr["pred"]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
        ConfusionMatrixDisplay.from_predictions(y, yhat, labels=[1, 0], display_labels=["COVID-19", "NORMAL"],
                                                ax=ax[0], colorbar=False)
        ax[0].set_title(f"{m['backbone']} confusion{tag}")
        if len(np.unique(y)) == 2:
            RocCurveDisplay.from_predictions(y, p, ax=ax[1], name=m["backbone"])
            PrecisionRecallDisplay.from_predictions(y, p, ax=ax[2], name=m["backbone"])
        ax[1].set_title(f"ROC (n={int(y.sum())} COVID-19, {int((1 - y).sum())} NORMAL){tag}")
        ax[2].set_title(f"precision-recall{tag}")
        fig.tight_layout()
        files.append(out_dir / f"{m['_name']}_confusion_roc_pr.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def report(runs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Table 2 for every run side by side; with ``out_dir``, also Markdown, CSV, JSON and PNGs."""
    ms = [load_run(r) for r in runs]
    header, body = side_by_side(ms)
    text = "\n".join(banners(ms) + ["", render_text(header, body)]) if banners(ms) else render_text(header, body)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = "\n\n".join(["\n".join(f"> **{b}**" for b in banners(ms)), render_markdown(header, body)])
        (out / "table2.md").write_text(md.strip() + "\n")
        with open(out / "table2.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(body)
        (out / "table2.json").write_text(json.dumps({"banners": banners(ms), "runs": [
            {k: v for k, v in m.items()} for m in ms]}, indent=2, default=str))
        files = []
        for m in ms:
            files += plot_run(m, out)
        text += "\n\nWrote " + ", ".join(str(p) for p in [out / "table2.md", out / "table2.csv", out / "table2.json"] + files)
    return text
