"""Patient-level intervals for every number covfeat reports, differences between two models,
and the three-way verdict a referee signs.

The unit sampled is the patient group (patients joined by near-duplicates; a group id per row), not the image:
Cohen has up to five radiographs per patient. Every interval here resamples whole groups, stratified by class:
each resample keeps each class's number of groups, so none lacks a class and none is dropped. Groups holding
both classes (possible once near-duplicates join patients) are a third stratum.

The interval (``CLUSTER``) is not the percentile interval, which covered a true AUC of 0.96 78% of the time at
8 groups per class (the audit's old ``group_bootstrap_auc``). The bootstrap gives the variance, times m/(m-1)
(it divides by m where the unbiased cluster variance divides by m - 1; m: the fewest groups of a class the
number rests on); the interval is built on the logit scale, which stays in (0, 1) and reaches past a boundary
the resamples cannot cross (Pepe 2003, sec. 5.2; Qin & Hotilovac 2008), with a t quantile of m - 1 degrees of
freedom for a variance estimated from few patients (Korn & Graubard 1998 use t with clusters minus strata;
m - 1 is fewer). At an estimate of 0 or 1, or resamples that do not vary, there is no spread to estimate: the
interval is a score interval counting each group as one image (``SCORE``; Kish's effective count (sum n_g)^2 /
sum n_g^2, the worst case of within-patient correlation): Wilson's for proportions, Newcombe's (2006) for the
AUC. A class with one group gives no interval to a number resting on it (``NONE``). Proportions whose groups
all have one image keep Wilson's interval on images (``WILSON``).

Differences use the MOVER of Zou & Donner (2008): each side's own interval, joined by the correlation of the
two estimates over the same resamples (paired) or zero (unpaired); p-values invert that interval, and Holm's
step-down adjusts the p-values of a family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from covfeat.core.errors import DataError

N_BOOT = 2000  # two seeds agree on the ends to well within 0.01 (tests/test_intervals.py)
LEVEL = 0.95
MARGIN = 0.05  # AUC margin of the verdicts
PREVALENCE_TOLERANCE = 0.01  # COVID-19 shares closer than this count as the same prevalence

WILSON, CLUSTER, SCORE, NONE = "wilson", "cluster bootstrap", "patient-level score", "too few patient groups"

CELLS = ("TP", "FP", "FN", "TN")
# metric -> (numerator, denominator) as coefficients of (TP, FP, FN, TN): every Table-2 proportion.
PROPORTIONS = {
    "covid_precision": ((1, 0, 0, 0), (1, 1, 0, 0)), "covid_recall": ((1, 0, 0, 0), (1, 0, 1, 0)),
    "covid_f1": ((2, 0, 0, 0), (2, 1, 1, 0)), "normal_precision": ((0, 0, 0, 1), (0, 0, 1, 1)),
    "normal_recall": ((0, 0, 0, 1), (0, 1, 0, 1)), "normal_f1": ((0, 0, 0, 2), (0, 1, 1, 2)),
    "specificity": ((0, 0, 0, 1), (0, 1, 0, 1)), "accuracy": ((1, 0, 0, 1), (1, 1, 1, 1)),
}
RANKINGS = ("roc_auc", "pr_auc")
# Metrics that change with the COVID-19 share alone; an unpaired comparison across prevalences refuses them.
PREVALENCE_DEPENDENT = {"covid_precision", "normal_precision", "covid_f1", "normal_f1", "accuracy", "pr_auc"}


@dataclass(frozen=True)
class Interval:
    """A number, its interval, how the interval was made, and what it rests on: images and
    patient groups per class (COVID-19, NORMAL) among the rows behind it."""
    metric: str
    estimate: float
    lo: float
    hi: float
    level: float
    method: str
    n_images: tuple[int, int]
    n_groups: tuple[int, int]


@dataclass(frozen=True)
class Clusters:
    """Rows mapped to groups, each group's stratum, and the resampled multiplicity of every
    group (n_boot, n_groups): one draw of groups, shared by every number of a comparison."""
    y: np.ndarray
    index: np.ndarray  # group index of each row
    stratum: np.ndarray  # per group: 0 NORMAL only, 1 COVID-19 only, 2 both
    weights: np.ndarray


def clusters(y, groups, n_boot: int = N_BOOT, seed: int = 0) -> Clusters:
    """The stratified cluster bootstrap's draws: within each stratum, as many groups as it
    has, with replacement.  A stratum of one group is drawn as that group every time: it adds
    no spread, so numbers resting on it get no interval (``NONE``), never a false one."""
    y = np.asarray(y, int)
    if len(y) == 0 or not np.isin(y, (0, 1)).all():
        raise DataError(f"Expected labels 0 (NORMAL) and 1 (COVID-19), got {sorted(set(y.tolist()))[:5]}.")
    uniq, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(index) != len(y):
        raise DataError(f"Expected one group id per row ({len(y)}), got {len(index)}.")
    has = np.zeros((len(uniq), 2), bool)
    has[index, y] = True
    stratum = np.where(has.all(1), 2, has[:, 1].astype(int))
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(uniq)))
    for s in range(3):
        members = np.flatnonzero(stratum == s)
        m = len(members)
        if m:
            draws = rng.integers(0, m, (n_boot, m)) + m * np.arange(n_boot)[:, None]
            weights[:, members] = np.bincount(draws.ravel(), minlength=n_boot * m).reshape(n_boot, m)
    return Clusters(y, index, stratum, weights)


def interval_method(groups) -> str:
    """Which interval a proportion over these rows uses: ``"wilson"`` when every group has one
    image (the rows are then independent draws), else ``"cluster bootstrap"``."""
    _, counts = np.unique(np.asarray(groups).astype(str), return_counts=True)
    return WILSON if counts.max(initial=1) == 1 else CLUSTER


def _sums(cl: Clusters, values) -> np.ndarray:
    return np.bincount(cl.index, weights=np.asarray(values, float), minlength=cl.weights.shape[1])


def kish(sizes) -> float:
    """Kish's effective number of groups, (sum n_g)^2 / sum n_g^2: the effective sample size
    when the images of a group are perfectly correlated."""
    s = np.asarray(sizes, float)
    return float(s.sum() ** 2 / (s ** 2).sum()) if s.sum() else 0.0


SPREAD_FLOOR = 1e-12  # a bootstrap variance below it is rounding noise: no zero-wide "bootstrap" interval


@dataclass(frozen=True)
class Estimate:
    """A number with its bootstrap replicates, from which an interval at any level follows.
    ``m`` is the fewest groups of a class (its stratum) behind it, ``score_n`` the effective
    count of the patient-level score interval (a pair (COVID-19, NORMAL) for the AUC)."""
    metric: str
    value: float
    replicates: np.ndarray | None
    m: int
    score_n: float | tuple[float, float]
    n_images: tuple[int, int]
    n_groups: tuple[int, int]
    prevalence: float  # COVID-19 share of all the set's images
    wilson_k: int | None = None  # set when the Wilson interval on images applies

    def spread(self) -> float:
        """Bootstrap variance of the estimate with the m/(m-1) correction (0 without replicates)."""
        if self.replicates is None or self.m < 2:
            return 0.0
        return float(np.var(self.replicates, ddof=1)) * self.m / (self.m - 1)

    def interval(self, level: float = LEVEL) -> Interval:
        lo, hi, method = self._bounds(level)
        return Interval(self.metric, float(self.value), float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1)),
                        level, method, self.n_images, self.n_groups)

    def _bounds(self, level: float) -> tuple[float, float, str]:
        from scipy.stats import norm, t

        if math.isnan(self.value):
            return math.nan, math.nan, NONE
        if self.wilson_k is not None:
            n = sum(self.n_images)
            return (*score_bounds(self.wilson_k / n, n, float(norm.ppf(0.5 + level / 2))), WILSON)
        if self.m < 2:
            return math.nan, math.nan, NONE
        q = float(t.ppf(0.5 + level / 2, self.m - 1))
        v, p = self.spread(), self.value
        if v > SPREAD_FLOOR and 0 < p < 1:
            half = q * math.sqrt(v) / (p * (1 - p))
            mid = math.log(p / (1 - p))
            return 1 / (1 + math.exp(-(mid - half))), 1 / (1 + math.exp(-(mid + half))), CLUSTER
        n = newcombe_n(p, *self.score_n) if isinstance(self.score_n, tuple) else self.score_n
        return (*score_bounds(p, n, q), SCORE)


def score_bounds(p: float, n: float, q: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion p over n (possibly effective) draws, quantile q."""
    d = 1 + q * q / n
    c = (p + q * q / (2 * n)) / d
    h = q * math.sqrt(p * (1 - p) / n + q * q / (4 * n * n)) / d
    return c - h, c + h


def newcombe_n(auc: float, n1: float, n0: float) -> float:
    """The effective count n with Var(AUC) = AUC (1 - AUC) / n under Newcombe's (2006, Stat Med
    25:559, method 5) variance of the Mann-Whitney AUC for n1 positives and n0 negatives."""
    k = (n1 + n0) / 2 - 1
    return n1 * n0 / (1 + k * (1 - auc) / (2 - auc) + k * auc / (1 + auc))


def _class_counts(cl: Clusters, rows: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], list[np.ndarray]]:
    """Images and groups per class (COVID-19, NORMAL) among ``rows``, and each class's group sizes."""
    imgs, grps, sizes = [], [], []
    for c in (1, 0):
        g = np.bincount(cl.index[rows & (cl.y == c)], minlength=cl.weights.shape[1])
        imgs.append(int(g.sum()))
        grps.append(int((g > 0).sum()))
        sizes.append(g[g > 0])
    return tuple(imgs), tuple(grps), sizes


def ratio_estimate(cl: Clusters, metric: str, num, den) -> Estimate:
    """A ratio sum(num) / sum(den) over rows (den > 0 marks the rows behind it), with its
    replicates as ratios of resampled group sums; m counts every group of a class behind it.
    A resample with an empty denominator (possible only for numbers that condition on the
    model's calls, such as precision) leaves the ratio undefined; when that can happen with
    probability above 1/1000 (exact, from the group counts) the bootstrap cannot describe the
    number and the interval is the patient-level score interval; rarer empty resamples take
    the estimate's value."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    rows = den > 0
    n_images, n_groups, _ = _class_counts(cl, rows)
    strata = _class_counts(cl, np.ones(len(rows), bool))[1]  # a class's spread comes from all its groups
    m = min((k for k, n in zip(strata, n_groups) if n), default=0)
    total = den.sum()
    value = num.sum() / total if total else math.nan
    whole = np.bincount(cl.index[rows], minlength=cl.weights.shape[1])
    hit, all_groups = np.bincount(cl.stratum[whole > 0], minlength=3), np.bincount(cl.stratum, minlength=3)
    p_empty = float(np.prod([(1 - k / n) ** n for k, n in zip(hit, all_groups) if n]))
    reps = None
    if m >= 2 and p_empty <= 1e-3:
        gn, gd = cl.weights @ _sums(cl, num), cl.weights @ _sums(cl, den)
        reps = np.divide(gn, gd, out=np.full(len(gn), value), where=gd > 0)
    return Estimate(metric, value, reps, m, kish(whole[whole > 0]), n_images, n_groups, float(cl.y.mean()))


def confusion_rows(y, p, threshold: float = 0.5) -> np.ndarray:
    """(n, 4) indicators of each row's cell: TP, FP, FN, TN (COVID-19, label 1, positive)."""
    y = np.asarray(y, int)
    call = np.asarray(p, float) >= threshold
    return np.stack([(y == 1) & call, (y == 0) & call, (y == 1) & ~call, (y == 0) & ~call], 1).astype(float)


def proportion_estimate(cl: Clusters, p, metric: str, threshold: float = 0.5) -> Estimate:
    """One Table-2 proportion (a key of :data:`PROPORTIONS`); Wilson on images where every group
    behind it has one image and the number is a plain proportion (not F1)."""
    a, b = (np.asarray(c, float) for c in PROPORTIONS[metric])
    cells = confusion_rows(cl.y, p, threshold)
    est = ratio_estimate(cl, metric, cells @ a, cells @ b)
    rows = cells @ b > 0
    plain = set(a.tolist()) <= {0, 1} and "f1" not in metric
    if plain and rows.any() and interval_method(cl.index[rows]) == WILSON:
        return replace(est, replicates=None, wilson_k=int(round((cells @ a).sum())))
    return est


def _auc_matrix(cl: Clusters, s: np.ndarray) -> np.ndarray:
    """(groups, groups): sum over one group's COVID-19 rows and another's NORMAL rows of
    1[s_pos > s_neg] + 0.5 * 1[s_pos == s_neg] -- the AUC's numerator, by pair of groups."""
    G = cl.weights.shape[1]
    H = np.zeros((G, G))
    pos, pos_group = s[cl.y == 1], cl.index[cl.y == 1]
    neg, neg_group = s[cl.y == 0], cl.index[cl.y == 0]
    for h in np.unique(neg_group):  # one NORMAL group at a time: every positive's wins against it
        mine = np.sort(neg[neg_group == h])
        wins = np.searchsorted(mine, pos, "left") + 0.5 * (np.searchsorted(mine, pos, "right") -
                                                           np.searchsorted(mine, pos, "left"))
        H[:, h] = np.bincount(pos_group, weights=wins, minlength=G)
    return H


def average_precision(y, s, w=None) -> np.ndarray:
    """scikit-learn's average precision, sum_k (R_k - R_(k-1)) P_k over distinct thresholds,
    with row weights ``w`` (n_boot, n) for resamples (None: every row once)."""
    y, s = np.asarray(y, float), np.asarray(s, float)
    order = np.argsort(-s, kind="stable")
    ends = np.r_[np.flatnonzero(np.diff(s[order])), len(s) - 1]  # last row of each tie block
    w = np.ones((1, len(s))) if w is None else np.asarray(w, float)
    out = np.empty(len(w))
    for b0 in range(0, len(w), 256):  # memory: 256 resamples of every row at a time
        ws = w[b0:b0 + 256, order]
        tp = np.cumsum(ws * y[order], 1)[:, ends]
        called = np.cumsum(ws, 1)[:, ends]
        recall = tp / tp[:, -1:]
        prec = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        out[b0:b0 + 256] = (np.diff(recall, prepend=0.0, axis=1) * prec).sum(1)
    return out


def ranking_estimate(cl: Clusters, p, metric: str) -> Estimate:
    """ROC AUC (Mann-Whitney, ties halved) or PR AUC (average precision) with their replicates."""
    s = np.asarray(p, float)
    rows = np.ones(len(s), bool)
    n_images, n_groups, sizes = _class_counts(cl, rows)
    if min(n_images) == 0:
        return Estimate(metric, math.nan, None, 0, 0.0, n_images, n_groups, float(cl.y.mean()))
    W = cl.weights
    if metric == "roc_auc":
        H = _auc_matrix(cl, s)
        c1, c0 = (np.bincount(cl.index, weights=(cl.y == c).astype(float), minlength=W.shape[1]) for c in (1, 0))
        value = H.sum() / (c1.sum() * c0.sum())
        reps = ((W @ H) * W).sum(1) / ((W @ c1) * (W @ c0)) if min(n_groups) >= 2 else None
    else:
        value = float(average_precision(cl.y, s)[0])
        reps = average_precision(cl.y, s, W[:, cl.index]) if min(n_groups) >= 2 else None
    return Estimate(metric, value, reps, min(n_groups), (kish(sizes[0]), kish(sizes[1])), n_images, n_groups,
                    float(cl.y.mean()))


def estimate(cl: Clusters, p, metric: str, threshold: float = 0.5) -> Estimate:
    """Any reported number: a Table-2 proportion, ``roc_auc`` or ``pr_auc``."""
    if metric in PROPORTIONS:
        return proportion_estimate(cl, p, metric, threshold)
    if metric in RANKINGS:
        return ranking_estimate(cl, p, metric)
    raise DataError(f"No interval for {metric!r}; expected one of {sorted(PROPORTIONS) + list(RANKINGS)}.")


def intervals(y, p, groups, threshold: float = 0.5, level: float = LEVEL, n_boot: int = N_BOOT,
              seed: int = 0) -> dict[str, Interval]:
    """Every Table-2 proportion, ROC AUC and PR AUC with its patient-level interval."""
    cl = clusters(y, groups, n_boot, seed)
    return {k: estimate(cl, p, k, threshold).interval(level) for k in [*PROPORTIONS, *RANKINGS]}


def cell_counts(y, p, groups, threshold: float = 0.5) -> dict[str, tuple[int, int]]:
    """TP, FP, FN, TN and the class totals as (images, patient groups): the patients behind each count."""
    y, g = np.asarray(y, int), np.asarray(groups).astype(str)
    cells = confusion_rows(y, p, threshold).astype(bool)
    out = {k: (int(cells[:, i].sum()), len(set(g[cells[:, i]]))) for i, k in enumerate(CELLS)}
    out.update({k: (int((y == c).sum()), len(set(g[y == c]))) for k, c in (("n_covid", 1), ("n_normal", 0))})
    return out


# --------------------------------------------------------------------------- differences


def mover(a: Interval, b: Interval, r: float) -> tuple[float, float]:
    """Zou & Donner's (2008, Stat Med 27:1693) limits of a - b from each side's own interval and
    the correlation r of the two estimates (Newcombe 1998's method 10 for paired proportions)."""
    da, ua, db, ub = a.estimate - a.lo, a.hi - a.estimate, b.estimate - b.lo, b.hi - b.estimate
    d = a.estimate - b.estimate
    lo = d - math.sqrt(max(da * da - 2 * r * da * ub + ub * ub, 0.0))
    hi = d + math.sqrt(max(ua * ua - 2 * r * ua * db + db * db, 0.0))
    return lo, hi


@dataclass(frozen=True)
class Difference(Interval):
    """a - b with its interval (method: the MOVER) and the p-value of the null it was given."""
    p_value: float = 1.0
    paired: bool = True


def _p_value(limits, null: float) -> float:
    """The smallest alpha whose (1 - alpha) interval excludes ``null``, by bisection (1 when none does)."""
    lo, hi = 0.0, 1.0  # the (1 - lo) interval holds the null, the (1 - hi) one does not
    for _ in range(40):
        mid = (lo + hi) / 2
        a, b = limits(1 - mid)
        lo, hi = (mid, hi) if a <= null <= b else (lo, mid)
    return hi


def paired_difference(y, p_a, p_b, groups, metric: str = "roc_auc", threshold: float = 0.5, null: float = 0.0,
                      level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Difference:
    """Metric of scores ``p_a`` minus that of ``p_b`` on the same rows (run vs control, run vs
    occluded, backbone vs backbone): both sides are computed on the same resamples, and the
    correlation of their replicates pairs them (zero when either side has no spread to correlate)."""
    cl = clusters(y, groups, n_boot, seed)
    ea, eb = estimate(cl, p_a, metric, threshold), estimate(cl, p_b, metric, threshold)
    r = 0.0
    if ea.replicates is not None and eb.replicates is not None and min(ea.spread(), eb.spread()) > SPREAD_FLOOR:
        r = float(np.corrcoef(ea.replicates, eb.replicates)[0, 1])

    def limits(lv):
        return mover(ea.interval(lv), eb.interval(lv), r)

    return Difference(metric, float(ea.value - eb.value), *limits(level), level, "paired MOVER", ea.n_images,
                      ea.n_groups, _p_value(limits, null), True)


def unpaired_difference(a: Estimate, b: Estimate, null: float = 0.0, level: float = LEVEL) -> Difference:
    """a - b for different rows (internal test vs external set), each side with its own
    clustered interval, joined with r = 0.  Only like numbers: the same metric, and one that
    depends on prevalence only between sets of the same COVID-19 share."""
    if a.metric != b.metric:
        raise DataError(f"Cannot compare {a.metric} with {b.metric}; compare the same metric on both sets.")
    if a.metric in PREVALENCE_DEPENDENT and abs(a.prevalence - b.prevalence) > PREVALENCE_TOLERANCE:
        raise DataError(f"{a.metric} depends on prevalence (COVID-19 share {a.prevalence:.2f} vs {b.prevalence:.2f}); "
                        "compare covid_recall, specificity or roc_auc across these sets instead.")

    def limits(lv):
        return mover(a.interval(lv), b.interval(lv), 0.0)

    n_img = (a.n_images[0] + b.n_images[0], a.n_images[1] + b.n_images[1])
    n_grp = (a.n_groups[0] + b.n_groups[0], a.n_groups[1] + b.n_groups[1])
    return Difference(a.metric, float(a.value - b.value), *limits(level), level, "MOVER", n_img, n_grp,
                      _p_value(limits, null), False)


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values of a family of comparisons, in the given order:
    a comparison is significant at family-wise alpha when its adjusted p-value is <= alpha.
    Adjusts p-values, not interval levels: the intervals stay at their stated level."""
    p = np.asarray(p_values, float)
    order = np.argsort(p, kind="stable")
    k = len(p)
    stepped = np.maximum.accumulate(p[order] * (k - np.arange(k)))
    out = np.empty(k)
    out[order] = np.minimum(stepped, 1.0)
    return out


# --------------------------------------------------------------------------- verdicts

FLAGGED, CLEAR, INCONCLUSIVE = "FLAGGED", "CLEAR", "INCONCLUSIVE"


@dataclass(frozen=True)
class Verdict:
    """The parts of a verdict sentence (the caller writes it); ``needed``: patients per class
    (COVID-19, NORMAL) that would tell at the observed spread, when INCONCLUSIVE."""
    status: str
    relation: str
    estimate: float
    lo: float
    hi: float
    null: float
    margin: float
    needed: tuple[int, int] | None = None
    needed_for: str = ""


def patients_needed(interval, half_width: float) -> tuple[int, int]:
    """Patient groups per class (COVID-19, NORMAL) for an interval of half-width ``half_width``
    at the observed spread: a half-width shrinks as 1 / sqrt(patients), so
    n_needed = ceil(n_now * (h_now / h) ** 2) per class, h_now = (hi - lo) / 2.  Approximate:
    it keeps the class ratio and ignores the t quantile's own shrinking (which needs fewer)."""
    if not half_width > 0:
        raise DataError(f"Target half-width must be positive, got {half_width}.")
    now = (interval.hi - interval.lo) / 2
    scale = (now / half_width) ** 2
    return tuple(int(math.ceil(n * scale - 1e-9)) for n in interval.n_groups)


def verdict(interval, null: float, margin: float = MARGIN) -> Verdict:
    """Three answers (an Interval or a Difference against ``null``): FLAGGED when the interval
    excludes the null by more than the margin, CLEAR when it lies within null +- margin (an
    equivalence shown), else INCONCLUSIVE, with the patients that would tell.  An interval
    that reaches chance is never read as no signal: it is CLEAR only inside the margin."""
    est, lo, hi = interval.estimate, interval.lo, interval.hi
    parts = dict(estimate=est, lo=lo, hi=hi, null=null, margin=margin)
    if math.isnan(lo) or math.isnan(hi):
        return Verdict(INCONCLUSIVE, "has no interval (too few patient groups) against", **parts)
    if lo > null + margin or hi < null - margin:
        return Verdict(FLAGGED, "differs by more than the margin from", **parts)
    if null - margin <= lo and hi <= null + margin:
        return Verdict(CLEAR, "is within the margin of", **parts)
    gap = abs(est - null) - margin  # > 0: a difference to show; < 0: an equivalence to show
    on_margin = abs(gap) < 1e-12
    return Verdict(INCONCLUSIVE, "cannot be told apart from, nor shown within the margin of", **parts,
                   needed=None if on_margin else patients_needed(interval, abs(gap)),
                   needed_for="no number of patients: the estimate sits on the margin" if on_margin else
                   "to show a difference" if gap > 0 else "to show it is within the margin")
