"""The model card that travels with an exported model: ``model_card.md`` and ``model_card.json``.

A model file says nothing of where its numbers came from; a deployer who finds it alone
should still read what it was trained on (sources, images and patients per class and split),
how it did on its test images (patient-level intervals, per source), how far its
probabilities are calibrated and at which prevalence, its threshold, every audit verdict,
how it differs from the paper, and what it must not be used for.  The card follows the
items of TRIPOD+AI (Collins et al. 2024, BMJ 385:e078378) and CLAIM (Mongan et al. 2020;
2024 update) that a model file can answer (:data:`CHECKLISTS`); the study-level items (ethics,
funding, recruitment) are the user's.  :func:`warning` is the card's one line, which
``predict`` prints when the run is NOT PRETRAINED or its audit flagged it.

Every number is computed with :mod:`covfeat.trust` from the run's own files and cache; the
patient groups are the split's (patients joined by near-duplicates).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from covfeat.core import __version__
from covfeat.core.fsutil import atomic_file
from covfeat.head.runs import Run, write_json_atomic
from covfeat.head.split import TEST, TRAIN, VAL, patient_groups
from covfeat.trust.calibration import brier, ece, predictive_values
from covfeat.trust.confounding import statement
from covfeat.trust.deviations import applying
from covfeat.trust.intervals import clusters, estimate
from covfeat.use.prevalence import PriorCorrection

CLASSES = ((1, "COVID-19"), (0, "NORMAL"))
FLAGGING = ("FLAGGED", "CONFOUNDED")  # audit statuses that put the run's numbers in doubt
TEST_METRICS = ("covid_recall", "specificity", "covid_precision", "accuracy", "roc_auc", "pr_auc")

# (checklist, item, what the card answers it with): only the items a model file can answer.
CHECKLISTS = [
    ("TRIPOD+AI", "3b", "target population and intended users: intended_use"),
    ("TRIPOD+AI", "5a", "sources of data: training_data.sources"),
    ("TRIPOD+AI", "13", "class imbalance and recalibration of the predictions: prevalence"),
    ("TRIPOD+AI", "15", "model output and how its threshold was chosen: threshold"),
    ("TRIPOD+AI", "20a", "participants (images and patients) with and without the outcome: training_data"),
    ("TRIPOD+AI", "23a", "performance with confidence intervals, per source: test_results, calibration"),
    ("TRIPOD+AI", "26", "limitations: limits"),
    ("CLAIM", "data sources", "training_data.sources"),
    ("CLAIM", "partitions: how data were assigned, patients kept whole", "training_data.split"),
    ("CLAIM", "performance metrics with their statistical uncertainty", "test_results, calibration"),
    ("CLAIM", "intended use and clinical role", "intended_use, limits"),
]


def flagged_probes(run: Run) -> list[str]:
    """Names of the audit's probes whose status puts the run's numbers in doubt."""
    return [k for k, v in (run.audit or {}).items()
            if isinstance(v, dict) and str(v.get("status", "")).startswith(FLAGGING)]


def warning(run: Run) -> str | None:
    """The card's one line, when the run is NOT PRETRAINED or its audit flagged it; else None."""
    parts = [] if run.pretrained else ["this model is NOT PRETRAINED (random-init backbone)"]
    flagged = flagged_probes(run)
    if flagged:
        parts.append("its audit flagged the " + ", ".join(flagged) + " probe" + "s" * (len(flagged) > 1))
    if not parts:
        return None
    return "WARNING: research use only, not a diagnostic device; " + "; ".join(parts) + ". See its model card."


def _counts(man, rows, label) -> dict:
    sel = rows[man["label"][rows] == label]
    return {"images": int(len(sel)), "patients": int(len(set(man["patient_id"][sel].tolist())))}


def training_data(run: Run, fc) -> dict:
    """Images and patients per source, class and split (patients by their recorded ids)."""
    man, split = fc.manifest, run.split()
    used = np.flatnonzero((split >= 0) & fc.has_features())
    out = {}
    for s in sorted(set(man["source"][used].tolist())):
        rows = used[man["source"][used] == s]
        out[s] = {part: {name: _counts(man, rows[split[rows] == k], lab) for lab, name in CLASSES}
                  for k, part in ((TRAIN, "train"), (VAL, "validation"), (TEST, "test"))}
    return {"sources": out, "split": run.config.get("split", {}), "confounding": confounding(out)}


def confounding(sources: dict) -> list[str]:
    """The class-source confound in words (:func:`covfeat.trust.confounding.statement`, the
    sentence the report's banner and the source probe say), or nothing when there is none."""
    by_class = {name: {s: sum(p[name]["images"] for p in v.values()) for s, v in sources.items()}
                for _, name in CLASSES}
    said = statement(by_class)
    return [said] if said else []


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else float(v)  # JSON has no NaN


def _interval(iv) -> dict:
    return {"estimate": _finite(iv.estimate), "lo": _finite(iv.lo), "hi": _finite(iv.hi), "method": iv.method,
            "images": list(iv.n_images), "patient_groups": list(iv.n_groups)}


def test_results(run: Run, fc) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Overall and per-source test numbers at the run's threshold, with patient-level intervals;
    also the test rows' labels, raw p_covid and groups."""
    pred = run.predictions()
    y, p = pred["label"], pred["p_covid"]
    groups = patient_groups(fc, pred["row"], run.fit_config().split.near_duplicates)
    thr = run.threshold
    cl = clusters(y, groups)
    overall = {k: _interval(estimate(cl, p, k, thr).interval()) for k in TEST_METRICS}
    per_source = {}
    for s in sorted(set(pred["source"].tolist())):
        m = pred["source"] == s
        cs = clusters(y[m], groups[m])
        per_source[s] = {k: _interval(estimate(cs, p[m], k, thr).interval())
                         for k, lab in (("covid_recall", 1), ("specificity", 0)) if (y[m] == lab).any()}
    return {"threshold": thr, "overall": overall, "by_source": per_source}, y, p, groups


def calibration(y, p, groups, corr: PriorCorrection) -> dict:
    """Brier score and ECE on the test images, of the head's own p_covid and of the corrected one."""
    out = {"test_covid_share": float(np.mean(y))}
    for name, q in (("raw", p), ("corrected", corr.apply(p))):
        out[name] = {"brier": _interval(brier(y, q, groups)), "ece": _interval(ece(y, q, groups))}
    out["note"] = (f"on the run's test images (COVID-19 share {np.mean(y):.3f}); the corrected p_covid assumes "
                   f"prevalence {corr.target:.3f}, so its calibration here is a fair test only near that share.")
    return out


def model_card(run: Run, corr: PriorCorrection, model_path: str | Path | None = None) -> dict:
    """Every field of the card, JSON-ready."""
    from covfeat.store.reader import open_cache

    fc = open_cache(run.cache_info["path"])
    results, y, p, groups = test_results(run, fc)
    thr = run.threshold
    ppv, npv = predictive_values(y, p, groups, corr.target, thr)
    target = run.config.get("target_recall")
    data = training_data(run, fc)
    audit = run.audit
    return {
        "model": {"file": None if model_path is None else str(model_path), "run": str(run.path),
                  "backbone": run.backbone, "weights": run.metrics.get("weights", {}).get("label"),
                  "pretrained": run.pretrained, "covfeat": __version__, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "input": "224 x 224 RGB in [0, 255], decoded and resized as Predictor(run).pipeline.decode does",
                  "outputs": "probabilities (p_normal, p_covid, corrected as in 'prevalence'), covid (1 at the "
                             "threshold), probabilities_raw (the head's own; an inner layer)"},
        "warning": warning(run),
        "intended_use": ["Research on transfer learning and shortcut learning in chest radiographs: COVID-19 vs "
                         "NORMAL, frontal views, from the sources below.",
                         "Not a medical device and not a diagnostic test: not for diagnosis, triage, screening or "
                         "any decision about a patient."],
        "limits": [*(f"Source confound: {c}; the model may tell sources apart, not disease." for c in
                     data["confounding"]),
                   "Test numbers are internal: the test images come from the same sources as the training "
                   "images; run `covfeat audit --external` on another source before trusting them elsewhere.",
                   f"Probabilities assume a COVID-19 prevalence of {corr.target:.3f} ({corr.target_from}); at "
                   "another prevalence, export again with --prevalence.",
                   *(["NOT PRETRAINED: features from a random-init backbone; the numbers say nothing about "
                      "ImageNet transfer."] if not run.pretrained else [])],
        "training_data": data,
        "test_results": results,
        "calibration": calibration(y, p, groups, corr),
        "prevalence": {**corr.as_dict(), "text": corr.describe()},
        "threshold": {"raw": thr, "corrected": corr.threshold(thr), "prevalence": corr.target,
                      "rule": "argmax (p_covid >= 0.5)" if target is None else
                      f"chosen on validation images for COVID-19 recall {target:g}",
                      "ppv": _interval(ppv), "npv": _interval(npv)},
        "audit": "not audited" if audit is None else {
            k: {"status": v.get("status"), "verdict": v.get("verdict")} for k, v in audit.items()
            if isinstance(v, dict) and "verdict" in v},
        "deviations_from_paper": [d.text for d in applying(run.config)],
        "checklists": [{"checklist": c, "item": i, "answered_by": a} for c, i, a in CHECKLISTS],
    }


def _num(d: dict) -> str:
    if d["estimate"] is None:
        return "n/a"
    ci = "" if d["lo"] is None else f" [{d['lo']:.2f}, {d['hi']:.2f}]"
    (i1, i0), (g1, g0) = d["images"], d["patient_groups"]
    return f"{d['estimate']:.3f}{ci} ({d['method']}; {i1} COVID-19 + {i0} NORMAL images, {g1} + {g0} patient groups)"


def render_markdown(card: dict) -> str:
    m, t = card["model"], card["threshold"]
    out = [f"# Model card: covfeat {m['backbone']} ({Path(m['run']).name})", ""]
    if card["warning"]:
        out += [f"**{card['warning']}**", ""]
    out += [f"- backbone: {m['backbone']}; weights: {m['weights']}; covfeat {m['covfeat']}; written {m['written']}",
            f"- input: {m['input']}", f"- outputs: {m['outputs']}", "", "## Intended use",
            *(f"- {x}" for x in card["intended_use"]), "", "## Limits", *(f"- {x}" for x in card["limits"]), "",
            "## Training data (images / patients)", "",
            "| source | split | COVID-19 | NORMAL |", "|---|---|---|---|"]
    for s, parts in card["training_data"]["sources"].items():
        for part, c in parts.items():
            out.append(f"| {s} | {part} | {c['COVID-19']['images']} / {c['COVID-19']['patients']} | "
                       f"{c['NORMAL']['images']} / {c['NORMAL']['patients']} |")
    out += ["", f"Split settings: `{json.dumps(card['training_data']['split'])}`", "",
            f"## Test results at the threshold {t['raw']:.4f}", ""]
    out += [f"- {k}: {_num(v)}" for k, v in card["test_results"]["overall"].items()]
    for s, v in card["test_results"]["by_source"].items():
        out += [f"- {s}, {k}: {_num(e)}" for k, e in v.items()]
    c = card["calibration"]
    out += ["", "## Calibration", "", f"- {c['note']}"]
    out += [f"- {which} p_covid: Brier {_num(c[which]['brier'])}; ECE {_num(c[which]['ece'])}"
            for which in ("raw", "corrected")]
    out += ["", "## Threshold and prevalence", "", f"- {card['prevalence']['text']}",
            f"- rule: {t['rule']}; threshold {t['raw']:.6f} on the raw p_covid, {t['corrected']:.6f} on the "
            f"corrected p_covid (the same cut)",
            f"- at prevalence {t['prevalence']:.3f}: PPV {_num(t['ppv'])}; NPV {_num(t['npv'])}", "", "## Audit", ""]
    audit = card["audit"]
    out += (["- not audited: run `covfeat audit --run RUN`, then export again."] if audit == "not audited" else
            [f"- {k}: {v['status']}: {v['verdict']}" for k, v in audit.items()])
    out += ["", "## Deviations from the paper", "", *(f"- {d}" for d in card["deviations_from_paper"]), "",
            "## Reporting checklists", "",
            "Items of TRIPOD+AI and CLAIM this card answers (the study-level items are the user's):", ""]
    out += [f"- {x['checklist']} {x['item']}: {x['answered_by']}" for x in card["checklists"]]
    return "\n".join(out) + "\n"


def serving_contract(run: Run, corr: PriorCorrection, fmt: str, inputs: dict, outputs: dict,
                     load: str, **extra) -> dict:
    """What a server needs of an export and nothing of covfeat: its ``format``, ``inputs`` (per
    signature: the tensor, its pixels and the decoding before them), ``outputs``, the threshold
    (raw, and in the corrected units of p_covid), the prevalence and where it comes from, the
    training prior, the backbone and its weights' identity, and NOT PRETRAINED where it applies.
    ``serving.json`` holds it, and the card's ``serving`` section."""
    thr = run.threshold
    weights = run.cache_info.get("weights", {})
    return {"format": fmt, "load": load, "inputs": inputs, "outputs": outputs,
            "threshold": {"raw": thr, "corrected": corr.threshold(thr),
                          "rule": "covid = 1 when p_covid_raw >= threshold (raw): covfeat predict's label rule; "
                                  "the same cut as p_covid >= the corrected threshold"},
            "prevalence": {"target": corr.target, "from": corr.target_from, "text": corr.describe()},
            "training_prior": corr.train_prior,
            "backbone": {"name": run.backbone, "weights": weights, "seed": run.extract_config.get("seed"),
                         "pretrained": run.pretrained},
            **({} if run.pretrained else {"warning": "NOT PRETRAINED: random-init backbone (--weights none); its "
                                                     "numbers say nothing about ImageNet transfer."}),
            "covfeat": __version__, **extra}


def render_serving(sv: dict) -> list[str]:
    """The card's serving section in Markdown."""
    out = ["", f"## Serving contract ({sv['format']})", "", f"- load: `{sv['load']}`"]
    out += [f"- input `{k}`: `{json.dumps(v)}`" for k, v in sv["inputs"].items()]
    out += [f"- output `{k}`: {v}" for k, v in sv["outputs"].items()]
    t = sv["threshold"]
    out += [f"- threshold {t['raw']:.6f} on p_covid_raw ({t['corrected']:.6f} on p_covid); {sv['prevalence']['text']}",
            f"- backbone {sv['backbone']['name']}, weights `{json.dumps(sv['backbone']['weights'])}`"
            + ("" if sv["backbone"]["pretrained"] else "; NOT PRETRAINED")]
    return out


def write_card(run: Run, corr: PriorCorrection, model_path: str | Path,
               serving: dict | None = None) -> tuple[Path, Path]:
    """``model_card.md`` and ``model_card.json`` beside ``model_path``, with the export's serving
    contract (:func:`serving_contract`) as their ``serving`` section when given."""
    card = model_card(run, corr, model_path)
    if serving is not None:
        card["serving"] = serving
    folder = Path(model_path).parent
    write_json_atomic(folder / "model_card.json", card)
    md = folder / "model_card.md"
    with atomic_file(md) as tmp:
        text = render_markdown(card)
        if serving is not None:
            text += "\n".join(render_serving(serving)) + "\n"
        tmp.write_text(text, encoding="utf-8")
    return md, folder / "model_card.json"
