"""Balancing the training rows: SMOTE in feature space (imbalanced-learn), or class weights.

SMOTE runs on the flattened original maps of the training rows only; every synthetic
row is kept as its two real parents and their weights, so view j of a synthetic row is
view j of its parents mixed with that weight, formed on the fly (no memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covfeat.core.errors import DataError
from covfeat.head.config import HeadConfig

SMOTE_MARK = 1e-3  # scale of the row-identity columns used to read SMOTE's parents back


@dataclass
class Balanced:
    """The balanced training set: real rows plus SMOTE rows defined by two parents and a weight."""

    labels: np.ndarray  # (n,) of real then synthetic rows
    parents: np.ndarray  # (n_syn, 2) indices into the real training rows
    weights: np.ndarray  # (n_syn, 2) interpolation weights, summing to 1
    sample_weight: np.ndarray | None = None


def balance(X0: np.ndarray, y: np.ndarray, cfg: HeadConfig) -> Balanced:
    """SMOTE (imbalanced-learn) on the flattened original maps of the training rows.

    Row-identity columns of scale SMOTE_MARK ride along, so the parents and the weight of
    every synthetic row can be read back from imbalanced-learn's own output; view j of a
    synthetic row is then view j of its parents mixed with that same weight.
    """
    n = len(y)
    none = Balanced(y, np.zeros((0, 2), int), np.zeros((0, 2)))
    if cfg.balance == "none":
        return none
    counts = np.bincount(y, minlength=2)
    if cfg.balance == "class-weight":
        w = (n / (2.0 * counts))[y]
        return Balanced(y, none.parents, none.weights, sample_weight=w.astype(np.float32))
    minority = int(np.argmin(counts))
    if counts[minority] == counts[1 - minority]:
        return none
    if counts[minority] < 2:
        raise DataError(
            f"SMOTE needs at least 2 training rows of the minority class, found {counts[minority]}; "
            "use --balance class-weight or none."
        )
    from imblearn.over_sampling import SMOTE

    k = min(cfg.smote_k, int(counts[minority]) - 1)
    # SMOTE only needs distances between rows; n x n coordinates from the Gram matrix keep
    # every pairwise distance of the flattened maps exactly, at a fraction of the width.
    X = np.asarray(X0, np.float32)
    gram = (X @ X.T).astype(np.float64)
    lam, vec = np.linalg.eigh(gram)
    coords = (vec * np.sqrt(np.clip(lam, 0, None))).astype(np.float64)
    scale = float(np.abs(coords).mean()) or 1.0
    ident = np.eye(n) * (SMOTE_MARK * scale)
    Xr, yr = SMOTE(k_neighbors=k, random_state=cfg.seed).fit_resample(np.hstack([coords, ident]), y)
    X0 = coords
    syn = Xr[n:, X0.shape[1]:] / (SMOTE_MARK * scale)
    parents = np.zeros((len(syn), 2), int)
    weights = np.zeros((len(syn), 2))
    for i, row in enumerate(syn):
        nz = np.flatnonzero(row > 0)  # exactly the two parents (one if the step was 0)
        top = nz[np.argsort(row[nz])[::-1][:2]]
        if len(top) == 1:
            parents[i], weights[i] = [top[0], top[0]], [1.0, 0.0]
        else:
            parents[i] = top
            weights[i] = row[top] / row[top].sum()
    return Balanced(np.asarray(yr), parents, weights)
