"""What fit-head stores about a run's test rows: every Table-2 number with its patient-level
interval and the images and patients behind it, per source, calibrated, at a prevalence, and
the operating point with what it rests on (covfeat.trust.evaluation), checked against
computations made here from the run's own files."""

import dataclasses
import json

import numpy as np
import pytest
from test_train import _synthetic_cache

from covfeat.head.config import FitConfig, HeadConfig, SplitConfig
from covfeat.head.fit import fit_head
from covfeat.head.runs import Run
from covfeat.head.split import VAL
from covfeat.store.reader import open_cache
from covfeat.trust import evaluation
from covfeat.trust.calibration import prior_correct
from covfeat.trust.intervals import CLUSTER, PROPORTIONS, RANKINGS, WILSON, intervals
from covfeat.trust.metrics import THRESHOLD_MARGIN, classification_metrics, threshold_for_recall
from covfeat.trust.table import notes, single_cells


@pytest.fixture
def synthetic_run(monkeypatch, tmp_path):
    """stage two on synthetic maps whose COVID-19 patients have two images each (c:0 has rows
    0 and 1, ...): image counts and patient counts differ, so a number that counted images
    as patients shows it.  With a recall target, so the operating point is there too."""
    from covfeat.extraction.backbones import REGISTRY

    monkeypatch.setitem(REGISTRY, "pinfake", dataclasses.replace(REGISTRY["inception_v3"], name="pinfake",
                                                                 feature_shape=(3, 3, 32), dropout=0.5))
    cache = _synthetic_cache(tmp_path / "pinfake-none-0.h5")
    fitc = FitConfig(head=HeadConfig(epochs=6, learning_rate=0.01, momentum=0.9),
                     split=SplitConfig(val=0.25, test=0.3), target_recall=0.9)
    return Run(fit_head(cache, fitc, tmp_path / "runs", progress=False)), cache


def test_every_table2_number_rests_on_patients(synthetic_run):
    run, _ = synthetic_run
    m, pr = run.metrics, run.predictions()
    y, p, patients = pr["label"], pr["p_covid"], pr["patient_id"]
    a = m["argmax"]
    want = intervals(y, p, patients)  # the library on the test rows grouped by patient, here
    for k in [*PROPORTIONS, *RANKINGS]:
        rec = a["intervals"][k]
        if not np.isnan(a[k]):
            assert rec["value"] == pytest.approx(a[k], abs=1e-12), k  # the point estimate, as before
        assert (rec["lo"], rec["hi"], rec["method"]) == pytest.approx((want[k].lo, want[k].hi, want[k].method)), k
    covid = y == 1
    rec = a["intervals"]["covid_recall"]
    assert (rec["k"], rec["images"]) == (a["TP"], a["TP"] + a["FN"])
    assert rec["patients"] == len(set(patients[covid])) < rec["images"]  # two images per COVID-19 patient
    assert rec["method"] != WILSON  # the images of a patient are not independent draws
    assert a["counts"]["TP"] == [a["TP"], len(set(patients[covid & (pr["pred"] == 1)]))]
    assert a["counts"]["n_covid"] == [int(covid.sum()), len(set(patients[covid]))]
    assert m["by_source_patients"]["argmax"]["syn"]["covid_recall"] == rec
    cell = single_cells(m)["COVID-19 recall"]
    assert f"({a['TP']}/{a['TP'] + a['FN']} images, {rec['patients']} patients; patient " in cell


def test_calibration_and_predictive_values_against_hand_computations(synthetic_run):
    run, _ = synthetic_run
    m, pr = run.metrics, run.predictions()
    y, p = pr["label"], pr["p_covid"]
    cal = m["calibration"]
    assert m["train_prior"] == cal["train_prior"] == 0.5  # SMOTE balanced the training rows
    prev = y.mean()
    assert cal["test_prevalence"] == pytest.approx(prev)
    assert cal["raw"]["brier"]["value"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-6)
    assert cal["corrected"]["brier"]["value"] == pytest.approx(np.mean((prior_correct(p, 0.5, prev) - y) ** 2),
                                                               abs=1e-6)
    assert sum(b["count"] for b in cal["corrected"]["reliability"]) == len(y)
    pv = m["predictive"]["argmax"]
    assert pv["prevalence_from"] == "test set" and pv["prevalence"] == pytest.approx(prev)
    # At the test set's own prevalence, Bayes' PPV and NPV are its precisions.
    assert pv["ppv"]["value"] == pytest.approx(m["argmax"]["covid_precision"])
    assert pv["npv"]["value"] == pytest.approx(m["argmax"]["normal_precision"])


def test_the_operating_point_says_what_it_rests_on(synthetic_run):
    run, cache = synthetic_run
    m = run.metrics
    op = m["operating_point"]
    fc = open_cache(cache)
    val = np.flatnonzero(run.split() == VAL)
    covid_val = val[fc.manifest["label"][val] == 1]
    vr = op["validation_recall"]
    assert (vr["k"], vr["images"]) == (op["validation"]["TP"], len(covid_val))
    assert vr["patients"] == len(set(fc.manifest["patient_id"][covid_val])) < vr["images"]
    thr = op["threshold_interval"]
    assert thr["value"] == op["threshold"] and thr["lo"] <= op["threshold"] + THRESHOLD_MARGIN <= thr["hi"]
    t = op["test"]
    cells = single_cells(m)
    assert f"({t['TP']}/{t['TP'] + t['FN']} images, " in cells["at recall target 0.90: test recall"]
    assert f"from {vr['k']}/{vr['images']} validation COVID-19 images, {vr['patients']} patients" in \
        cells["at recall target 0.90: threshold"]


def test_the_threshold_bootstrap_decides_as_threshold_for_recall_does():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(15), np.zeros(20)].astype(int)
    p = rng.uniform(0, 1, 35)
    for target in (0.5, 0.8, 0.9, 1.0):
        decider = evaluation.deciding_probabilities(y, p, np.ones((1, 35)), target)[0]
        t = threshold_for_recall(y, p, target)
        assert decider - THRESHOLD_MARGIN <= t < decider
    w = np.ones((1, 35))
    w[0, np.argmax(np.where(y == 1, p, -1))] = 5  # the top COVID-19 row drawn five times
    assert evaluation.deciding_probabilities(y, p, w, 0.25)[0] == p[y == 1].max()


def test_wilson_only_where_every_patient_has_one_image():
    rng = np.random.default_rng(2)
    y = np.repeat([1] * 6 + [0] * 6, 3)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    clustered = evaluation.table2(y, p, np.repeat(np.arange(12), 3))["intervals"]
    single = evaluation.table2(y, p, np.arange(36))["intervals"]
    assert clustered["covid_recall"]["method"] == CLUSTER and single["covid_recall"]["method"] == WILSON
    assert (clustered["covid_recall"]["images"], clustered["covid_recall"]["patients"]) == (18, 6)
    assert single["covid_recall"]["hi"] - single["covid_recall"]["lo"] < \
        clustered["covid_recall"]["hi"] - clustered["covid_recall"]["lo"]


def test_a_missed_recall_target_gets_a_line_with_its_numbers():
    def run(recall):
        rec = {"value": recall, "lo": 0.49, "hi": 0.94, "method": CLUSTER, "images": 10, "patients": 7, "k": 8,
               "k_patients": 6}
        return {"_name": "r", "operating_point": {
            "target_recall": 0.95, "threshold": 0.412, "test": {"covid_recall": recall, "intervals": {"covid_recall": rec}},
            "validation_recall": {"k": 14, "images": 15, "patients": 9}}}

    assert notes([run(0.8)]) == ["r: at recall target 0.95 the test COVID-19 recall is 0.80 [0.49, 0.94] "
                                 "(8/10 images, 7 patients; patient bootstrap), below the target; the threshold 0.412 "
                                 "was chosen on 14/15 validation COVID-19 images (9 patients)."]
    assert notes([run(0.95), run(1.0)]) == []


def test_metrics_json_keeps_its_old_keys(synthetic_run):
    run, _ = synthetic_run
    m = json.loads((run.path / "metrics.json").read_text())
    pr = run.predictions()
    old = classification_metrics(pr["label"], pr["p_covid"])["ci"]
    assert {k: tuple(v) for k, v in m["argmax"]["ci"].items()} == pytest.approx(old)
    assert set(m["by_source"]) == {"argmax", "operating_point"}
