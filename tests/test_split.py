"""Splits and folds: stratified, seeded, and no patient on two sides."""

import numpy as np
import pytest

from covfeat.core.errors import ConfigError
from covfeat.head.config import SplitConfig
from covfeat.head.split import TEST, TRAIN, VAL, assign_split, cv_folds


def _data():
    rng = np.random.default_rng(1)
    patients = np.array([f"c{i}" for i in rng.integers(0, 60, 140)] + [f"n{i}" for i in range(600)])
    labels = np.array([1] * 140 + [0] * 600)
    return labels, patients


def test_patient_split_is_grouped_stratified_and_seeded():
    labels, patients = _data()
    s = assign_split(labels, patients, SplitConfig())
    for a in (TRAIN, VAL, TEST):
        for b in (TRAIN, VAL, TEST):
            if a < b:
                assert not set(patients[s == a]) & set(patients[s == b])
    for lab in (0, 1):
        share = (s[labels == lab] == TEST).mean()
        assert 0.22 < share < 0.38
    np.testing.assert_array_equal(s, assign_split(labels, patients, SplitConfig()))
    assert not np.array_equal(s, assign_split(labels, patients, SplitConfig(seed=1)))


def test_image_split_leaks_patients_as_the_paper_did():
    labels, patients = _data()
    s = assign_split(labels, patients, SplitConfig(by="image"))
    assert set(patients[s == TRAIN]) & set(patients[s == TEST])


@pytest.mark.parametrize("kw", [{"test": 0}, {"test": 0.7, "val": 0.4}, {"by": "site"}])
def test_bad_ratios(kw):
    with pytest.raises(ConfigError):
        SplitConfig(**kw)


def test_cv_folds_grouped_and_cover_everything():
    labels, patients = _data()
    held = np.zeros(len(labels), int)
    for r, f, s in cv_folds(labels, patients, folds=5, seed=0):
        held += s == TEST
        assert not set(patients[s == TEST]) & set(patients[s != TEST])
        assert not set(patients[s == VAL]) & set(patients[s == TRAIN])
        assert (labels[s == TEST] == 1).any() and (labels[s == VAL] == 1).any()
    np.testing.assert_array_equal(held, 1)
