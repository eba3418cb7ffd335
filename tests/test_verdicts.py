"""The audit's verdicts read three ways, on synthetic scores whose answer is known: each probe's
FLAGGED, CLEAR and INCONCLUSIVE paths, the paired differences and Holm's correction across
them, like-with-like external comparisons, and confounding named class by class."""

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from covfeat.cli import app
from covfeat.probes.audit import holm_family
from covfeat.probes.external import comparisons, external_verdict
from covfeat.probes.metadata import metadata_verdict
from covfeat.probes.probe import PROBES
from covfeat.probes.retrain import control_reading, occlusion_reading
from covfeat.probes.source import within_class
from covfeat.trust.confounding import statement
from covfeat.trust.intervals import CLEAR, FLAGGED, INCONCLUSIVE
from covfeat.use.report import banners

BOX = "the central box (0.15, 0.1, 0.85, 0.9)"


def scores(n_groups, sep_a, sep_b, per=2, seed=0, noise=0.3):
    """Two models' scores of the same rows (patient groups of ``per`` images); they share most
    of their noise, as two heads on the same images do."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(2 * n_groups), per)
    y = (g >= n_groups).astype(int)
    base = rng.normal(0, 1, len(g))
    a = 1 / (1 + np.exp(-(sep_a * y + base)))
    b = 1 / (1 + np.exp(-(sep_b * y + base + rng.normal(0, noise, len(g)))))
    return y, a, b, g


@pytest.mark.parametrize("sep_run,sep_ctl,n,want", [
    (3.0, 0.5, 200, CLEAR),  # ImageNet adds far more than the margin
    (2.0, 2.0, 200, FLAGGED),  # the control reaches the run within the margin
    (1.5, 1.0, 8, INCONCLUSIVE),  # too few patients to tell
])
def test_control_probe_reads_its_paired_difference_three_ways(sep_run, sep_ctl, n, want):
    res = control_reading(*scores(n, sep_run, sep_ctl)[:3], scores(n, sep_run, sep_ctl)[3])
    assert res["status"] == res["verdict3"] == want, res["verdict"]
    assert res["verdict"].startswith(f"{want}: the run minus a random-init control (same head, split and test "
                                     "patients) is ")
    assert "margin 0.05" in res["verdict"] and "says nothing about transfer learning" not in res["verdict"]
    lo, hi = res["paired"]["interval"]
    assert lo <= res["difference"] <= hi and res["difference"] == pytest.approx(res["roc_auc_run"][0] -
                                                                             res["roc_auc"][0])
    if want == CLEAR:
        assert lo > 0.05 and "ImageNet features separate the classes better" in res["verdict"]
    if want == FLAGGED:
        assert -0.05 <= lo and hi <= 0.05
        assert "the task is solved as well without ImageNet features here" in res["verdict"]
    if want == INCONCLUSIVE:
        assert lo < 0.05 < hi and res["paired"]["needed_patients"][0] > n
        assert f"about {res['paired']['needed_patients'][0]} COVID-19 and" in res["verdict"]


def test_the_control_probes_difference_is_paired_on_the_same_rows():
    """Two models whose AUCs differ by 0.03 on 200 patients per class, with shared noise: each
    AUC's own interval is about +-0.03 wide, the paired difference's much narrower.  An
    unpaired comparison could not tell them apart; the paired one shows them within the margin."""
    y, a, b, g = scores(200, 2.0, 2.0, noise=0.1)
    res = control_reading(y, a, b, g)
    run_w = res["roc_auc_run"][2] - res["roc_auc_run"][1]
    lo, hi = res["paired"]["interval"]
    assert hi - lo < run_w / 2


def test_occlusion_never_reads_an_interval_touching_chance_as_no_signal():
    """The occluded head at chance with 10 patients per class: its interval reaches 0.5 from both
    sides, which is no evidence of no signal, so the verdict is INCONCLUSIVE with the patients
    that would tell, never "the signal is inside the blanked field"."""
    y, a, _, g = scores(10, 3.0, 0.0)
    blank = np.random.default_rng(1).uniform(size=len(y))
    res = occlusion_reading(y, a, blank, g, BOX)
    assert res["status"] == INCONCLUSIVE and res["interval"][0] < 0.5 < res["interval"][1], res["verdict"]
    assert res["verdict"].startswith(f"INCONCLUSIVE: with {BOX} blanked, the same head retrained on the same split "
                                     "gives ROC AUC ")
    assert "NORMAL patients would be needed to show " in res["verdict"]
    assert "inside the blanked field" not in res["verdict"] and "lung" not in res["verdict"].lower()
    assert "The run minus the occluded head is +" in res["verdict"]


@pytest.mark.parametrize("sep_occ,n,want,words", [
    (3.0, 100, FLAGGED, "it still separates the classes by more than the margin above chance, so it reads something "
                        "outside the blanked box"),
    (0.0, 2000, CLEAR, "within the margin of chance, so what lies outside the blanked box does not separate"),
])
def test_occlusion_flags_and_clears_by_the_margin(sep_occ, n, want, words):
    y, a, b, g = scores(n, 3.0, sep_occ, per=1, noise=1.0)
    if sep_occ == 0.0:
        b = np.random.default_rng(2).uniform(size=len(y))
    res = occlusion_reading(y, a, b, g, BOX)
    assert res["status"] == want, res["verdict"]
    assert words in res["verdict"] and "lung" not in res["verdict"].lower()


def test_metadata_flags_by_effect_size_not_significance():
    """A lower bound above 0.5 but below 0.5 + margin is significant and still not FLAGGED."""
    rng = np.random.default_rng(0)
    n = 3000
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    X = rng.normal(size=(2 * n, 2))
    X[:, 0] += 0.12 * y  # a true AUC of about 0.53
    res = metadata_verdict(X, y, np.arange(2 * n))
    assert 0.5 < res["interval"][0] < 0.55, res["verdict"]
    assert res["status"] == INCONCLUSIVE and res["verdict"].startswith("INCONCLUSIVE: file metadata alone")
    assert "patient-grouped 5-fold CV" in res["verdict"] and res["folds"] == 5


def test_metadata_fold_count_is_the_real_one_and_one_row_is_inconclusive():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = np.r_[np.zeros(34, int), np.ones(6, int)]
    X[:, 0] += 4 * y
    groups = np.r_[np.arange(34), 100, 100, 101, 101, 102, 102]  # 6 COVID-19 images of 3 patients: 3 folds
    res = metadata_verdict(X, y, groups)
    assert res["folds"] == 3 and "patient-grouped 3-fold CV" in res["verdict"], res["verdict"]
    one = metadata_verdict(X[:38], y[:38] * 0 + np.r_[np.zeros(37, int), 1], np.arange(38))
    assert one["status"] == INCONCLUSIVE and "\n" not in one["verdict"]
    assert one["verdict"] == ("INCONCLUSIVE: COVID-19 has 1 patient group(s); a patient-grouped cross-validation of "
                              "file metadata needs at least 2 per class, so it cannot be measured.")


def test_source_within_a_class_reads_three_ways():
    y, a, _, g = scores(60, 4.0, 0.0)
    res = within_class("NORMAL", ["kermany", "openist"], y, a, g)
    assert res["status"] == FLAGGED and res["verdict"].startswith("FLAGGED: within NORMAL, the features tell kermany "
                                                                  "from openist with ROC AUC ")
    n1, n0 = len(set(g[y == 1])), len(set(g[y == 0]))  # the patients counted are the two sources', not classes'
    assert f"; {n1} openist and {n0} kermany patients, " in res["verdict"] and "COVID-19" not in res["verdict"]
    y, a, _, g = scores(6, 0.3, 0.0)
    assert within_class("NORMAL", ["a", "b"], y, a, g)["status"] == INCONCLUSIVE


def test_confounding_is_named_class_by_class():
    three = {"COVID-19": {"cohen": 40}, "NORMAL": {"kermany": 30, "openist": 20}}
    assert statement(three) == ("every COVID-19 image comes from cohen and every NORMAL one from kermany or openist, "
                                "and no source holds both classes")
    part = {"COVID-19": {"cohen": 40}, "NORMAL": {"kermany": 30, "cohen": 0, "shared": 5}, "X": {}}
    part["COVID-19"]["shared"] = 10
    assert statement(part) == ("40 of 50 COVID-19 images come from cohen, a source no NORMAL image comes from; 30 of "
                               "35 NORMAL images come from kermany, a source no COVID-19 image comes from")
    assert statement({"COVID-19": {"cohen": 40}, "NORMAL": {"kermany": 30, "cohen": 3}}) == (
        "30 of 33 NORMAL images come from kermany, a source no COVID-19 image comes from")
    only = statement({"COVID-19": {"cohen": 40, "sirm": 4}, "NORMAL": {"kermany": 30, "sirm": 2}})
    assert only == ("40 of 44 COVID-19 images come from cohen, a source no NORMAL image comes from; 30 of 32 NORMAL "
                    "images come from kermany, a source no COVID-19 image comes from")
    assert statement({"COVID-19": {"a": 4, "b": 5}, "NORMAL": {"a": 3, "b": 20}}) is None


def test_the_banner_names_cohen_as_covid_19s_only_source_once_openist_is_added():
    run = {"_name": "r", "pretrained": False,
           "sources_test": {"cohen/COVID-19": 40, "kermany/NORMAL": 30, "openist/NORMAL": 20}}
    said = banners([run])
    assert said[-1] == ("CAUTION: every COVID-19 test image comes from cohen and every NORMAL one from kermany or "
                        "openist, and no source holds both classes: the classes are confounded with their source. "
                        "High scores may measure where an image came from, not the disease. Run `covfeat audit`.")
    partly = dict(run, sources_test={"cohen/COVID-19": 40, "kermany/NORMAL": 30, "kermany/COVID-19": 5})
    assert banners([partly])[-1].startswith("CAUTION: 40 of 45 COVID-19 test images come from cohen, a source no "
                                            "NORMAL test image comes from: the classes are partly confounded")
    mixed = dict(run, sources_test={"a/COVID-19": 4, "a/NORMAL": 4})
    assert not any(b.startswith("CAUTION") for b in banners([mixed]))


def test_holm_across_the_audits_paired_comparisons_can_undo_a_difference():
    """A control difference shown beyond the margin alone (p 0.03) is not shown when the audit
    holds a second paired comparison: Holm's adjusted p is 0.06, and the verdict says so."""
    y, a, b, g = scores(40, 3.0, 1.0, seed=3)
    res = control_reading(y, a, b, g)
    assert res["status"] == CLEAR
    out = {"control": dict(res, paired=dict(res["paired"], p_beyond_margin=0.03)),
           "occlusion": {"status": FLAGGED, "paired": {"p_beyond_margin": 0.04}}}
    out["control"] = PROBES["control"].finish(out["control"])
    assert out["control"]["status"] == CLEAR
    real = PROBES["occlusion"].finish
    try:
        object.__setattr__(PROBES["occlusion"], "finish", lambda r: r)
        holm_family(out)
    finally:
        object.__setattr__(PROBES["occlusion"], "finish", real)
    assert out["control"]["paired"]["p_holm"] == pytest.approx(0.06) and out["control"]["paired"]["family"] == 2
    assert out["control"]["status"] == INCONCLUSIVE, out["control"]["verdict"]
    assert "beyond the margin at 95% but not after Holm's correction" in out["control"]["verdict"]
    assert "Holm-adjusted p 0.060 beyond the margin, 2 paired comparisons" in out["control"]["verdict"]


def test_external_compares_like_with_like_by_the_interval_of_the_difference():
    """Internal: 60 patients per class, recall 0.9, specificity 0.9.  External: siteA's NORMAL
    specificity falls to 0.5; siteB holds COVID-19 only.  Specificity is compared with
    specificity per source, recall with recall, AUC with AUC, never accuracy."""
    rng = np.random.default_rng(0)
    y_int = np.r_[np.ones(60, int), np.zeros(60, int)]
    p_int = np.where(y_int == 1, rng.uniform(0.3, 1.0, 120), rng.uniform(0.0, 0.55, 120))
    y_ext = np.r_[np.ones(40, int), np.zeros(40, int)]
    p_ext = np.where(y_ext == 1, rng.uniform(0.3, 1.0, 80), rng.uniform(0.0, 1.0, 80))
    src = np.array(["siteB"] * 40 + ["siteA"] * 40)
    comps = comparisons(y_int, p_int, np.arange(120), y_ext, p_ext, np.arange(80), src, {"argmax": 0.5})
    assert [(c["metric"], c["where"]) for c in comps] == [
        ("roc_auc", "the whole external set"), ("specificity", "siteA at argmax (0.500)"),
        ("covid_recall", "siteB at argmax (0.500)")]
    spec = comps[1]
    assert spec["difference"] == pytest.approx(spec["external"] - spec["internal"]) and spec["interval"][1] < -0.05
    status, text = external_verdict(comps, *[type("I", (), dict(estimate=0.8, lo=0.7, hi=0.9, n_groups=(1, 1),
                                                             n_images=(1, 1)))()] * 2, 0.05)
    assert status == FLAGGED and "specificity, siteA at argmax (0.500): " in text and "accuracy" not in text
    assert "covid_recall" not in text and "COVID-19 recall, siteB" not in text.split("; external")[0]


def test_an_undefined_difference_counts_as_showing_nothing():
    from covfeat.probes.common import beyond_margin

    nan = type("D", (), dict(estimate=0.3, lo=math.nan, hi=math.nan))()
    assert beyond_margin(nan, lambda null: pytest.fail("no p-value of an undefined interval"), 0.05) == 1.0
    inside = type("D", (), dict(estimate=0.03, lo=0.01, hi=0.05))()
    assert beyond_margin(inside, lambda null: pytest.fail("nothing beyond the margin to test"), 0.05) == 1.0


@pytest.mark.parametrize("margin", ["0", "0.5", "-0.1"])
def test_the_audit_refuses_a_margin_outside_0_to_0_5(margin, tmp_path):
    r = CliRunner().invoke(app, ["audit", "--run", str(tmp_path), "--margin", margin])
    assert r.exit_code == 1
    assert r.stderr == (f"error: --margin: expected an AUC margin between 0 and 0.5 (default 0.05); got "
                        f"{float(margin)}.\n")


class _Run:
    def __init__(self, rows, labels, p):
        self._pr = {"row": np.array(rows), "label": np.array(labels), "p_covid": np.array(p, float)}

    def predictions(self):
        return self._pr


class _Cache:
    def __init__(self, sha, patients):
        self.manifest = {"sha256": np.array(sha), "patient_id": np.array(patients)}

    def near_duplicate_pairs(self):
        return []


def test_with_masks_both_aucs_come_from_the_rows_the_occluded_run_scored():
    """The run scored a, b, c, d; the occluded run only d and b (no mask for a and c), in
    another order and at other rows of its own cache: the comparison pairs b with b and d with d."""
    from covfeat.probes.retrain import aligned

    fc = _Cache(["a", "b", "c", "d"], ["p1", "p2", "p3", "p4"])
    run = _Run([0, 1, 2, 3], [1, 1, 0, 0], [0.9, 0.8, 0.3, 0.2])
    occ_cache = _Cache(["x", "d", "b"], ["q", "p4", "p2"])
    occ = _Run([1, 2], [0, 1], [0.45, 0.55])
    y, p_run, p_occ, groups, n_test = aligned(run, fc, occ, occ_cache)
    assert y.tolist() == [1, 0] and p_run.tolist() == [0.8, 0.2] and p_occ.tolist() == [0.55, 0.45]
    assert groups.tolist() == ["p2", "p4"] and n_test == 4
