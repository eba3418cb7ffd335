"""Which probability a deployer gets: p_covid moved from the prior the head was trained toward
to the prevalence it is read at.

A head trained on SMOTE-balanced rows (or with balancing class weights) learns toward a 50/50
prior, whatever the share of COVID-19 in its data; its p_covid is a probability only for a
population with half its patients ill.  ``predict`` and ``export`` therefore give p_covid
corrected by Bayes' rule on the odds (:func:`covfeat.trust.calibration.prior_correct`) from
that training prior back to the COVID-19 share of the run's data, or to the deployment
prevalence the user states (``--prevalence``), and keep the head's own number as
``p_covid_raw``.  The data's share is that of all the run's images (training, validation and
test, which the split stratified alike): the best estimate of the population the data were
drawn from, and the one the run's own test numbers are read at.  The labels do not move: the map is monotone, so the run's threshold, moved
by the same map, cuts the corrected probabilities exactly where the raw threshold cut the raw
ones (:meth:`PriorCorrection.threshold`).

The training prior is read from what the run did, never restated: the real training rows'
labels (the run's split over its cache's manifest), plus the SMOTE rows the run recorded
(``n_train_smote``, added to the minority) or the class weights
:func:`covfeat.head.balance.balance` gives, through
:func:`covfeat.trust.calibration.effective_prior`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covfeat.core.errors import RunError
from covfeat.core.settings import fail
from covfeat.head.balance import balance
from covfeat.head.runs import Run
from covfeat.head.split import TRAIN
from covfeat.trust.calibration import effective_prior, prior_correct

DATA, STATED = "the run's data", "--prevalence"

WHY = {"smote": "SMOTE's balanced training rows", "class-weight": "the balancing class weights",
       "none": "the training rows' own share"}


def check_prevalence(prevalence: float | None) -> float | None:
    """Refuse a prevalence that is no COVID-19 share, before any work."""
    if prevalence is not None and not 0 < prevalence < 1:
        raise fail("--prevalence", "a COVID-19 share strictly between 0 and 1", prevalence)
    return prevalence


@dataclass(frozen=True)
class PriorCorrection:
    """p_covid from ``train_prior`` (what the head was trained toward) to ``target`` (the
    COVID-19 share of the run's images, or the stated ``--prevalence``: ``target_from``).
    ``n_covid`` and ``n_normal`` count the run's images (training, validation and test)."""

    train_prior: float
    target: float
    target_from: str
    balance: str
    n_covid: int
    n_normal: int

    def apply(self, p) -> np.ndarray:
        """Corrected p_covid of raw p_covid (any shape)."""
        return prior_correct(p, self.train_prior, self.target)

    def threshold(self, raw_threshold: float) -> float:
        """The run's threshold in corrected units: p >= t exactly when apply(p) >= apply(t),
        since the map is strictly increasing (ties of float rounding aside)."""
        return float(self.apply(min(max(raw_threshold, 0.0), 1.0)))

    def describe(self) -> str:
        """One line a reader of a predict table or a model card needs: which probability this is."""
        to = ("the COVID-19 share of the run's images" if self.target_from == DATA else
              "the stated prevalence (--prevalence)")
        return (f"p_covid is corrected by Bayes' rule from the prior the head was trained toward, "
                f"{self.train_prior:.3f} ({WHY[self.balance]}), to {to}, {self.target:.3f}; p_covid_raw is the "
                "head's own output.")

    def as_dict(self) -> dict:
        return {**asdict(self), "method": "prior correction on the odds (Saerens et al. 2002)"}


def run_labels(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the run's images with features (every split) and of its training images, from
    its split over its cache's manifest.

    Raises
    ------
    RunError
        The cache is gone, is another cache than the run's, or disagrees with the run's counts.
    """
    fc = run.own_cache("covfeat reads the run's labels from it to know the prior its head was trained toward")
    path = run.cache_info["path"]
    split = run.split(fc.n_rows)
    used = (split >= 0) & fc.has_features()
    train = np.flatnonzero(used & (split == TRAIN))
    if len(train) != run.metrics.get("n_train_real"):
        raise RunError(f"{run.path} records {run.metrics.get('n_train_real')} training images, but its split over "
                       f"'{path}' gives {len(train)}; the run and its cache disagree.")
    labels = np.asarray(fc.manifest["label"], int)
    return labels[np.flatnonzero(used)], labels[train]


def trained_prior(balance_kind: str, labels: np.ndarray, n_smote: int) -> float:
    """The COVID-19 prior a head was trained toward, from its real training labels and how it
    balanced them (``n_smote`` SMOTE rows went to the minority class)."""
    n1, n0 = int((labels == 1).sum()), int((labels == 0).sum())
    if balance_kind == "smote":
        if n_smote != abs(n1 - n0):
            raise RunError(f"The run records {n_smote} SMOTE rows, but its training rows ({n1} COVID-19, {n0} NORMAL) "
                           f"need {abs(n1 - n0)}; the run and its cache disagree.")
        return effective_prior(n1 + (n_smote if n1 < n0 else 0), n0 + (n_smote if n0 < n1 else 0))
    if balance_kind == "class-weight":
        from covfeat.head.config import HeadConfig

        w = balance(np.zeros((len(labels), 1), np.float32), labels, HeadConfig(balance="class-weight")).sample_weight
        return effective_prior(n1, n0, float(w[labels == 1][0]), float(w[labels == 0][0]))
    return effective_prior(n1, n0)


def prior_correction(run: str | Path | Run, prevalence: float | None = None) -> PriorCorrection:
    """How a run's p_covid is corrected: from its training prior to the COVID-19 share of the
    run's images, or to ``prevalence`` when given.

    Raises
    ------
    ConfigError, RunError
    """
    check_prevalence(prevalence)
    run = (run if isinstance(run, Run) else Run(run)).require_single("the prior correction")
    every, train = run_labels(run)
    kind = run.fit_config().head.balance
    tau = trained_prior(kind, train, int(run.metrics.get("n_train_smote", 0)))
    n1, n0 = int((every == 1).sum()), int((every == 0).sum())
    return PriorCorrection(tau, effective_prior(n1, n0) if prevalence is None else float(prevalence),
                           DATA if prevalence is None else STATED, kind, n1, n0)
