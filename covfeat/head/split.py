"""Train / validation / test assignment and cross-validation folds, grouped by patient.

Grouping by patient is the default because several radiographs of one patient in both
train and test inflate every metric; ``by="image"`` reproduces the paper's naive split.
The split is a stage-two setting (:class:`covfeat.head.config.SplitConfig`): it is made from a
cache's manifest when a head is fitted, never stored in the cache.
"""

from __future__ import annotations

import numpy as np

from covfeat.core.errors import ConfigError
from covfeat.head.config import SplitConfig
from covfeat.trust.neardup import join_groups

TRAIN, VAL, TEST = 0, 1, 2


def groups_for(patients, by: str = "patient", pairs=()) -> np.ndarray:
    """The unit a split keeps whole: the patient (or the image, ``by="image"``), joined with
    its near-duplicates (``pairs`` of row indices, see :mod:`covfeat.trust.neardup`)."""
    patients = np.asarray(patients).astype(str)
    groups = patients if by == "patient" else np.array([f"image:{i}" for i in range(len(patients))])
    return join_groups(groups, pairs) if len(pairs) else groups


def usable_pairs(fc, cfg: SplitConfig, rows: np.ndarray) -> list[tuple[int, int]]:
    """The cache's near-duplicate pairs among manifest ``rows``, as positions in ``rows`` (none
    when ``cfg.near_duplicates`` is "ignore")."""
    if cfg.near_duplicates == "ignore":
        return []
    pos = {int(r): k for k, r in enumerate(rows)}
    return [(pos[i], pos[j]) for i, j, *_ in fc.near_duplicate_pairs() if i in pos and j in pos]


def patient_groups(fc, rows, near_duplicates: str = "group") -> np.ndarray:
    """The patient group of each of a cache's manifest ``rows``: its patient id, joined with
    the patients of its near-duplicates among ``rows``.  The one answer to "which rows are
    not independent draws", used by every patient-level interval (fit-head's Table 2, the
    probes): images of one patient, or copies of one radiograph, resample together whatever
    ``--split-by`` made the split with."""
    rows = np.asarray(rows, np.int64)
    return groups_for(fc.manifest["patient_id"][rows], "patient",
                      usable_pairs(fc, SplitConfig(near_duplicates=near_duplicates), rows))


def assign_split(labels: np.ndarray, patients: np.ndarray, cfg: SplitConfig, pairs=()) -> np.ndarray:
    """Return 0/1/2 (train/val/test) per image, stratified by label, grouped by ``cfg.by``
    and by near-duplicate ``pairs``.

    Within each label, whole groups are shuffled with the seed and dealt to test, then
    validation, until each reaches its share of that label's images; the rest train.
    A patient whose images carry both labels is placed by its majority label.
    """
    labels = np.asarray(labels)
    groups = groups_for(patients, cfg.by, pairs)
    rng = np.random.default_rng(cfg.seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    group_label = np.array([np.bincount(labels[inverse == g], minlength=2).argmax() for g in range(len(uniq))])
    group_split = np.full(len(uniq), TRAIN)
    for lab in np.unique(group_label):
        members = np.flatnonzero(group_label == lab)
        members = members[rng.permutation(len(members))]
        total = sizes[members].sum()
        targets = [(TEST, cfg.test * total), (VAL, cfg.val * total)]
        i = 0
        for split, target in targets:
            got = 0
            while i < len(members) and got + sizes[members[i]] / 2 <= target:
                group_split[members[i]] = split
                got += sizes[members[i]]
                i += 1
    return group_split[inverse].astype(np.int8)


def cv_folds(labels: np.ndarray, patients: np.ndarray, folds: int, repeats: int = 1,
             by: str = "patient", seed: int = 0, val: float = 0.1, pairs=()):
    """Yield (repeat, fold, split array) for stratified, grouped k-fold cross-validation.

    Each fold's held-out part is its test set; a validation share is carved from the rest,
    grouped the same way, for the per-epoch curves and threshold choice.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = groups_for(patients, by, pairs)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}.")
    min_groups = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    if min_groups < folds:
        raise ConfigError(
            f"--folds {folds} needs at least {folds} {by}s in every class; the smallest class has {min_groups}."
        )
    for r in range(repeats):
        skf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for f, (rest, held) in enumerate(skf.split(np.zeros(len(labels)), labels, groups)):
            split = np.full(len(labels), TRAIN, dtype=np.int8)
            split[held] = TEST
            if val > 0:
                inner = assign_split(labels[rest], groups[rest],
                                     SplitConfig(val=0.0, test=val / (1 - 1.0 / folds), by="patient", seed=seed + 1000 * r + f))
                split[rest[inner == TEST]] = VAL
            yield r, f, split
