"""Reports: the paper's Table 2 for one or more runs, side by side, and their figures.

Every report says which weights the features came from, loudly when they were not
pretrained, prints the images and patients behind every number, and gives intervals
(patient-level for a single split, :mod:`covfeat.trust.evaluation`, named in each row; a t
interval over folds for cross-validation), the calibration of p_covid with a reliability
diagram, PPV and NPV at a prevalence, and a line when test recall missed its target.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from covfeat.core.errors import ConfigError, RunError
from covfeat.head.runs import Run
from covfeat.trust.confounding import by_class_from_keys, confounding, statement
from covfeat.trust.evaluation import predictive
from covfeat.trust.means import Mean
from covfeat.trust.metrics import COUNT_KEYS, METRIC_ROWS
from covfeat.trust.table import calibration_cells, cv_cells, footnotes, notes, single_cells, source_rows, source_text

NOT_PRETRAINED = "!!! NOT PRETRAINED: features from a random-init backbone; these numbers say nothing about ImageNet transfer !!!"


def load_run(run: str | Path) -> dict:
    """A run's metrics (and audit) as the report reads them."""
    return Run(run).as_report_dict()


def table_cells(m: dict) -> dict[str, str]:
    """One column of the side-by-side table: label -> formatted value (with interval)."""
    out = cv_cells(m) if "cv" in m else single_cells(m)
    for src, name, at, v in source_rows(m):
        out[f"{name}, {src}" + ("" if at == "argmax" else f" at {at}")] = source_text(v)
    out.update(calibration_cells(m))
    nu = {k: v for k, v in m.get("not_used", {}).items() if v}
    if nu:
        out["images not used"] = ", ".join(f"{v} {k}" for k, v in nu.items()) + " (`covfeat info CACHE` lists them)"
    nd = m.get("near_duplicates")
    if nd and nd.get("n_pairs"):
        out["near-duplicate pairs kept together"] = (f"{nd['n_pairs']} ({nd['n_pairs_across_patients']} across "
                                                      f"patient IDs)" if nd["mode"] == "group" else
                                                      f"{nd['n_pairs']} found, NOT grouped (--near-duplicates ignore)")
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
    """The lines a reader must see before the table: NOT PRETRAINED, the audit's verdicts, and
    the confounding of class and source among the test images, class by class
    (:func:`covfeat.trust.confounding.statement`: also when only one class has a source of
    its own, as cohen is COVID-19's only source once a second NORMAL source is added)."""
    out = []
    if any(not m.get("pretrained", True) for m in runs):
        out.append(NOT_PRETRAINED)
    for m in runs:
        for k, v in m.get("audit", {}).items():
            if isinstance(v, dict) and "verdict" in v:
                out.append(f"audit of {m['_name']}, {k} probe: {v['verdict']}")
    seen = {}  # one caution per distinct set of test sources, naming the runs when they differ
    for m in runs:
        seen.setdefault(json.dumps(m.get("sources_test", {}), sort_keys=True), []).append(m["_name"])
    for key, names in seen.items():
        by_class = by_class_from_keys(json.loads(key))
        said = statement(by_class, "test image")
        if said is None:
            continue
        whole = all(c.whole for c in confounding(by_class).values() if c.n)
        who = f"runs {', '.join(names)}: " if len(seen) > 1 else ""
        out.append(f"CAUTION: {who}{said}: the classes are {'' if whole else 'partly '}confounded with their source. "
                   "High scores may measure where an image came from, not the disease. Run `covfeat audit`.")
    return out


LUNG_HEADER = ["run", "images", "in-lung share of the heat [95% interval] (patients, images)",
               "lungs' share of the image", "excess [95% interval]", "reading"]


def lung_rows(ms: list[dict]) -> list[list[str]]:
    """The gradcam probe's table (``covfeat audit --lungs``), per class and per source, for every
    run whose audit has it: the mean in-lung share, the lungs' own share of the image (what an
    even heat map would put inside them) and the excess, with patient-level intervals."""
    out = []
    for m in ms:
        for r in m.get("audit", {}).get("gradcam", {}).get("table", []):
            e = Mean(**r["excess"])
            exc = (f"{e.estimate:+.2f} [{e.lo:+.2f}, {e.hi:+.2f}]" if e.has_interval else
                   f"{e.estimate:+.2f} (no interval: {e.method})")
            where = r["name"] if r["category"] == "overall" else f"{r['category']} {r['name']}"
            out.append([m["_name"], where, Mean(**r["share"]).text(), f"{r['lung_fraction']['estimate']:.2f}", exc,
                        r["reading"]])
    return out


def lung_text(ms: list[dict]) -> str:
    """The gradcam table as text with the margin it is read against, or nothing without one."""
    rows = lung_rows(ms)
    if not rows:
        return ""
    margins = sorted({m["audit"]["gradcam"]["margin"] for m in ms if m.get("audit", {}).get("gradcam", {}).get("table")})
    return ("Does the model look at the lungs? Grad-CAM's in-lung share on the test images (CLEAR: the excess over "
            f"the lungs' own share exceeds {', '.join(f'{x:.2f}' for x in margins)} on its whole interval):\n"
            + render_text(LUNG_HEADER, rows))


def reliability_panel(ax, cal: dict) -> None:
    """The reliability diagram: observed COVID-19 fraction against mean p_covid per equal-mass
    bin, with each bin's patient-level interval, for the raw and the prior-corrected p_covid."""
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for which, nm, mk in (("raw", f"raw (trained toward {cal['train_prior']:.0%})", "o"),
                          ("corrected", f"corrected to test prevalence {cal['test_prevalence']:.2f}", "s")):
        bins = cal[which]["reliability"]
        x = [b["mean_predicted"] for b in bins]
        y = [b["observed"] for b in bins]
        err = np.array([[max(b["observed"] - b["lo"], 0) for b in bins], [max(b["hi"] - b["observed"], 0) for b in bins]])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), marker=mk, capsize=3, lw=1, label=f"{nm}, ECE "
                    f"{cal[which]['ece']['value']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean p_covid in bin")
    ax.set_ylabel("observed COVID-19 fraction")
    ax.set_title("reliability (95% patient-level intervals)")
    ax.legend(fontsize=8, loc="upper left")


def plot_run(m: dict, out_dir: Path) -> list[Path]:
    """Curves (the paper's Figures 4-7), and confusion matrix, ROC, PR and the reliability
    diagram for one run."""
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
        cal = m.get("calibration")
        fig, ax = plt.subplots(1, 4 if cal else 3, figsize=(20 if cal else 15, 4.5))
        ConfusionMatrixDisplay.from_predictions(y, yhat, labels=[1, 0], display_labels=["COVID-19", "NORMAL"],
                                                ax=ax[0], colorbar=False)
        ax[0].set_title(f"{m['backbone']} confusion{tag}")
        if len(np.unique(y)) == 2:
            RocCurveDisplay.from_predictions(y, p, ax=ax[1], name=m["backbone"])
            PrecisionRecallDisplay.from_predictions(y, p, ax=ax[2], name=m["backbone"])
        ax[1].set_title(f"ROC (n={int(y.sum())} COVID-19, {int((1 - y).sum())} NORMAL){tag}")
        ax[2].set_title(f"precision-recall{tag}")
        if cal:
            reliability_panel(ax[3], cal)
        fig.tight_layout()
        files.append(out_dir / f"{m['_name']}_confusion_roc_pr.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    elif m.get("calibration"):  # cross-validation: the folds' held-out rows together
        fig, ax = plt.subplots(1, 1, figsize=(5.5, 4.5))
        reliability_panel(ax, m["calibration"])
        fig.tight_layout()
        files.append(out_dir / f"{m['_name']}_reliability.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def at_prevalence(m: dict, prevalence: float) -> dict:
    """PPV and NPV of a run at a stated COVID-19 prevalence, from its test predictions and their
    patient groups: a single split's at argmax and at its operating point; a cross-validation's at
    argmax, from the first repeat's folds together (every image once)."""
    if "cv" in m:
        folds = sorted(p for p in Path(m["_path"]).iterdir() if p.is_dir() and p.name.startswith("r0-"))
        prs = [Run(p).predictions() for p in folds]
        if not prs or any("group" not in pr for pr in prs):
            raise RunError(f"{m['_path']} has no fold predictions with patient groups, so it has no PPV and NPV at "
                           "--prevalence; fit it again with this covfeat.")
        y, p, g = (np.concatenate([pr[k] for pr in prs]) for k in ("label", "p_covid", "group"))
        return {"argmax": predictive(y, p, g, prevalence, 0.5)}
    run = Run(m["_path"])
    pr = run.predictions()
    if "group" not in pr:
        raise RunError(f"{run.path} was fitted before covfeat recorded patient groups, so it has no PPV and NPV at "
                       "--prevalence; fit it again with this covfeat.")
    at = {"argmax": 0.5, **({"operating_point": run.threshold} if "operating_point" in m else {})}
    return {k: predictive(pr["label"], pr["p_covid"], pr["group"], prevalence, t) for k, t in at.items()}


def report(runs: list[str | Path], out_dir: str | Path | None = None, prevalence: float | None = None) -> str:
    """Table 2 for every run side by side; with ``out_dir``, also Markdown, CSV, JSON and PNGs.
    PPV and NPV are at each run's test prevalence, or at ``prevalence`` (the deployment's)."""
    if prevalence is not None and not 0 < prevalence < 1:
        raise ConfigError(f"--prevalence: expected a COVID-19 share strictly between 0 and 1, got {prevalence}.")
    ms = [load_run(r) for r in runs]
    if prevalence is not None:
        ms = [{**m, "predictive": at_prevalence(m, prevalence)} for m in ms]
    header, body = side_by_side(ms)
    lines = banners(ms) + notes(ms)
    text = "\n".join(lines + ["", render_text(header, body)]) if lines else render_text(header, body)
    text += "".join(f"\n\n{f}" for f in footnotes(ms))
    lungs = lung_text(ms)
    text += f"\n\n{lungs}" if lungs else ""
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = "\n\n".join(["\n".join(f"> **{b}**" for b in lines), render_markdown(header, body), *footnotes(ms)])
        (out / "table2.md").write_text(md.strip() + "\n")
        with open(out / "table2.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(body)
        (out / "table2.json").write_text(json.dumps({"banners": banners(ms), "notes": notes(ms), "runs": [
            {k: v for k, v in m.items()} for m in ms]}, indent=2, default=str))
        files = []
        for m in ms:
            files += plot_run(m, out)
        html = write_html(ms, out, files)
        text += "\n\nWrote " + ", ".join(str(p) for p in [html, out / "table2.md", out / "table2.csv",
                                                            out / "table2.json"] + files)
    return text


HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#1d232a;line-height:1.45}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #d6dbe0;padding-bottom:4px}
.banner{padding:10px 14px;border-radius:6px;margin:8px 0;font-weight:600}
.warn{background:#fff4e5;border:1px solid #f0a030}.bad{background:#fdecec;border:1px solid #d9534f}
table{border-collapse:collapse;font-size:.92em;margin:8px 0}td,th{border:1px solid #d6dbe0;padding:4px 8px;text-align:left}
th{background:#f3f5f7}td.num{font-variant-numeric:tabular-nums}
.FLAGGED{color:#b02a2a;font-weight:700}.CONFOUNDED{color:#b02a2a;font-weight:700}.ok{color:#2a7a2a;font-weight:700}
img{max-width:100%;border:1px solid #d6dbe0;margin:6px 0}.cams img{width:260px;margin-right:8px}
.small{color:#5a6570;font-size:.88em}
"""


def _embed(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _table_html(header, body) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td class='num'>{escape(str(v))}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_html(ms: list[dict], out: Path, figures: list[Path]) -> Path:
    """One self-contained page (figures embedded): banners, Table 2 beside the paper's, the
    per-source breakdown, every audit verdict with its number, the deviations from the paper
    that apply, the figures, and Grad-CAM overlays when ``covfeat explain`` made them."""
    from html import escape

    from covfeat.trust.deviations import applying
    from covfeat.trust.paper import paper_table2

    paper = paper_table2()
    parts = [f"<h1>covfeat report: {escape(', '.join(m['_name'] for m in ms))}</h1>",
             f"<p class='small'>{len(ms)} run(s): " + "; ".join(
                 f"{escape(m['backbone'])}, weights {escape(str(m['weights']['label']))}" for m in ms) + "</p>"]
    for b in banners(ms) + notes(ms):
        parts.append(f"<div class='banner {'bad' if b.startswith('!!!') else 'warn'}'>{escape(b)}</div>")

    parts.append("<h2>Table 2, measured beside the paper</h2>")
    header = ["metric"]
    for m in ms:
        header += [f"{m['backbone']} paper", f"{m['_name']} measured"]
    cols = [table_cells(m) for m in ms]
    body = []
    for label, key in METRIC_ROWS:
        row = [label]
        for m, c in zip(ms, cols):
            pv = paper.get(m["backbone"], {}).get(key)
            row += ["" if pv is None else (str(pv) if key in COUNT_KEYS else f"{pv:.2f}"), c.get(label, "")]
        body.append(row)
    parts.append(_table_html(header, body))
    parts += [f"<p class='small'>{escape(f)}.</p>" for f in footnotes(ms)]
    if any("cv" in m for m in ms):
        parts.append("<p class='small'>Cross-validation: " + escape(next(m["cv"]["interval"] for m in ms if "cv" in m))
                     + ".</p>")

    src_rows = [[m["_name"], src, name, at, source_text(v)] for m in ms for src, name, at, v in source_rows(m)]
    parts.append("<h2>Per source (test images)</h2>")
    parts.append(_table_html(["run", "source", "metric", "at", "value [95% interval] (images, patients; interval)"],
                             src_rows) if src_rows else "<p>No per-source breakdown in these runs.</p>")

    parts.append("<h2>Audit</h2>")
    audited = False
    for m in ms:
        for k, v in m.get("audit", {}).items():
            if isinstance(v, dict) and "verdict" in v:
                audited = True
                status = v.get("status", "")
                cls = status if status in ("FLAGGED", "CONFOUNDED") else "ok"
                parts.append(f"<p><b>{escape(m['_name'])}, {escape(k)} probe</b>: <span class='{cls}'>"
                             f"{escape(status)}</span> &mdash; {escape(v['verdict'])}</p>")
    if not audited:
        parts.append("<p>Not audited yet: run <code>covfeat audit --run RUN</code>, then this report again.</p>")
    lung = lung_rows(ms)
    if lung:
        parts.append("<h2>Does the model look at the lungs?</h2><p class='small'>Grad-CAM on the test images, "
                     "measured against the lung segmenter's mask (<code>covfeat audit --lungs</code>): the share of "
                     "the heat inside the lungs, beside the lungs' own share of the image, which an even heat map "
                     "would put inside them. Intervals resample patients.</p>")
        parts.append(_table_html(LUNG_HEADER, lung))

    parts.append("<h2>How these runs differ from the paper</h2>")
    for m in ms:
        devs = applying(Run(m["_path"]).config)
        parts.append(f"<p><b>{escape(m['_name'])}</b></p><ul>" +
                     "".join(f"<li>{escape(d.text)}</li>" for d in devs) + "</ul>")

    parts.append("<h2>Figures</h2>")
    parts += [f"<img alt='{escape(f.name)}' src='{_embed(f)}'>" for f in figures]
    cal_rows = [[m["_name"], k, v] for m in ms for k, v in calibration_cells(m).items()]
    if cal_rows:
        parts.append("<h2>Calibration and prevalence</h2>")
        parts.append("<p class='small'>A SMOTE- or class-weight-balanced head is trained toward a prior of "
                     "about 50% COVID-19: its raw p_covid is a probability only for such a population. The "
                     "corrected p_covid moves it to the test prevalence by Bayes' rule on the odds. The "
                     "reliability diagram (the last panel of each run's figure above) shows both.</p>")
        parts.append(_table_html(["run", "number", "value [95% interval] (images, patients; interval)"], cal_rows))
    cams = [p for m in ms for p in sorted((Path(m["_path"]) / "gradcam").glob("*_gradcam.png"))[:6]]
    if cams:
        parts.append("<h2>Grad-CAM</h2><div class='cams'>" +
                     "".join(f"<img alt='{escape(p.name)}' title='{escape(p.name)}' src='{_embed(p)}'>" for p in cams)
                     + "</div>")
    html = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>covfeat report</title>"
            f"<style>{HTML_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    path = Path(out) / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
