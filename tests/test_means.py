"""The mean of a per-image value with a patient-level interval (covfeat.trust.means): it
covers a known mean, is wider than an interval that counts images as independent when a
patient's images are alike, and says when a category has too few patients for one."""

import math

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from covfeat.core.errors import DataError
from covfeat.trust.intervals import CLUSTER
from covfeat.trust.means import FEW, FLAT, MIN_GROUPS, mean_interval, means_by


def shares(rng, n_groups, a=2.0, b=2.0, max_images=5, noise=0.05):
    """Per-image shares in [0, 1] of ``n_groups`` patients with 1..max_images images each: a
    patient mean drawn from Beta(a, b) (the true mean a / (a + b), up to the clip), plus a
    little per-image noise, so a patient's images are strongly alike."""
    sizes = rng.integers(1, max_images + 1, n_groups)
    g = np.repeat(np.arange(n_groups), sizes)
    v = np.clip(rng.beta(a, b, n_groups)[g] + rng.normal(0, noise, len(g)), 0, 1)
    return v, g


def coverage(n_groups, a, b, reps=300, seed=1, groups=True):
    rng = np.random.default_rng(seed)
    truth = np.mean([shares(rng, 20000, a, b)[0].mean() for _ in range(3)])
    hit = 0
    with threadpool_limits(1):  # one core: the machine is shared
        for r in range(reps):
            v, g = shares(rng, n_groups, a, b)
            m = mean_interval(v, g if groups else np.arange(len(v)), bounds=(0, 1), n_boot=1000, seed=r)
            hit += m.lo <= truth <= m.hi
    return hit / reps


@pytest.mark.parametrize("n_groups,a,b", [(MIN_GROUPS, 2, 2), (12, 2, 2), (12, 4, 1), (30, 1, 4)])
def test_the_interval_covers_a_known_mean(n_groups, a, b):
    assert 0.91 <= coverage(n_groups, a, b) <= 0.99


def test_counting_images_as_independent_undercovers_and_patients_do_not():
    """The same data sets: resampling images (each its own group) misses the mean far more
    often than 5% when a patient's images are alike; resampling patients does not."""
    assert coverage(12, 2, 2, groups=False) < 0.85 < 0.91 <= coverage(12, 2, 2)


def test_clustered_data_give_a_wider_interval_than_naive():
    rng = np.random.default_rng(3)
    v, g = shares(rng, 20)
    clustered = mean_interval(v, g)
    naive = mean_interval(v, np.arange(len(v)))
    assert clustered.method == naive.method == CLUSTER
    assert clustered.estimate == naive.estimate == pytest.approx(v.mean())
    assert (clustered.hi - clustered.lo) > 1.4 * (naive.hi - naive.lo)
    # with one image per patient the two are the same interval
    one = np.arange(len(v))
    assert mean_interval(v, one).lo == pytest.approx(mean_interval(v, one.astype(str)).lo)


def test_a_patient_with_many_images_weighs_them_all():
    v = np.array([1.0, 1.0, 1.0, 0.0])
    assert mean_interval(v, ["p", "p", "p", "q"]).estimate == 0.75


def test_bounded_values_keep_their_interval_inside_the_bounds():
    rng = np.random.default_rng(4)
    v, g = shares(rng, 6, a=0.3, b=6)  # near 0
    m = mean_interval(v, g, bounds=(0, 1))
    assert 0 < m.lo < m.estimate < m.hi < 1
    raw = mean_interval(v, g)
    assert raw.lo < m.lo  # the symmetric interval would reach further down, past what the data allow


def test_two_seeds_agree_on_the_ends():
    rng = np.random.default_rng(5)
    v, g = shares(rng, 25)
    a, b = mean_interval(v, g, seed=0), mean_interval(v, g, seed=1)
    assert abs(a.lo - b.lo) < 0.01 and abs(a.hi - b.hi) < 0.01
    assert mean_interval(v, g, seed=0) == a  # the same seed, the same interval


def test_too_few_patients_give_no_interval_and_say_so():
    v = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    m = mean_interval(v, [1, 1, 2, 2, 3, 4])
    assert m.method.startswith(FEW) and math.isnan(m.lo) and not m.has_interval
    assert m.text() == "0.45 [no interval: too few patient groups (4, at least 5 needed); 4 patients, 6 images]"
    flat = mean_interval(np.full(10, 0.3), np.arange(10))
    assert flat.method == FLAT and math.isnan(flat.hi) and flat.estimate == pytest.approx(0.3)


def test_per_class_and_per_source():
    rng = np.random.default_rng(6)
    v, g = shares(rng, 30)
    y = (g < 15).astype(int)
    src = np.where(g % 10 < 2, "small", "big")  # 'small': 6 patients of 30, both classes
    src[(g == 0)] = "tiny"  # one patient alone
    r = means_by(v, g, y, {"source": src}, what="in-lung share", bounds=(0, 1))
    assert set(r) == {"overall", "class", "source"}
    assert list(r["class"]) == ["COVID-19", "NORMAL"] and list(r["source"]) == ["big", "small", "tiny"]
    assert r["class"]["COVID-19"].estimate == pytest.approx(v[y == 1].mean())
    assert r["class"]["COVID-19"].n_groups == 15 and r["class"]["COVID-19"].n_images == int((y == 1).sum())
    assert r["overall"].has_interval and r["source"]["big"].has_interval
    assert not r["source"]["tiny"].has_interval and "too few patient groups (1," in r["source"]["tiny"].method
    assert r["overall"].what == "in-lung share, all images" and r["source"]["tiny"].what == "in-lung share, source tiny"
    # the overall interval keeps each class's patients: a class with too few leaves it without one
    few = means_by(v[g < 18], g[g < 18], y[g < 18])
    assert not few["overall"].has_interval and "in a class" in few["overall"].method


@pytest.mark.parametrize("values,groups,kw,match", [
    ([], [], {}, "non-empty"),
    ([0.1, float("nan")], [1, 2], {}, "finite"),
    ([0.1, 0.2], [1], {}, "one group"),
    ([0.1, 1.2], [1, 2], {"bounds": (0, 1)}, "within"),
])
def test_bad_input_is_refused(values, groups, kw, match):
    with pytest.raises(DataError, match=match):
        mean_interval(values, groups, **kw)
