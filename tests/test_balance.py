"""SMOTE in feature space: imbalanced-learn's own rows, with their parents read back."""

import numpy as np
import pytest

from covfeat.core.errors import DataError
from covfeat.head.balance import balance
from covfeat.head.config import HeadConfig


def test_balance_is_imblearns_smote_with_parents_read_back():
    from imblearn.over_sampling import SMOTE

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 30)).astype(np.float32)
    y = np.array([1] * 9 + [0] * 31)
    bal = balance(X, y, HeadConfig(seed=3))
    Xr, yr = SMOTE(k_neighbors=5, random_state=3).fit_resample(X, y)
    assert len(bal.parents) == 31 - 9 and (bal.labels == yr).all()
    assert (y[bal.parents] == 1).all()  # parents are minority training rows
    np.testing.assert_allclose(bal.weights.sum(1), 1, atol=1e-6)
    mine = X[bal.parents[:, 0]] * bal.weights[:, :1] + X[bal.parents[:, 1]] * bal.weights[:, 1:]
    np.testing.assert_allclose(mine, Xr[40:], atol=1e-4)


def test_balance_reduces_k_for_a_tiny_minority_and_refuses_one_row():
    X = np.random.default_rng(0).standard_normal((12, 5))
    bal = balance(X, np.array([1, 1, 1] + [0] * 9), HeadConfig())
    assert len(bal.parents) == 6
    with pytest.raises(DataError, match="SMOTE needs at least 2 training rows of the minority class, found 1"):
        balance(X, np.array([1] + [0] * 11), HeadConfig())
