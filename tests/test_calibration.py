"""Is p_covid a probability: the prior correction checked by hand, calibration numbers with
patient-level intervals, and PPV/NPV at a stated prevalence (covfeat.trust.calibration)."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from covfeat.core.errors import DataError
from covfeat.trust.calibration import bin_of, brier, ece, effective_prior, predictive_values, prior_correct, reliability
from covfeat.trust.intervals import CLUSTER, WILSON, clusters, estimate


def test_prior_correction_against_a_hand_computation():
    # SMOTE's 50/50 to a 10% prevalence: odds 0.8/0.2 = 4 times the prior odds ratio (0.1/0.9)/(0.5/0.5) = 1/9
    # -> odds 4/9, p' = 4/13 = 0.3077
    assert prior_correct([0.8], 0.5, 0.1) == pytest.approx([4 / 13])
    # the same by the formula's two terms: 0.8*0.1/0.5 = 0.16, 0.2*0.9/0.5 = 0.36 -> 0.16/0.52
    assert prior_correct(0.8, 0.5, 0.1) == pytest.approx(0.16 / 0.52)
    # from a 30% training prior up to 60%: 0.5*0.6/0.3 = 1.0, 0.5*0.4/0.7 = 0.2857 -> 0.7778
    assert prior_correct(0.5, 0.3, 0.6) == pytest.approx(1.0 / (1.0 + 0.2 / 0.7))
    p = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    assert prior_correct(p, 0.4, 0.4) == pytest.approx(p)  # the same prior changes nothing
    assert prior_correct(prior_correct(p, 0.5, 0.1), 0.1, 0.5) == pytest.approx(p)  # and it undoes itself


def test_prior_correction_refuses_impossible_priors():
    with pytest.raises(DataError, match="training prior must be a COVID-19 share strictly between 0 and 1"):
        prior_correct(0.5, 1.0, 0.1)
    with pytest.raises(DataError, match="target prevalence"):
        prior_correct(0.5, 0.5, 0.0)
    with pytest.raises(DataError, match="Probabilities must lie in"):
        prior_correct(1.2, 0.5, 0.1)


def test_the_training_prior_of_smote_and_of_class_weights():
    assert effective_prior(300, 300) == 0.5  # SMOTE balanced the rows
    assert effective_prior(42, 282) == pytest.approx(42 / 324)
    assert effective_prior(42, 282, weight_covid=282 / 42) == pytest.approx(0.5)  # 'balanced' class weights


def data(seed=0, groups_per_class=15):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, 2 * groups_per_class)
    g = np.repeat(np.arange(2 * groups_per_class), sizes)
    y = (g >= groups_per_class).astype(int)
    p = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 0.8, 2 * groups_per_class)[g] + rng.normal(0, 0.8, len(g)))))
    return y, p, g


def test_brier_and_ece_against_hand_computations():
    y, p, g = data()
    b = brier(y, p, g)
    assert b.estimate == pytest.approx(brier_score_loss(y, p))
    assert b.method == CLUSTER and b.lo < b.estimate < b.hi
    e = ece(y, p, g, bins=4)
    bins = bin_of(p, 4)
    hand = sum((bins == k).sum() / len(p) * abs(p[bins == k].mean() - y[bins == k].mean()) for k in range(4))
    assert e.estimate == pytest.approx(hand)
    assert e.lo < e.estimate < e.hi and e.n_groups == (15, 15)


def test_equal_mass_bins_hold_about_as_many_images():
    p = np.random.default_rng(0).beta(0.3, 0.3, 1000)  # most mass near 0 and 1
    counts = np.bincount(bin_of(p, 10))
    assert len(counts) == 10 and counts.min() >= 99 and counts.max() <= 101


def test_reliability_bins():
    y, p, g = data(1)
    out = reliability(y, p, g, bins=5)
    bins = bin_of(p, 5)
    assert sum(b.count for b in out) == len(p)
    for k, b in enumerate(out):
        assert b.mean_predicted == pytest.approx(p[bins == k].mean())
        assert b.observed == pytest.approx(y[bins == k].mean())
        assert b.groups == len(set(g[bins == k]))
        assert 0 <= b.lo <= b.observed <= b.hi <= 1
    singles = reliability(y, p, np.arange(len(y)), bins=5)
    assert {b.method for b in singles} == {WILSON}


def test_predictive_values_by_bayes_with_propagated_intervals():
    y, p, g = data(2)
    ppv, npv = predictive_values(y, p, g, prevalence=0.05)
    cl = clusters(y, g)
    se, sp = (estimate(cl, p, k).interval(0.975) for k in ("covid_recall", "specificity"))

    def bayes_ppv(a, b):
        return a * 0.05 / (a * 0.05 + (1 - b) * 0.95)

    def bayes_npv(a, b):
        return b * 0.95 / (b * 0.95 + (1 - a) * 0.05)

    assert ppv.estimate == pytest.approx(bayes_ppv(se.estimate, sp.estimate))
    assert (ppv.lo, ppv.hi) == pytest.approx((bayes_ppv(se.lo, sp.lo), bayes_ppv(se.hi, sp.hi)))
    assert npv.estimate == pytest.approx(bayes_npv(se.estimate, sp.estimate))
    assert (npv.lo, npv.hi) == pytest.approx((bayes_npv(se.lo, sp.lo), bayes_npv(se.hi, sp.hi)))
    assert ppv.lo < ppv.estimate < ppv.hi and npv.lo < npv.estimate < npv.hi
    assert "0.975" in ppv.method
