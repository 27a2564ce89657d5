"""anomaly.evaluation.metrics against hand-computed values, scikit-learn and brute-force loops."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from anomaly.evaluation import metrics as M
from stylegan.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_metrics_imports_no_plotting_library():
    code = ("import sys, anomaly.evaluation.metrics; "
            "print(sorted(m for m in ('matplotlib', 'seaborn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# ---------------------------------------------------------------------- plain metrics by hand


def test_four_sample_auc_by_hand():
    # normals 0.1, 0.4; anomalies 0.35, 0.8. Pairs (anomaly > normal): 0.35>0.1, 0.8>0.1,
    # 0.8>0.4 -> 3 of 4 -> AUC 0.75.
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert M.auc_from_ranks(s[y == 1], s[y == 0]) == pytest.approx([0.75])
    assert M.roc_auc(y, s) == pytest.approx(0.75)
    # a tie counts one half: normals 0.5, 0.1; anomaly 0.5 -> (0.5 + 1) / 2
    assert M.auc_from_ranks(np.array([0.5]), np.array([0.5, 0.1])) == pytest.approx([0.75])
    assert math.isnan(M.roc_auc(np.zeros(3), np.arange(3.0)))


def test_youden_threshold_on_crafted_set():
    # normals 0.1 0.2 0.3 0.6; anomalies 0.4 0.5 0.7 0.8.
    # t=0.4: TPR 4/4, FPR 1/4 -> J 0.75 (best); t=0.7: J 0.5; t=0.6: J 0.25.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
    assert M.youden_threshold(y, s) == pytest.approx(0.4)
    m = M.binary_metrics(y, s, 0.4)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.75)
    assert m["precision"] == pytest.approx(0.8) and m["f1"] == pytest.approx(2 * 0.8 / 1.8)


def test_quantile_thresholds_by_hand():
    assert M.p95_threshold(np.arange(21.0)) == pytest.approx(19.0)  # 0.95 * 20
    assert M.p95_threshold(np.array([0.0, 10.0])) == pytest.approx(9.5)
    assert M.quantile_threshold(np.arange(11.0), 0.9) == pytest.approx(9.0)


def test_parse_threshold():
    assert M.parse_threshold("Youden") == "youden" and M.parse_threshold("p95") == "p95"
    assert M.parse_threshold("0.25") == 0.25
    for bad in ("p90", "nan", "inf", ""):
        with pytest.raises(UserError, match="--threshold"):
            M.parse_threshold(bad)


def test_weighted_statistics_match_sklearn_sample_weights():
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.normal(size=n) + y, 1)  # many ties
    w = rng.integers(0, 3, size=(4, n)).astype(float)
    auc = [skm.roc_auc_score(y, s, sample_weight=wi) for wi in w]
    ap = [skm.average_precision_score(y, s, sample_weight=wi) for wi in w]
    assert M.weighted_auc(y, s, w) == pytest.approx(auc, abs=1e-12)
    assert M.weighted_average_precision(y, s, w) == pytest.approx(ap, abs=1e-12)
    op = M.weighted_operating_point(y, s, w, 0.5)
    for b in range(4):
        keep = np.repeat(np.arange(n), w[b].astype(int))  # weights as repeated images
        ref = M.binary_metrics(y[keep], s[keep], 0.5)
        for k in M.OPERATING_POINT:
            assert op[k][b] == pytest.approx(ref[k])


# ---------------------------------------------------------------------- group bootstrap

# 10 images of 6 lesions. Lesion 'm' holds a normal and an anomaly image: anomaly stratum.
Y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 1])
S = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.6, 0.35, 0.9, 0.45, 0.8])
G = np.array(["b", "b", "a", "c", "c", "x", "y", "y", "m", "m"])


def test_group_strata_rule():
    codes = M.group_codes(G, len(G))
    assert codes.tolist() == [1, 1, 0, 2, 2, 4, 5, 5, 3, 3]  # sorted labels a b c m x y
    assert M.group_strata(Y, codes).tolist() == [0, 0, 0, 1, 1, 1]  # mixed 'm' -> anomaly
    for w in M.bootstrap_weights(Y, codes, 50, np.random.default_rng(0)):
        counts = np.zeros((len(w), 6))
        for g in range(6):  # weight of a lesion's images = times the lesion was drawn
            same = w[:, codes == g]
            assert (same == same[:, :1]).all()
            counts[:, g] = same[:, 0]
        assert (counts[:, :3].sum(axis=1) == 3).all() and (counts[:, 3:].sum(axis=1) == 3).all()


def test_group_bootstrap_replays_a_brute_force_loop():
    n, seed, t = 64, 7, 0.42
    reps = M.bootstrap_replicates(Y, S, G, n=n, seed=seed, thresholds={"t": t})
    # Independent replay of the documented RNG order: sorted lesions, normal stratum first.
    lesions = sorted(set(G))
    members = {g: np.flatnonzero(G == g) for g in lesions}
    stratum = {g: int(Y[members[g]].max()) for g in lesions}
    normal_lesions = [g for g in lesions if stratum[g] == 0]
    anomaly_lesions = [g for g in lesions if stratum[g] == 1]
    rng = np.random.default_rng(seed)
    draw0 = rng.integers(0, len(normal_lesions), size=(n, len(normal_lesions)))
    draw1 = rng.integers(0, len(anomaly_lesions), size=(n, len(anomaly_lesions)))
    for b in range(n):
        chosen = [normal_lesions[i] for i in draw0[b]] + [anomaly_lesions[i] for i in draw1[b]]
        idx = np.concatenate([members[g] for g in chosen])
        assert reps["auc"][b] == pytest.approx(skm.roc_auc_score(Y[idx], S[idx]))
        assert reps["ap"][b] == pytest.approx(skm.average_precision_score(Y[idx], S[idx]))
        ref = M.binary_metrics(Y[idx], S[idx], t)
        for k in M.OPERATING_POINT:
            assert reps[f"t_{k}"][b] == pytest.approx(ref[k])
    cis = M.bootstrap_cis(Y, S, G, n=n, seed=seed, thresholds={"t": t})
    assert cis["auc"] == pytest.approx(tuple(np.percentile(reps["auc"], [2.5, 97.5])))


def test_chunks_do_not_change_the_first_chunk():
    a = M.bootstrap_replicates(Y, S, G, n=30, seed=1, chunk=30)["auc"]
    b = M.bootstrap_replicates(Y, S, G, n=30, seed=1, chunk=30)["auc"]
    assert (a == b).all()
    assert M.bootstrap_cis(Y, S, G, n=0, seed=0) == {}


def test_lesion_resampling_widens_the_ci_of_correlated_images():
    rng = np.random.default_rng(0)
    lesions, per = 30, 4
    effect = np.r_[rng.normal(0, 1, lesions), rng.normal(1, 1, lesions)]  # lesion-level score
    y = np.repeat(np.r_[np.zeros(lesions), np.ones(lesions)], per).astype(int)
    s = np.repeat(effect, per) + rng.normal(0, 0.05, 2 * lesions * per)  # images ~ copies
    groups = np.repeat(np.arange(2 * lesions), per)
    by_image = M.bootstrap_cis(y, s, None, n=600, seed=0)["auc"]
    by_lesion = M.bootstrap_cis(y, s, groups, n=600, seed=0)["auc"]
    # 4 near-copies per lesion: the image bootstrap pretends to have 4x the data (width ~ 1/2)
    assert (by_lesion[1] - by_lesion[0]) > 1.5 * (by_image[1] - by_image[0])


# ---------------------------------------------------------------------- paired tests


def test_delong_on_six_images_by_hand():
    # 3 anomalies then 3 normals; two methods on the same images.
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.7, 0.4, 0.8, 0.3, 0.1])
    b = np.array([0.6, 0.5, 0.2, 0.4, 0.5, 0.1])
    # Placements psi(x, y) = 1 if x > y, 1/2 if equal. A: 0.9 beats all 3 normals, 0.7 and 0.4
    # beat 0.3 and 0.1 -> V10 = [1, 2/3, 2/3]; normals 0.8, 0.3, 0.1 lie below 1, 3, 3
    # anomalies -> V01 = [1/3, 1, 1]. B: 0.6 beats all; 0.5 beats 0.4 and 0.1, ties 0.5
    # -> 2.5/3; 0.2 beats 0.1 -> V10 = [1, 5/6, 1/3]; V01 = [2/3, (1 + 0.5)/3, 1].
    v10, v01 = M.delong_placements(np.stack([a[:3], b[:3]]), np.stack([a[3:], b[3:]]))
    assert v10 == pytest.approx(np.array([[1, 2 / 3, 2 / 3], [1, 5 / 6, 1 / 3]]))
    assert v01 == pytest.approx(np.array([[1 / 3, 1, 1], [2 / 3, 0.5, 1]]))
    # AUC_A = 7/9, AUC_B = 6.5/9. Sample variances (ddof 1): var V10_A = 1/27, var V01_A = 4/27
    # -> Var A = (1/27 + 4/27) / 3 = 5/81; V10_B 39/324, V01_B 21/324 -> Var B = 5/81;
    # cov(V10_A, V10_B) = 5/108, cov(V01_A, V01_B) = 1/54 -> Cov = (5/108 + 2/108) / 3 = 7/324.
    aucs, cov = M.delong_covariance(y, np.stack([a, b]))
    assert aucs == pytest.approx([7 / 9, 6.5 / 9])
    assert cov == pytest.approx(np.array([[5 / 81, 7 / 324], [7 / 324, 5 / 81]]))
    # Var(A - B) = 10/81 - 14/324 = 13/162; z = (1/18) / sqrt(13/162)
    res = M.delong_test(y, a, b)
    z = (1 / 18) / math.sqrt(13 / 162)
    assert res.difference == pytest.approx(1 / 18)
    assert res.p_value == pytest.approx(2 * norm.sf(z))
    half = 1.959963984540054 * math.sqrt(13 / 162)
    assert (res.ci_low, res.ci_high) == pytest.approx((1 / 18 - half, 1 / 18 + half))
    assert res.test == "DeLong" and M.paired_comparison(y, a, b, None, n=100, seed=0) == res


def test_delong_variance_matches_a_double_loop():
    rng = np.random.default_rng(3)
    y = (rng.random(40) < 0.4).astype(int)
    a, b = np.round(rng.normal(size=40) + y, 1), np.round(rng.normal(size=40) + 0.5 * y, 1)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def psi(u, v):
        return 1.0 if u > v else 0.5 if u == v else 0.0

    def placements(s):
        v10 = np.array([np.mean([psi(s[i], s[j]) for j in neg]) for i in pos])
        v01 = np.array([np.mean([psi(s[i], s[j]) for i in pos]) for j in neg])
        return v10, v01

    (a10, a01), (b10, b01) = placements(a), placements(b)
    m, n = len(pos), len(neg)
    var = (np.var(a10 - b10, ddof=1) / m + np.var(a01 - b01, ddof=1) / n)
    res = M.delong_test(y, a, b)
    assert res.difference == pytest.approx(a10.mean() - b10.mean())
    assert res.p_value == pytest.approx(2 * norm.sf(abs(res.difference) / math.sqrt(var)))


def test_paired_group_bootstrap_replays_a_brute_force_loop():
    rng = np.random.default_rng(5)
    lesions = np.repeat(np.arange(24), 2)
    y = (lesions >= 14).astype(int)  # 14 naevus lesions, 10 melanoma lesions, 2 images each
    a = y + rng.normal(0, 0.8, len(y))
    b = y + rng.normal(0, 1.6, len(y))
    n, seed = 200, 11
    res = M.paired_bootstrap(y, a, b, lesions.astype(str), n=n, seed=seed)
    labels = sorted(set(lesions.astype(str)))  # group order: sorted labels
    members = {g: np.flatnonzero(lesions.astype(str) == g) for g in labels}
    normal = [g for g in labels if y[members[g]].max() == 0]
    anomal = [g for g in labels if y[members[g]].max() == 1]
    r = np.random.default_rng(seed)
    d0 = r.integers(0, len(normal), size=(n, len(normal)))
    d1 = r.integers(0, len(anomal), size=(n, len(anomal)))
    diffs = []
    for i in range(n):
        idx = np.concatenate([members[normal[j]] for j in d0[i]]
                             + [members[anomal[j]] for j in d1[i]])
        diffs.append(skm.roc_auc_score(y[idx], a[idx]) - skm.roc_auc_score(y[idx], b[idx]))
    diffs = np.array(diffs)
    assert res.difference == pytest.approx(skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b))
    assert (res.ci_low, res.ci_high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    tail = min((diffs <= 0).sum(), (diffs >= 0).sum())
    assert res.p_value == pytest.approx(min(1.0, 2 * (1 + tail) / (n + 1)))
    assert res.test == "group bootstrap"


def test_paired_bootstrap_extremes():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    s = y * 3 + rng.normal(size=120)
    same = M.paired_bootstrap(y, s, s.copy(), np.arange(120), n=99, seed=0)
    assert same.difference == 0 and same.p_value == 1.0
    noise = rng.normal(size=120)
    better = M.paired_bootstrap(y, s, noise, np.arange(120), n=99, seed=0)
    assert better.difference > 0.4 and better.p_value == pytest.approx(2 / 100)  # smallest p


# ---------------------------------------------------------------------- subgroups


def test_parse_by_and_bins():
    assert M.parse_by("dx_type") == ("dx_type", None)
    assert M.parse_by("age:60,40") == ("age", (40.0, 60.0))
    for bad in ("", ":3", "age:x", "age:,"):
        with pytest.raises(UserError, match="--by"):
            M.parse_by(bad)
    labels = M.bin_labels(np.array([10, 40, 59.9, 60, np.nan, 85]), (40.0, 60.0))
    assert labels.tolist() == ["<40", "[40, 60)", "[40, 60)", ">=60", "missing", ">=60"]
    assert M.auto_edges(np.arange(1.0, 10.0), 3) == pytest.approx((11 / 3, 19 / 3))
