"""Evaluation metrics against hand-computed values and scikit-learn; figures and summary files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from anomaly import evaluate as ev
from anomaly import sheets
from stylegan.errors import UserError


def _scores(seed: int = 0, n: int = 40) -> pd.DataFrame:
    """Synthetic score sheet: nv ~ N(0, 1), mel ~ N(2, 1), bkl ~ N(1, 1), bcc ~ N(3, 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in (("val", n), ("test", n)):
        for cls, mean, share in (("nv", 0.0, 1.0), ("mel", 2.0, 0.5), ("bkl", 1.0, 0.3),
                                 ("bcc", 3.0, 0.2)):
            for i in range(int(count * share)):
                rows.append({"score": float(np.exp(rng.normal(mean, 1.0))),
                             "label": int(cls != "nv"), "file": f"{split}_{cls}_{i}.png",
                             "class": cls, "split": split})
    return pd.DataFrame(rows)


def _options(tmp_path, **kw) -> ev.EvaluateOptions:
    return ev.EvaluateOptions(scores_dir=tmp_path / "scores", outdir=tmp_path / "graphics",
                              baseline="none", bootstrap=200, **kw)


# ---------------------------------------------------------------------- metrics by hand


def test_four_sample_auc_by_hand():
    # normals 0.1, 0.4; anomalies 0.35, 0.8. Pairs (anomaly > normal): 0.35>0.1, 0.8>0.1,
    # 0.8>0.4 -> 3 of 4 -> AUC 0.75.
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert ev.auc_from_ranks(s[y == 1], s[y == 0]) == pytest.approx([0.75])
    assert skm.roc_auc_score(y, s) == pytest.approx(0.75)
    # a tie counts one half: normals 0.5, 0.1; anomaly 0.5 -> (0.5 + 1) / 2
    assert ev.auc_from_ranks(np.array([0.5]), np.array([0.5, 0.1])) == pytest.approx([0.75])


def test_rank_auc_agrees_with_sklearn():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=300), 1)  # many ties
    y = (rng.random(300) < 0.3).astype(int)
    assert ev.auc_from_ranks(s[y == 1], s[y == 0])[0] == pytest.approx(skm.roc_auc_score(y, s))


def test_youden_threshold_on_crafted_set():
    # normals 0.1 0.2 0.3 0.6; anomalies 0.4 0.5 0.7 0.8.
    # t=0.4: TPR 4/4, FPR 1/4 -> J 0.75 (best); t=0.7: J 0.5; t=0.6: J 0.25.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8])
    assert ev.youden_threshold(y, s) == pytest.approx(0.4)
    m = ev.binary_metrics(y, s, 0.4)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.75)
    assert m["precision"] == pytest.approx(0.8) and m["f1"] == pytest.approx(2 * 0.8 / 1.8)


def test_p95_threshold_by_hand():
    assert ev.p95_threshold(np.arange(21.0)) == pytest.approx(19.0)  # 0.95 * 20
    assert ev.p95_threshold(np.array([0.0, 10.0])) == pytest.approx(9.5)


def test_sensitivity_at_95_specificity_by_hand():
    normals = np.arange(20.0)  # one false positive allowed at most (1/20 = 5 %)
    anomalies = np.array([18.5, 19.5, 25.0, 30.0])
    y = np.r_[np.zeros(20), np.ones(4)].astype(int)
    s = np.r_[normals, anomalies]
    # threshold 18.5 flags 19 (1 FP, spec 0.95) and 3 anomalies... 18.5, 19.5, 25, 30 -> 4/4.
    assert ev.sensitivity_at_specificity(y, s) == pytest.approx(1.0)
    s2 = np.r_[normals, np.array([17.5, 19.5, 25.0, 30.0])]
    assert ev.sensitivity_at_specificity(y, s2) == pytest.approx(0.75)  # 17.5 needs 2 FP


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    df = _scores()
    y, s = ev.Comparison("nv vs mel", "nv", ("mel",)).select(df[df["split"] == "test"])
    auc = skm.roc_auc_score(y, s)
    low, high = ev.bootstrap_auc_ci(y, s, n=500, seed=3)
    assert low < auc < high and 0 <= low and high <= 1
    assert (low, high) == ev.bootstrap_auc_ci(y, s, n=500, seed=3)
    assert (low, high) != ev.bootstrap_auc_ci(y, s, n=500, seed=4)
    assert all(math.isnan(v) for v in ev.bootstrap_auc_ci(y, s, n=0, seed=0))


def test_parse_threshold():
    assert ev.parse_threshold("Youden") == "youden" and ev.parse_threshold("p95") == "p95"
    assert ev.parse_threshold("0.25") == 0.25
    for bad in ("p90", "nan", "inf", ""):
        with pytest.raises(UserError, match="--threshold"):
            ev.parse_threshold(bad)


# ---------------------------------------------------------------------- thresholds use val only


def test_threshold_never_sees_test_labels():
    df = _scores()
    comp = ev.Comparison("nv vs mel", "nv", ("mel",))
    opts = ev.EvaluateOptions(scores_dir=".", outdir=".", bootstrap=0)
    before = ev.evaluate_comparison("m", df, comp, opts).row
    shuffled = df.copy()
    test = shuffled["split"] == "test"
    shuffled.loc[test, "class"] = np.random.default_rng(0).permutation(
        shuffled.loc[test, "class"].to_numpy())
    shuffled.loc[test, "score"] = shuffled.loc[test, "score"] * 3
    after = ev.evaluate_comparison("m", shuffled, comp, opts).row
    assert after["threshold"] == before["threshold"]
    assert after["auc"] != before["auc"]
    val = df[df["split"] == "val"]
    y_val, s_val = comp.select(val)
    assert before["threshold"] == ev.youden_threshold(y_val, s_val)


def test_threshold_fallbacks_and_refusal():
    df = _scores()
    opts = ev.EvaluateOptions(scores_dir=".", outdir=".", bootstrap=0)
    no_val_mel = df[~((df["split"] == "val") & (df["class"] == "mel"))]
    res = ev.evaluate_comparison("m", no_val_mel, ev.Comparison("nv vs mel", "nv", ("mel",)), opts)
    assert res.row["threshold_rule"] == "p95 (val)" and "fell back" in res.note
    val_nv = df.loc[(df["split"] == "val") & (df["class"] == "nv"), "score"].to_numpy()
    assert res.row["threshold"] == pytest.approx(np.percentile(val_nv, 95))
    with pytest.raises(UserError, match="no validation rows"):
        ev.evaluate_comparison("m", df[df["split"] == "test"],
                               ev.Comparison("nv vs mel", "nv", ("mel",)), opts)
    fixed = ev.evaluate_comparison("m", df[df["split"] == "test"],
                                   ev.Comparison("nv vs mel", "nv", ("mel",)),
                                   ev.EvaluateOptions(".", ".", threshold="2.5", bootstrap=0))
    assert fixed.row["threshold"] == 2.5 and fixed.row["threshold_rule"] == "fixed"


def test_comparisons_built_from_test_classes():
    df = _scores()
    names = [c.name for c in ev.build_comparisons(df, "nv", None, method="m")]
    assert names == ["nv vs mel", "nv vs rest", "nv vs bkl", "nv vs bcc"]
    only_mel = df[df["class"].isin(["nv", "mel"])]
    assert [c.name for c in ev.build_comparisons(only_mel, "nv", None, method="m")] == ["nv vs mel"]
    assert [c.name for c in ev.build_comparisons(df, "nv", "bkl", method="m")][:2] == [
        "nv vs bkl", "nv vs rest"]
    with pytest.raises(UserError, match="--anomaly-class"):
        ev.build_comparisons(df, "nv", "vasc", method="m")


# ---------------------------------------------------------------------- the whole command


def _png_ok(path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
        extrema = img.convert("L").getextrema()
        assert extrema[0] != extrema[1], f"{path} is a single colour"


@pytest.mark.slow
def test_evaluate_scores_writes_every_file(tmp_path):
    scores_dir = tmp_path / "scores"
    df = _scores()
    sheets.write_score_sheet(df, scores_dir / "izif.xlsx")
    sheets.write_score_sheet(df.assign(score=np.log(df["score"]) + 10), scores_dir / "latent.xlsx")
    sheets.write_all_scores({"izif": df}, scores_dir / "all_scores.xlsx")  # must be skipped
    summary = ev.evaluate_scores(_options(tmp_path))
    out = tmp_path / "graphics"
    for method in ("izif", "latent"):
        for kind in ("roc", "pr", "confusion", "violin", "report"):
            _png_ok(out / f"{kind}_{method}.png")
        assert (out / f"report_{method}.xlsx").is_file()
    _png_ok(out / "roc_all.png")
    table = summary.table
    assert len(table) == 8 and set(table["method"]) == {"izif", "latent"}
    expected = {"auc", "auc_ci_low", "auc_ci_high", "average_precision", "threshold",
                "threshold_rule", "sensitivity", "specificity", "precision", "f1",
                "sens_at_95_spec", "n_test_normal", "n_test_anomaly"}
    assert expected <= set(table.columns)
    # log is monotone: both methods rank the images alike -> equal AUCs
    a = table.set_index(["method", "comparison"])["auc"]
    assert a["izif", "nv vs mel"] == pytest.approx(a["latent", "nv vs mel"])
    test = df[(df["split"] == "test") & df["class"].isin(["nv", "mel"])]
    assert a["izif", "nv vs mel"] == pytest.approx(skm.roc_auc_score(test["class"] == "mel",
                                                                      test["score"]))
    stored = json.loads((out / "summary.json").read_text())
    assert stored["options"]["threshold"] == "youden" and len(stored["rows"]) == 8
    assert pd.read_excel(out / "summary.xlsx", sheet_name="summary").shape[0] == 8
    report = pd.read_excel(out / "report_izif.xlsx")
    assert {"precision", "recall", "f1", "support"} <= set(report.columns)


def test_evaluate_refuses_clear_mistakes(tmp_path):
    with pytest.raises(UserError, match="--scores"):
        ev.evaluate_scores(_options(tmp_path))
    (tmp_path / "scores").mkdir()
    with pytest.raises(UserError, match="no score sheets"):
        ev.evaluate_scores(_options(tmp_path))
    sheets.write_score_sheet(_scores(), tmp_path / "scores" / "izif.xlsx")
    with pytest.raises(UserError, match="--normal-class 'ak'"):
        ev.evaluate_scores(_options(tmp_path, normal_class="ak"))
    with pytest.raises(UserError, match="--baseline"):
        ev.evaluate_scores(_options(tmp_path).__class__(tmp_path / "scores", tmp_path / "g",
                                                        baseline="knn"))
    with pytest.raises(UserError, match="--prepared"):
        ev.evaluate_scores(ev.EvaluateOptions(tmp_path / "scores", tmp_path / "g"))


@pytest.mark.slow
def test_evaluate_command(tmp_path):
    from click.testing import CliRunner

    from anomaly.cli import main

    df = _scores(n=20)
    sheets.write_score_sheet(df, tmp_path / "scores" / "izif.xlsx")
    args = ["evaluate", "--scores", str(tmp_path / "scores"), "--outdir", str(tmp_path / "g"),
            "--baseline", "none", "--bootstrap", "50", "--threshold", "p95",
            "--anomaly-class", "bcc"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "nv vs bcc" in result.output.splitlines()[1] and (tmp_path / "g" / "roc_all.png").is_file()
    stored = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert {r["threshold_rule"] for r in stored["rows"]} == {"p95 (val)"}
    bad = CliRunner().invoke(main, args[:-2] + ["--threshold", "p99"])
    assert bad.exit_code == 1 and "--threshold 'p99'" in bad.output and "Traceback" not in bad.output
