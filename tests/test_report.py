"""Report numbers against hand-counted confusion matrices, and the report files a user gets."""

import csv
import json

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
