"""Evaluation metrics as pure functions of arrays: AUC, AP, thresholds, lesion-level bootstrap,
paired comparisons. Imports no plotting library.

Conventions: `y` holds 1 for an anomaly and 0 for a normal image; a higher score is more
anomalous; an image is called anomalous when score >= threshold.

AUC = P(score of a random anomaly > score of a random normal) + 0.5 P(tie) (Fawcett 2006).
AP (average precision) is sum_k (R_k - R_{k-1}) P_k over descending thresholds, as scikit-learn.

Thresholds are chosen on VALIDATION data only:
  youden  maximise Youden's J = TPR - FPR (Youden 1950) over validation scores,
  p95     the 95th percentile (linear interpolation) of validation normal scores,
  <value> a fixed number.
"Sensitivity at the specificity reached on validation normals" applies the p95 threshold of
the validation normals to the evaluated split and reports the sensitivity and the specificity
reached there (no threshold is ever read off the evaluated split's ROC).

Lesion-level bootstrap. Images of one lesion (a *group*) are not independent, so a resample
draws whole groups with replacement, separately within two strata, and keeps every image of a
drawn group (Davison & Hinkley 1997, sec. 3.8, resampling clusters). Stratum rule: a group
whose images are all normal is in the normal stratum; a group holding at least one anomaly
image (also a group with both labels) is in the anomaly stratum. Each stratum draws as many
groups as it holds, so every resample holds both classes. Without groups every image is its own
group, which is the ordinary stratified image bootstrap. Resample b gives image i the weight
w[b, i] = number of times its group was drawn; the statistics are the weighted ones.
RNG order (documented so tests can replay it): groups are numbered by their sorted labels
(np.unique); for each chunk of resamples, the normal stratum draws rng.integers(0, G0, (b, G0)),
then the anomaly stratum rng.integers(0, G1, (b, G1)), indices into the stratum's groups in
increasing group number.

Paired comparison of two methods on the same images: the same resamples for both methods give
replicates of the AUC difference; CI = percentile interval; two-sided p-value by inverting the
percentile interval, p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)).
Without groups, DeLong's test for correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988) with
the fast midrank algorithm of Sun & Xu 2014 (IEEE Signal Processing Letters 21(11)):
placements V10 = (Tz - Tx) / n for the m anomalies and V01 = 1 - (Tz - Ty) / m for the n
normals (Tx, Ty, Tz midranks within anomalies, within normals, and in the pooled sample);
AUC = mean V10; Cov = S10 / m + S01 / n (S: sample covariances across methods, ddof 1);
z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab), two-sided normal p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn import metrics as skm

from stylegan.errors import UserError

SPECIFICITY_TARGET = 0.95
OPERATING_POINT = ("sensitivity", "specificity", "precision", "f1")


# ------------------------------------------------------------------------------ plain metrics


def auc_from_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) for each row: pos [B, P], neg [B, Q] -> [B]."""
    pos, neg = np.atleast_2d(pos), np.atleast_2d(neg)
    p, q = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # [B, P + Q], average ties
    return (ranks[:, :p].sum(axis=1) - p * (p + 1) / 2) / (p * q)


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC, NaN unless both classes are present."""
    if not ((y == 1).any() and (y == 0).any()):
        return math.nan
    return float(skm.roc_auc_score(y, s))


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The score that maximises TPR - FPR when `score >= threshold` is called anomalous."""
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    j = (tpr - fpr)[1:]  # the first point (threshold +inf) flags nothing
    return float(thresholds[1:][int(np.argmax(j))])


def quantile_threshold(normal_scores: np.ndarray, specificity: float = SPECIFICITY_TARGET) -> float:
    """The `specificity` quantile (linear interpolation) of normal scores."""
    return float(np.percentile(normal_scores, 100 * specificity))


def p95_threshold(normal_scores: np.ndarray) -> float:
    """95th percentile (linear interpolation) of normal scores."""
    return quantile_threshold(normal_scores, 0.95)


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 (and counts) of `score >= threshold`."""
    pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f1": skm.f1_score(y, pred, labels=[0, 1], zero_division=0.0),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def parse_threshold(text: str) -> str | float:
    """'youden', 'p95' or a finite number."""
    rule = str(text).strip().lower()
    if rule in ("youden", "p95"):
        return rule
    try:
        value = float(rule)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--threshold '{text}' is not understood; use youden, p95 or a number.")
    return value


def choose_threshold(rule: str | float, y_val: np.ndarray, s_val: np.ndarray, *,
                     where: str) -> tuple[float, str, str]:
    """(threshold, rule used, note) from VALIDATION labels and scores only."""
    if isinstance(rule, float):
        return rule, "fixed", ""
    if not (y_val == 0).any():
        raise UserError(f"{where} has no validation rows of the normal class, so the "
                        f"'{rule}' threshold cannot be chosen; score the val split too or pass "
                        f"--threshold VALUE.")
    if rule == "youden" and (y_val == 1).any():
        return youden_threshold(y_val, s_val), "youden (val)", ""
    note = ""
    if rule == "youden":
        note = (f"{where}: no validation anomalies for Youden's J, fell back to the 95th "
                f"percentile of validation normal scores")
    return p95_threshold(s_val[y_val == 0]), "p95 (val)", note


# ------------------------------------------------------------------------------ group bootstrap


def group_codes(groups: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    """Group number of each image [n], groups numbered by sorted label; None: one per image."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    assert groups.shape == (n,), (groups.shape, n)
    return np.unique(groups.astype(str), return_inverse=True)[1].reshape(n)


def group_strata(y: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Stratum of each group [G]: 1 when the group holds any anomaly image, else 0."""
    strata = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.int64)
    np.maximum.at(strata, codes, y.astype(np.int64))
    return strata


def bootstrap_weights(y: np.ndarray, codes: np.ndarray, n: int, rng: np.random.Generator, *,
                      chunk: int = 200) -> Iterator[np.ndarray]:
    """Yield image weights [b, N] of stratified group-bootstrap resamples, `chunk` at a time."""
    strata = group_strata(y, codes)
    n_groups = len(strata)
    members = [np.flatnonzero(strata == c) for c in (0, 1)]
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        counts = np.zeros((b, n_groups), dtype=np.float64)  # [b, G]
        rows = np.arange(b)[:, None]
        for groups in members:
            if len(groups) == 0:
                continue
            draws = groups[rng.integers(0, len(groups), size=(b, len(groups)))]  # [b, G_s]
            np.add.at(counts, (np.broadcast_to(rows, draws.shape), draws), 1.0)
        yield counts[:, codes]  # [b, N]


def _blocks(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly and normal weight per distinct score, ascending: ([B, U], [B, U])."""
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    w = w[:, order]
    pos = np.add.reduceat(w * y[order], starts, axis=1)  # [B, U]
    neg = np.add.reduceat(w * (1 - y[order]), starts, axis=1)  # [B, U]
    return pos, neg


def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of each weighted resample: y, s [N], w [B, N] -> [B] (ties count one half)."""
    pos, neg = _blocks(y, s, np.atleast_2d(w))
    below = np.cumsum(neg, axis=1) - neg  # normal weight strictly below each distinct score
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def weighted_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision of each weighted resample (scikit-learn's definition): [B]."""
    pos, neg = _blocks(y, s, np.atleast_2d(w))
    tps = np.cumsum(pos[:, ::-1], axis=1)  # descending thresholds
    fps = np.cumsum(neg[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        recall = tps / tps[:, -1:]
    steps = np.diff(recall, axis=1, prepend=0.0)
    return (steps * precision).sum(axis=1)


def weighted_operating_point(y: np.ndarray, s: np.ndarray, w: np.ndarray,
                             threshold: float) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, precision, F1 of `score >= threshold` per resample: [B] each."""
    w = np.atleast_2d(w)
    flag = (s >= threshold).astype(np.float64)
    tp, fn = w @ (flag * y), w @ ((1 - flag) * y)
    fp, tn = w @ (flag * (1 - y)), w @ ((1 - flag) * (1 - y))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "precision": precision,
                "f1": np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)}


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).any():
        return math.nan, math.nan
    low, high = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_replicates(y: np.ndarray, s: np.ndarray, groups=None, *, n: int, seed: int,
                         thresholds: dict[str, float] | None = None,
                         chunk: int = 200) -> dict[str, np.ndarray]:
    """Replicates [n] of 'auc', 'ap' and, per named threshold t, '<name>_<op>' for op in
    OPERATING_POINT, from the stratified group bootstrap (see the module docstring)."""
    y = np.asarray(y).astype(np.int64)
    s = np.asarray(s, dtype=np.float64)
    codes = group_codes(groups, len(y))
    out: dict[str, list[np.ndarray]] = {}
    for w in bootstrap_weights(y, codes, n, np.random.default_rng(seed), chunk=chunk):
        parts = {"auc": weighted_auc(y, s, w), "ap": weighted_average_precision(y, s, w)}
        for name, t in (thresholds or {}).items():
            parts.update({f"{name}_{k}": v
                          for k, v in weighted_operating_point(y, s, w, t).items()})
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def bootstrap_cis(y: np.ndarray, s: np.ndarray, groups=None, *, n: int, seed: int,
                  thresholds: dict[str, float] | None = None,
                  level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every statistic of `bootstrap_replicates` ({} when n == 0 or one
    class is missing)."""
    if n <= 0 or not ((y == 1).any() and (y == 0).any()):
        return {}
    reps = bootstrap_replicates(y, s, groups, n=n, seed=seed, thresholds=thresholds)
    return {k: percentile_ci(v, level) for k, v in reps.items()}


# ------------------------------------------------------------------------------ paired tests


@dataclass(frozen=True)
class PairedResult:
    """AUC_a - AUC_b on the same images, its CI, two-sided p-value and the test used."""

    auc_a: float
    auc_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # 'group bootstrap', 'image bootstrap' or 'DeLong'


def bootstrap_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of 'difference = 0' from replicates, by percentile inversion."""
    diffs = diffs[np.isfinite(diffs)]
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    return min(1.0, 2 * (1 + tail) / (len(diffs) + 1))


def paired_bootstrap(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, groups=None, *, n: int,
                     seed: int, level: float = 0.95, chunk: int = 200) -> PairedResult:
    """Paired (group) bootstrap of AUC(s_a) - AUC(s_b): both methods see the same resamples."""
    y = np.asarray(y).astype(np.int64)
    s_a, s_b = np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)
    codes = group_codes(groups, len(y))
    diffs = [weighted_auc(y, s_a, w) - weighted_auc(y, s_b, w)
             for w in bootstrap_weights(y, codes, n, np.random.default_rng(seed), chunk=chunk)]
    diffs = np.concatenate(diffs) if diffs else np.zeros(0)
    auc_a, auc_b = roc_auc(y, s_a), roc_auc(y, s_b)
    low, high = percentile_ci(diffs, level) if len(diffs) else (math.nan, math.nan)
    p = bootstrap_p_value(diffs) if len(diffs) else math.nan
    test = "image bootstrap" if groups is None else "group bootstrap"
    return PairedResult(auc_a, auc_b, auc_a - auc_b, low, high, p, test)


def delong_placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement values (Sun & Xu 2014): pos [k, m], neg [k, n] -> V10 [k, m], V01 [k, n]."""
    pos, neg = np.atleast_2d(pos), np.atleast_2d(neg)
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)  # midranks
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # [k, m + n]
    return (tz[:, :m] - tx) / n, 1.0 - (tz[:, m:] - ty) / m


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs [k], covariance [k, k]) of k methods' scores [k, N] on the same images."""
    scores = np.atleast_2d(scores)
    y = np.asarray(y).astype(bool)
    v10, v01 = delong_placements(scores[:, y], scores[:, ~y])
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return v10.mean(axis=1), s10 / m + s01 / n


def delong_test(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, *,
                level: float = 0.95) -> PairedResult:
    """DeLong's test of AUC(s_a) = AUC(s_b) on the same images, with a normal-theory CI."""
    aucs, cov = delong_covariance(y, np.stack([s_a, s_b]).astype(np.float64))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 0:  # identical rankings: no evidence of a difference
        p = 1.0 if diff == 0 else 0.0
        return PairedResult(float(aucs[0]), float(aucs[1]), diff, diff, diff, p, "DeLong")
    half = norm.ppf(0.5 + level / 2) * math.sqrt(var)
    p = float(2 * norm.sf(abs(diff) / math.sqrt(var)))
    return PairedResult(float(aucs[0]), float(aucs[1]), diff, diff - half, diff + half, p,
                        "DeLong")


def paired_comparison(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, groups=None, *, n: int,
                      seed: int, level: float = 0.95) -> PairedResult:
    """Group bootstrap when groups are known, else DeLong (exact variance, no resampling)."""
    if groups is None or n <= 0:
        return delong_test(y, s_a, s_b, level=level)
    return paired_bootstrap(y, s_a, s_b, groups, n=n, seed=seed, level=level)


# ------------------------------------------------------------------------------ subgroups


def parse_by(text: str) -> tuple[str, tuple[float, ...] | None]:
    """'COLUMN' or 'COLUMN:e1,e2,...' (numeric bin edges) -> (column, edges or None)."""
    column, _, edges = str(text).partition(":")
    column = column.strip()
    if not column:
        raise UserError(f"--by '{text}' names no column; use e.g. --by dx_type or --by age:40,60.")
    if not edges.strip():
        return column, None
    try:
        values = tuple(sorted(float(e) for e in edges.split(",") if e.strip()))
    except ValueError:
        raise UserError(f"--by '{text}': the bin edges after ':' must be numbers, e.g. "
                        f"--by age:40,60.") from None
    if not values:
        raise UserError(f"--by '{text}' gives no bin edges after ':'; e.g. --by age:40,60.")
    return column, values


def auto_edges(values: np.ndarray, bins: int = 3) -> tuple[float, ...]:
    """Bin edges at the 1/bins quantiles of the finite values (duplicates dropped)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return ()
    qs = np.percentile(finite, [100 * i / bins for i in range(1, bins)])
    return tuple(sorted({float(np.round(q, 6)) for q in qs}))


def bin_labels(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Label of each value's bin: '<e1', '[e1, e2)', ..., '>=ek'; 'missing' for NaN."""
    def fmt(v: float) -> str:
        return f"{v:g}"
    names = ([f"<{fmt(edges[0])}"]
             + [f"[{fmt(a)}, {fmt(b)})" for a, b in zip(edges[:-1], edges[1:])]
             + [f">={fmt(edges[-1])}"])
    index = np.searchsorted(np.asarray(edges), values, side="right")
    out = np.array([names[i] for i in np.clip(index, 0, len(names) - 1)], dtype=object)
    out[np.isnan(values)] = "missing"
    return out
