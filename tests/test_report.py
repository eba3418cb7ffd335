"""Report numbers against hand-counted confusion matrices, and the report files a user gets."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.trust.metrics import classification_metrics, threshold_for_recall, wilson

runner = CliRunner()


def test_table2_block_against_a_hand_count():
    # 10 COVID-19 (label 1) and 20 NORMAL; 8 COVID-19 found, 3 NORMAL called COVID-19
    y = np.array([1] * 10 + [0] * 20)
    p = np.array([0.9] * 8 + [0.2] * 2 + [0.7] * 3 + [0.1] * 17)
    m = classification_metrics(y, p)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (8, 3, 2, 17)
    assert m["covid_precision"] == pytest.approx(8 / 11) and m["covid_recall"] == pytest.approx(0.8)
    assert m["covid_f1"] == pytest.approx(2 * (8 / 11) * 0.8 / (8 / 11 + 0.8))
    assert m["normal_precision"] == pytest.approx(17 / 19) and m["normal_recall"] == pytest.approx(17 / 20)
    assert m["accuracy"] == pytest.approx(25 / 30) and m["specificity"] == pytest.approx(17 / 20)
    assert (m["n_covid"], m["n_normal"]) == (10, 20)
    assert m["roc_auc"] == pytest.approx(1 - (2 * 3) / 200)  # the two missed COVID-19 rank below 3 NORMAL
    assert m["ci"]["covid_recall"] == pytest.approx(wilson(8, 10))


def test_wilson_known_values():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert all(np.isnan(wilson(0, 0)))  # nothing to estimate


def test_threshold_for_recall():
    """Just below the deciding row's probability (1e-5, or half the gap to the next lower one):
    the validation labels are those of ">= that probability", and stay so when every
    probability moves by the ~1e-6 that separates the same head computed by Keras and by
    compiled code."""
    from covfeat.trust.metrics import THRESHOLD_MARGIN

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.4, 0.2, 0.5, 0.3, 0.1, 0.05])
    for target, decider in ((0.5, 0.8), (0.75, 0.4), (1.0, 0.2)):
        t = threshold_for_recall(y, p, target)
        assert decider - THRESHOLD_MARGIN <= t < decider
        assert np.array_equal(p >= t, p >= decider)
        for shift in (-2e-6, 2e-6):
            assert np.array_equal(p + shift * np.sign(np.sin(np.arange(8))) >= t, p >= decider)
    close = np.array([0.6, 0.6 - 4e-6, 0.1])  # a NORMAL row 4e-6 below: the threshold stops halfway
    t = threshold_for_recall(np.array([1, 0, 0]), close, 1.0)
    assert t == pytest.approx(0.6 - 2e-6, abs=1e-12)


def test_report_cli_prints_table_and_writes_files(mini_run, tmp_path):
    r = runner.invoke(app, ["report", str(mini_run), str(mini_run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("!!! NOT PRETRAINED")
    assert "CAUTION: every COVID-19 test image comes from cohen and every NORMAL one from kermany" in out
    for row in ("COVID-19 precision", "NORMAL f1", "TP", "FN", "accuracy", "ROC AUC", "test COVID-19 images"):
        assert row in out
    m = json.loads((mini_run / "metrics.json").read_text())["argmax"]
    line = next(l for l in out.splitlines() if l.startswith("TP "))
    # the count, then the patients behind it, counted here from the test predictions
    pred = list(csv.DictReader(open(mini_run / "predictions.csv")))
    tp_patients = len({r["patient_id"] for r in pred if r["label"] == "1" and r["pred"] == "1"})
    assert line.split()[1:] == [str(m["TP"]), f"({tp_patients}", "patients)"] * 2
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert {"table2.md", "table2.csv", "table2.json"} <= set(files)
    assert sum(f.endswith("_curves.png") for f in files) == 1 and sum(f.endswith("_roc_pr.png") for f in files) == 1
    assert "NOT PRETRAINED" in (tmp_path / "rep" / "table2.md").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "x")])
    assert r.exit_code == 1 and "is not a finished covfeat run (no metrics.json)" in r.stderr


def _fold_counts(folds, called):
    """Per source: (COVID-19 rows ``called`` COVID-19, COVID-19 rows) over every fold's
    predictions.csv, counted here from the files."""
    out = {}
    for f in folds:
        for r in csv.DictReader(open(f / "predictions.csv")):
            if r["label"] == "1":
                k, n = out.get(r["source"], (0, 0))
                out[r["source"]] = (k + called(r), n + 1)
    return out


def test_cross_validation_report_from_the_fold_folders(mini_cache, tmp_path):
    """The CV interval rests on a test/train ratio counted here from each fold's split.npy and
    on fold accuracies counted from each fold's predictions.csv (not on the ratio and scores
    the run stored); every interval of a proportion or AUC lies in [0, 1]; the per-source
    breakdown sums every fold's test rows (at argmax and at each fold's threshold); only the
    deviations that apply to a k-fold run are listed."""
    from covfeat.head.split import TEST, TRAIN
    from covfeat.trust.metrics import COUNT_KEYS, cv_interval

    r = runner.invoke(app, ["fit-head", "--cache", str(mini_cache), "--folds", "3", "--repeats", "2", "--epochs", "2",
                            "--val", "0.2", "--target-recall", "0.5", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    parent = Path(r.stdout.strip().splitlines()[-1])
    m = json.loads((parent / "metrics.json").read_text())
    folds = sorted(p for p in parent.iterdir() if p.is_dir())
    assert len(folds) == 6
    splits = [np.load(f / "split.npy") for f in folds]
    ratio = float(np.mean([(s == TEST).sum() / (s == TRAIN).sum() for s in splits]))
    assert m["cv"]["test_over_train"] == pytest.approx(ratio)
    acc = []
    for f in folds:
        rows = list(csv.DictReader(open(f / "predictions.csv")))
        acc.append(np.mean([(float(r["p_covid"]) >= 0.5) == (r["label"] == "1") for r in rows]))  # argmax
    want = cv_interval(acc, ratio, 3, bounds=(0.0, 1.0))
    assert (m["cv"]["accuracy"]["lo"], m["cv"]["accuracy"]["hi"]) == pytest.approx((want["lo"], want["hi"]))
    for k, c in m["cv"].items():
        if isinstance(c, dict) and k not in COUNT_KEYS and not np.isnan(c["lo"]):
            assert 0.0 <= c["lo"] <= c["hi"] <= 1.0, k
    by = m["by_source_patients"]
    at = {"argmax": lambda r: float(r["p_covid"]) >= 0.5,
          "operating_point": lambda r: r["pred"] == "1"}  # predictions.csv: the call at the fold's threshold
    for kind, called in at.items():
        assert {s: (e["covid_recall"]["k"], e["covid_recall"]["images"]) for s, e in by[kind].items()
                if "covid_recall" in e} == _fold_counts(folds, called), kind
    n_rows = sum(len(list(csv.DictReader(open(f / "predictions.csv")))) for f in folds)
    assert sum(m["sources_test"].values()) == n_rows  # every fold's test sources, not the first fold's
    out = runner.invoke(app, ["report", str(parent), "--out", str(tmp_path / "rep")]).stdout
    assert "COVID-19 recall, cohen at argmax, 3 folds x 2 repeats, summed" in out
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Split: 60% train, 10% validation, 30% test by default" not in html  # no 60/10/30 split in k-fold
    assert "Grouping: the split and the folds keep each patient on one side" in html
    # Calibration of the first repeat's held-out folds together (every image once), by hand for the Brier score.
    first = [f for f in folds if f.name.startswith("r0-")]
    held = [r for f in first for r in csv.DictReader(open(f / "predictions.csv"))]
    assert len(held) == len({r["row"] for r in held}) == m["calibration"]["raw"]["brier"]["images"]
    brier = np.mean([(float(r["p_covid"]) - int(r["label"])) ** 2 for r in held])
    assert m["calibration"]["raw"]["brier"]["value"] == pytest.approx(brier)
    assert any(line.startswith("Brier score, raw p_covid") for line in out.splitlines())
    assert (tmp_path / "rep" / f"{parent.name}_reliability.png").is_file()
    at = runner.invoke(app, ["report", str(parent), "--prevalence", "0.1", "--out", str(tmp_path / "rep3")]).stdout
    assert "PPV at prevalence 0.100 (stated), argmax" in at


def test_predictive_values_at_a_stated_prevalence(mini_run, tmp_path):
    import math

    m = json.loads((mini_run / "metrics.json").read_text())["argmax"]
    se, sp = m["TP"] / (m["TP"] + m["FN"]), m["TN"] / (m["TN"] + m["FP"])
    pi = 0.1
    ppv = se * pi / (se * pi + (1 - sp) * (1 - pi)) if se * pi + (1 - sp) * (1 - pi) else math.nan
    r = runner.invoke(app, ["report", str(mini_run), "--prevalence", str(pi), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.stdout.splitlines() if l.startswith("PPV at prevalence 0.100 (stated), argmax"))
    assert line.split("argmax")[1].split()[0] == ("n/a" if math.isnan(ppv) else f"{ppv:.2f}")
    default = runner.invoke(app, ["report", str(mini_run), "--out", str(tmp_path / "rep2")]).stdout
    assert f"PPV at prevalence {m['n_covid'] / (m['n_covid'] + m['n_normal']):.3f} (test set), argmax" in default
    bad = runner.invoke(app, ["report", str(mini_run), "--prevalence", "1.5"])
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "error: --prevalence: expected a COVID-19 share strictly between 0 and 1, got 1.5."


def test_report_html_shows_calibration_and_a_reliability_diagram(mini_run, tmp_path):
    import cv2

    r = runner.invoke(app, ["report", str(mini_run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Calibration and prevalence</h2>" in html and "Brier score, raw p_covid" in html
    assert "p_covid corrected to the test prevalence" in html
    fig = cv2.imread(str(next((tmp_path / "rep").glob("*_confusion_roc_pr.png"))))
    assert fig.shape[1] == 2000  # four panels of 5 in at 100 dpi: confusion, ROC, PR and the reliability diagram
    data = json.loads((tmp_path / "rep" / "table2.json").read_text())["runs"][0]["calibration"]
    assert {"raw", "corrected"} <= set(data) and data["corrected"]["reliability"]
