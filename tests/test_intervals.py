"""Patient-level intervals a referee can sign: they resample patients, stratified by class,
cover the truth at small patient counts, pair comparisons on the same rows, and read three
ways (covfeat.trust.intervals)."""

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score
from threadpoolctl import threadpool_limits

from covfeat.core.errors import DataError
from covfeat.trust.intervals import (
    CLEAR,
    CLUSTER,
    FLAGGED,
    INCONCLUSIVE,
    NONE,
    PROPORTIONS,
    SCORE,
    WILSON,
    Interval,
    cell_counts,
    clusters,
    estimate,
    holm,
    interval_method,
    intervals,
    paired_difference,
    patients_needed,
    unpaired_difference,
    verdict,
)
from covfeat.trust.metrics import classification_metrics, wilson


def clustered(rng, groups_per_class, auc, rho=0.5, max_images=5):
    """Binormal scores with a known image-level AUC: each patient group has 1..max_images
    images sharing a group effect (within-group correlation rho); each class's scores have
    variance 1, so AUC = Phi(mu / sqrt(2))."""
    mu = math.sqrt(2) * norm.ppf(auc)
    sizes = rng.integers(1, max_images + 1, 2 * groups_per_class)
    g = np.repeat(np.arange(2 * groups_per_class), sizes)
    y = (g >= groups_per_class).astype(int)
    s = mu * y + rng.normal(0, math.sqrt(rho), 2 * groups_per_class)[g] + rng.normal(0, math.sqrt(1 - rho), len(g))
    return y, s, g


def coverage(groups_per_class, auc, reps, rho=0.5, seed=1):
    """Share of simulated data sets whose 95% interval holds the true AUC, and of those whose
    interval for COVID-19 recall at a fixed threshold holds the true recall Phi(1.2)."""
    rng = np.random.default_rng(seed)
    mu = math.sqrt(2) * norm.ppf(auc)
    hits = np.zeros(2)
    with threadpool_limits(1):  # one core: the machine is shared
        for r in range(reps):
            y, s, g = clustered(rng, groups_per_class, auc, rho)
            cl = clusters(y, g, seed=r)
            a = estimate(cl, s, "roc_auc").interval()
            rec = estimate(cl, s, "covid_recall", threshold=mu - 1.2).interval()
            hits += [a.lo <= auc <= a.hi, rec.lo <= norm.cdf(1.2) <= rec.hi]
    return hits / reps


@pytest.mark.parametrize("groups_per_class, auc", [(8, 0.80), (8, 0.96), (16, 0.80), (16, 0.96)])
def test_intervals_cover_the_true_auc_at_few_patients(groups_per_class, auc):
    """The percentile bootstrap covered a true AUC of 0.96 in 78% of such data sets at 8 groups
    per class; the patient-level interval must reach the nominal 0.95 within simulation error."""
    auc_cover, recall_cover = coverage(groups_per_class, auc, reps=600)
    assert auc_cover >= 0.93
    assert recall_cover >= 0.93


@pytest.mark.slow
@pytest.mark.parametrize("groups_per_class", [8, 16])
@pytest.mark.parametrize("auc", [0.70, 0.80, 0.90, 0.96])
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.8])
def test_intervals_cover_the_true_auc_widely(groups_per_class, auc, rho):
    """Where the claim holds.  Known short of it: at 32 groups per class and a true AUC of
    0.99 the AUC interval covered 0.91 (rho 0.8) to 0.93 (rho 0.2) in 1000 data sets, and
    0.93 at AUC 0.96, rho 0.8: too few discordant pairs for the bootstrap's variance."""
    auc_cover, recall_cover = coverage(groups_per_class, auc, reps=2000, rho=rho, seed=7)
    assert auc_cover >= 0.93
    assert recall_cover >= 0.93


def test_estimates_are_the_usual_ones():
    rng = np.random.default_rng(0)
    y, s, g = clustered(rng, 12, 0.85)
    s = np.round(s, 1)  # ties, which both AUCs must treat as scikit-learn does
    got = intervals(y, s, g, threshold=0.6, n_boot=200)
    ref = classification_metrics(y, s, threshold=0.6)
    assert got["roc_auc"].estimate == pytest.approx(roc_auc_score(y, s))
    assert got["pr_auc"].estimate == pytest.approx(average_precision_score(y, s))
    for key in PROPORTIONS:
        assert got[key].estimate == pytest.approx(ref[key]), key
        assert 0 <= got[key].lo <= got[key].estimate <= got[key].hi <= 1


def test_resamples_keep_every_class_and_draw_whole_groups():
    rng = np.random.default_rng(0)
    y, s, g = clustered(rng, 6, 0.9)
    g = np.array([f"p{x}" for x in g])
    cl = clusters(y, g, n_boot=500, seed=3)
    assert cl.weights.shape == (500, 12)  # no resample dropped
    for c in (0, 1):  # stratified: each class keeps its number of groups in every resample
        assert (cl.weights[:, cl.stratum == c].sum(1) == 6).all()
    assert np.isfinite(estimate(cl, s, "roc_auc").replicates).all()


def test_a_group_holding_both_classes_is_its_own_stratum():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    g = np.array(["a", "b", "c", "d", "e", "e", "f", "g"])
    cl = clusters(y, g, n_boot=50)
    assert sorted(cl.stratum.tolist()) == [0, 0, 0, 1, 1, 1, 2]
    assert (cl.weights[:, cl.stratum == 2].sum(1) == 1).all()


def test_two_seeds_agree_on_the_ends_within_001():
    rng = np.random.default_rng(4)
    y, s, g = clustered(rng, 20, 0.88)
    a, b = (intervals(y, s, g, threshold=np.median(s), seed=k) for k in (1, 2))
    for key in a:
        assert a[key].method == b[key].method == CLUSTER
        assert abs(a[key].lo - b[key].lo) < 0.01 and abs(a[key].hi - b[key].hi) < 0.01, key


def test_wilson_only_where_every_group_has_one_image():
    y = np.array([1] * 10 + [0] * 10)
    s = np.r_[np.linspace(0.3, 0.9, 10), np.linspace(0.0, 0.6, 10)]
    singles = np.arange(20)
    assert interval_method(singles) == WILSON
    rec = intervals(y, s, singles, n_boot=200)["covid_recall"]
    k = int((s[:10] >= 0.5).sum())
    assert rec.method == WILSON and (rec.lo, rec.hi) == pytest.approx(wilson(k, 10))
    paired_images = np.r_[np.arange(10) // 2, 10 + np.arange(10)]  # two images per COVID-19 patient
    assert interval_method(paired_images) == CLUSTER
    got = intervals(y, s, paired_images, n_boot=200)
    assert got["covid_recall"].method == CLUSTER
    assert got["specificity"].method == WILSON  # the NORMAL patients still have one image each
    assert got["covid_recall"].n_images == (10, 0) and got["covid_recall"].n_groups == (5, 0)


def test_perfect_separation_is_not_an_interval_of_one_point():
    """An AUC of 1 on 8 patients per class says less than 'exactly 1': the score interval on
    patients reaches well below, and stays above chance."""
    rng = np.random.default_rng(0)
    y, s, g = clustered(rng, 8, 0.999)
    s = s + 10 * y
    a = intervals(y, s, g)["roc_auc"]
    assert a.estimate == 1.0 and a.method == SCORE
    assert 0.5 < a.lo < 0.95 and a.hi == 1.0


def test_one_patient_in_a_class_gives_no_interval():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    g = np.array([0, 0, 0, 1, 2, 3, 4])  # one COVID-19 patient, three images
    got = intervals(y, np.array([0.9, 0.8, 0.4, 0.3, 0.6, 0.1, 0.2]), g, n_boot=100)
    for key in ("roc_auc", "pr_auc", "covid_recall", "accuracy"):
        assert got[key].method == NONE and math.isnan(got[key].lo), key
    assert got["specificity"].method == WILSON


def test_patients_are_counted_beside_images():
    y = np.array([1, 1, 1, 0, 0, 0])
    g = np.array(["a", "a", "b", "c", "d", "d"])
    counts = cell_counts(y, np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3]), g)
    assert counts == {"TP": (2, 1), "FP": (1, 1), "FN": (1, 1), "TN": (2, 1), "n_covid": (3, 2), "n_normal": (3, 2)}


def test_bad_input_is_refused():
    with pytest.raises(DataError, match="Expected labels 0"):
        clusters([0, 2], [0, 1])
    with pytest.raises(DataError, match="No interval for 'auc'"):
        estimate(clusters([0, 1, 0, 1], [0, 1, 2, 3]), [0.1, 0.9, 0.2, 0.8], "auc")


# --------------------------------------------------------------------------- differences


def two_models(rng, groups_per_class=20, noise=0.7):
    y, s, g = clustered(rng, groups_per_class, 0.9)
    return y, s, s + rng.normal(0, noise, len(s)), g


def test_a_paired_difference_is_narrower_than_an_unpaired_one():
    y, a, b, g = two_models(np.random.default_rng(2))
    paired = paired_difference(y, a, b, g)
    cl = clusters(y, g)
    unpaired = unpaired_difference(estimate(cl, a, "roc_auc"), estimate(cl, b, "roc_auc"))
    assert paired.estimate == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.hi - paired.lo < 0.8 * (unpaired.hi - unpaired.lo)
    assert paired.paired and not unpaired.paired


def test_p_values_agree_with_the_interval():
    rng = np.random.default_rng(5)
    for noise in (0.3, 1.0, 2.0):
        y, a, b, g = two_models(rng, noise=noise)
        d = paired_difference(y, a, b, g)
        assert (d.p_value < 0.05) == (d.lo > 0 or d.hi < 0)
        at_p = paired_difference(y, a, b, g, level=1 - d.p_value)  # the interval at 1 - p just touches 0
        assert min(abs(at_p.lo), abs(at_p.hi)) < 1e-6


def test_holm_against_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_an_unpaired_comparison_refuses_numbers_that_move_with_prevalence():
    rng = np.random.default_rng(1)
    y1, s1, g1 = clustered(rng, 10, 0.9)
    keep = (y1 == 0) | (g1 % 3 == 0)  # far fewer COVID-19 rows on the other side
    other = clusters(y1[keep], g1[keep])
    this = clusters(y1, g1)
    with pytest.raises(DataError, match="accuracy depends on prevalence"):
        unpaired_difference(estimate(this, s1, "accuracy"), estimate(other, s1[keep], "accuracy"))
    with pytest.raises(DataError, match="Cannot compare roc_auc with pr_auc"):
        unpaired_difference(estimate(this, s1, "roc_auc"), estimate(other, s1[keep], "pr_auc"))
    d = unpaired_difference(estimate(this, s1, "covid_recall"), estimate(other, s1[keep], "covid_recall"))
    assert not d.paired and d.lo <= d.estimate <= d.hi


# --------------------------------------------------------------------------- verdicts


def iv(est, lo, hi, groups=(20, 30)):
    return Interval("roc_auc", est, lo, hi, 0.95, CLUSTER, groups, groups)


@pytest.mark.parametrize("interval, null, status", [
    (iv(0.80, 0.70, 0.88), 0.5, FLAGGED),  # far from chance
    (iv(0.52, 0.47, 0.54), 0.5, CLEAR),  # within 0.05 of chance: an equivalence shown
    (iv(0.60, 0.45, 0.75), 0.5, INCONCLUSIVE),  # reaches chance: never read as no signal
    (iv(0.53, 0.51, 0.57), 0.5, INCONCLUSIVE),  # off chance, but not by more than the margin
    (iv(0.95, 0.93, 0.99), 0.97, CLEAR),  # a difference from the run's own AUC within the margin
])
def test_verdicts_have_three_answers(interval, null, status):
    assert verdict(interval, null).status == status


def test_an_inconclusive_verdict_says_how_many_patients_would_tell():
    v = verdict(iv(0.60, 0.45, 0.75, groups=(20, 30)), 0.5)
    # to show a difference: half-width 0.15 must fall to |0.60 - 0.50| - 0.05 = 0.05, so 9 x the patients
    assert v.needed == (180, 270) and v.needed_for == "to show a difference"
    v = verdict(iv(0.52, 0.44, 0.60, groups=(10, 10)), 0.5)
    # to show equivalence: half-width 0.08 must fall to 0.05 - 0.02 = 0.03: (0.08 / 0.03)^2 = 7.1
    assert v.needed == (72, 72) and v.needed_for == "to show it is within the margin"
    assert verdict(iv(0.55, 0.40, 0.70), 0.5).needed is None  # on the margin: no number tells
    assert patients_needed(iv(0.8, 0.7, 0.9, groups=(8, 16)), 0.05) == (32, 64)
    with pytest.raises(DataError, match="half-width must be positive"):
        patients_needed(iv(0.8, 0.7, 0.9), 0.0)
