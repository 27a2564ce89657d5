"""The evaluate command: validation-only choices, lesion-level CIs, paired tests, subgroups, files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from anomaly.evaluation import evaluate as ev
from anomaly.evaluation import metrics, protocol, sheets
from anomaly.evaluation.protocol import Comparison
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
                              **{"baseline": "none", "bootstrap": 200, **kw})


# ---------------------------------------------------------------------- thresholds use val only


def test_threshold_never_sees_test_labels():
    df = _scores()
    comp = Comparison("nv vs mel", "nv", ("mel",))
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
    assert before["threshold"] == metrics.youden_threshold(y_val, s_val)


def test_threshold_fallbacks_and_refusal():
    df = _scores()
    opts = ev.EvaluateOptions(scores_dir=".", outdir=".", bootstrap=0)
    no_val_mel = df[~((df["split"] == "val") & (df["class"] == "mel"))]
    res = ev.evaluate_comparison("m", no_val_mel, Comparison("nv vs mel", "nv", ("mel",)), opts)
    assert res.row["threshold_rule"] == "p95 (val)" and "fell back" in res.note
    val_nv = df.loc[(df["split"] == "val") & (df["class"] == "nv"), "score"].to_numpy()
    assert res.row["threshold"] == pytest.approx(np.percentile(val_nv, 95))
    with pytest.raises(UserError, match="no validation rows"):
        ev.evaluate_comparison("m", df[df["split"] == "test"],
                               Comparison("nv vs mel", "nv", ("mel",)), opts)
    fixed = ev.evaluate_comparison("m", df[df["split"] == "test"],
                                   Comparison("nv vs mel", "nv", ("mel",)),
                                   ev.EvaluateOptions(".", ".", threshold="2.5", bootstrap=0))
    assert fixed.row["threshold"] == 2.5 and fixed.row["threshold_rule"] == "fixed"


def test_comparisons_built_from_test_classes():
    df = _scores()
    test = df[df["split"] == "test"]

    def names(rows, anomaly_class):
        return [c.name for c in protocol.build_comparisons(rows, "nv", anomaly_class,
                                                           where="test images in m.xlsx")]
    assert names(test, None) == ["nv vs mel", "nv vs rest", "nv vs bkl", "nv vs bcc"]
    only_mel = test[test["class"].isin(["nv", "mel"])]
    assert names(only_mel, None) == ["nv vs mel"]
    assert names(test, "bkl")[:2] == ["nv vs bkl", "nv vs rest"]
    with pytest.raises(UserError, match="--anomaly-class"):
        names(test, "vasc")


def test_sensitivity_at_validation_specificity():
    df = _scores()
    comp = Comparison("nv vs mel", "nv", ("mel",))
    row = ev.evaluate_comparison("m", df, comp, ev.EvaluateOptions(".", ".", bootstrap=0)).row
    val_nv = df.loc[(df["split"] == "val") & (df["class"] == "nv"), "score"].to_numpy()
    t = np.percentile(val_nv, 95)  # chosen on val normals only
    test = df[df["split"] == "test"]
    mel, nv = test.loc[test["class"] == "mel", "score"], test.loc[test["class"] == "nv", "score"]
    assert row["valspec_threshold"] == pytest.approx(t)
    assert row["sens_at_val_spec"] == pytest.approx((mel >= t).mean())
    assert row["spec_at_val_spec"] == pytest.approx((nv < t).mean())
    assert "sens_at_95_spec" not in row  # the test-chosen (oracle) figure is gone


# ---------------------------------------------------------------------- lesions, primary, pairs


def _lesions(seed: int = 0, *, separation: float = 2.0, lesions: int = 30) -> pd.DataFrame:
    """HAM-like sheet: lesions of 1-3 images (scores share a lesion effect); every mel lesion is
    dx_type histo, naevus lesions are histo (1/3) or follow_up; an age per lesion."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("val", "test"):
        for cls, count in (("nv", lesions), ("mel", lesions // 2)):
            for j in range(count):
                effect = rng.normal(separation if cls == "mel" else 0.0, 1.0)
                dx = "histo" if cls == "mel" or j % 3 == 0 else "follow_up"
                age = float(30 + (j * 7) % 50)
                for i in range(1 + j % 3):
                    rows.append({"score": effect + rng.normal(0, 0.1), "label": int(cls == "mel"),
                                 "file": f"{split}/{cls}{j}_{i}.png", "class": cls,
                                 "split": split, "group": f"{cls}{split}{j}",
                                 "image": f"ISIC_{cls}{j}_{i}", "dx_type": dx, "age": age})
    return pd.DataFrame(rows)


def _write(tmp_path, frames: dict[str, pd.DataFrame]) -> None:
    for method, df in frames.items():
        sheets.write_score_sheet(df, tmp_path / "scores" / f"{method}.xlsx")


def test_primary_chosen_on_validation_and_listed_first(tmp_path):
    base = _lesions()
    val = base["split"] == "val"
    rng = np.random.default_rng(1)
    # 'alpha': good on val, noise on test; 'beta': noise on val, good on test
    alpha = base.assign(score=np.where(val, base["score"], rng.normal(size=len(base))))
    beta = base.assign(score=np.where(val, rng.normal(size=len(base)), base["score"]))
    _write(tmp_path, {"alpha": alpha, "beta": beta})
    summary = ev.evaluate_scores(_options(tmp_path, bootstrap=50))
    assert summary.primary == "alpha"  # despite beta's higher test AUC
    first = summary.table.iloc[0]
    assert first["method"] == "alpha" and first["role"] == "primary"
    assert set(summary.table.loc[summary.table["method"] == "beta", "role"]) == {"exploratory"}
    a = summary.table.set_index(["method", "comparison"])["auc"]
    assert a["beta", "nv vs mel"] > a["alpha", "nv vs mel"]
    forced = ev.evaluate_scores(_options(tmp_path, bootstrap=0, primary="beta"))
    assert forced.table.iloc[0]["method"] == "beta" and forced.primary == "beta"
    with pytest.raises(UserError, match="--primary 'gamma'"):
        ev.evaluate_scores(_options(tmp_path, primary="gamma"))


def test_split_val_never_reads_test(tmp_path):
    df = _lesions()
    _write(tmp_path, {"izif": df})
    first = ev.evaluate_scores(_options(tmp_path, split="val", bootstrap=30))
    text = (tmp_path / "graphics" / "summary.json").read_text()
    xlsx = pd.read_excel(tmp_path / "graphics" / "summary.xlsx", sheet_name=None)
    # scramble every test row: the validation-only output must not change at all
    test = df["split"] == "test"
    scrambled = df.copy()
    scrambled.loc[test, "score"] = np.random.default_rng(0).normal(size=int(test.sum())) * 9
    scrambled.loc[test, "class"] = "bcc"
    _write(tmp_path, {"izif": scrambled})
    second = ev.evaluate_scores(_options(tmp_path, split="val", bootstrap=30))
    assert (tmp_path / "graphics" / "summary.json").read_text() == text
    assert set(first.table["split"]) == {"val"} and "test/" not in text
    assert first.table.equals(second.table)
    assert not any("test" in str(v) for sheet in xlsx.values() for v in sheet.to_numpy().ravel()
                   if isinstance(v, str) and v.startswith("test/"))
    y = (df.loc[~test, "class"] == "mel").to_numpy()
    assert first.table.iloc[0]["auc"] == pytest.approx(skm.roc_auc_score(y, df.loc[~test,
                                                                                   "score"]))


def test_lesion_level_ci_and_note_without_groups(tmp_path):
    df = _lesions()
    _write(tmp_path, {"izif": df})
    with_groups = ev.evaluate_scores(_options(tmp_path, bootstrap=300)).table.iloc[0]
    _write(tmp_path, {"izif": df.drop(columns=["group"])})
    summary = ev.evaluate_scores(_options(tmp_path, bootstrap=300))
    without = summary.table.iloc[0]
    assert with_groups["ci_unit"] == "lesion" and without["ci_unit"] == "image"
    assert with_groups["n_groups"] == 15 + 30 and without["n_groups"] == without["n_normal"] + \
        without["n_anomaly"]
    assert any("image-level" in n for n in summary.notes)
    width = with_groups["auc_ci_high"] - with_groups["auc_ci_low"]
    assert width > without["auc_ci_high"] - without["auc_ci_low"]
    for k in ("average_precision", "sensitivity", "specificity", "precision", "f1"):
        key = "ap" if k == "average_precision" else k
        assert with_groups[f"{key}_ci_low"] <= with_groups[k] <= with_groups[f"{key}_ci_high"]


def test_paired_comparison_with_the_best_baseline(tmp_path):
    df = _lesions(separation=2.5)
    rng = np.random.default_rng(4)
    weak = df.assign(score=df["score"] + rng.normal(0, 1.5, len(df)))
    weaker = df.assign(score=rng.normal(0, 1.0, len(df)))  # chance
    sheet_cols = list(sheets.SCORE_COLUMNS)  # baselines carry no group column: shared by file
    _write(tmp_path, {"izif": df, "knn-pixels": weak[sheet_cols],
                      "knn-colour": weaker[sheet_cols]})
    summary = ev.evaluate_scores(_options(tmp_path, bootstrap=300))
    assert summary.best_baseline == "knn-pixels"
    t = summary.table.set_index(["method", "comparison"])
    row = t.loc[("izif", "nv vs mel")]
    assert row["vs_baseline"] == "knn-pixels" and row["paired_test"] == "group bootstrap"
    test = df[df["split"] == "test"]
    y = (test["class"] == "mel").to_numpy()
    ref = metrics.paired_bootstrap(y, test["score"].to_numpy(),
                                      weak.loc[test.index, "score"].to_numpy(),
                                      test["group"].to_numpy(), n=300, seed=0)
    assert row["auc_diff"] == pytest.approx(ref.difference)
    assert (row["auc_diff_ci_low"], row["p_value"]) == pytest.approx((ref.ci_low, ref.p_value))
    assert row["earns_keep"] == ("yes" if ref.difference > 0 and ref.p_value < 0.05 else "no")
    assert t.loc[("knn-pixels", "nv vs mel"), "role"] == "baseline (best on val)"
    assert pd.isna(t.loc[("knn-pixels", "nv vs mel"), "p_value"])
    assert list(summary.table["method"].drop_duplicates()) == ["izif", "knn-pixels", "knn-colour"]
    # without lesion ids: DeLong
    _write(tmp_path, {"izif": df[sheet_cols]})
    nogroup = ev.evaluate_scores(_options(tmp_path, bootstrap=50)).table.iloc[0]
    assert nogroup["paired_test"] == "DeLong"
    delong = metrics.delong_test(y, test["score"].to_numpy(),
                                    weak.loc[test.index, "score"].to_numpy())
    assert nogroup["p_value"] == pytest.approx(delong.p_value)


def test_subgroups_restrict_the_normals(tmp_path):
    df = _lesions()
    _write(tmp_path, {"izif": df})
    summary = ev.evaluate_scores(_options(tmp_path, bootstrap=50, by=("dx_type", "age:40,60")))
    sub = summary.subgroups.set_index(["by", "value", "scope"])
    test = df[df["split"] == "test"]
    mel = test[test["class"] == "mel"]
    histo_nv = test[(test["class"] == "nv") & (test["dx_type"] == "histo")]
    both = pd.concat([histo_nv, mel])
    assert sub.loc[("dx_type", "histo", "normals"), "auc"] == pytest.approx(
        skm.roc_auc_score(both["class"] == "mel", both["score"]))
    assert sub.loc[("dx_type", "histo", "normals"), "n_normal"] == len(histo_nv)
    assert sub.loc[("dx_type", "histo", "normals"), "n_anomaly"] == len(mel)
    assert sub.loc[("dx_type", "histo", "normals"), "n_groups"] == histo_nv["group"].nunique() + \
        mel["group"].nunique()
    assert sub.loc[("dx_type", "(all)", "all"), "auc"] == pytest.approx(
        summary.table.iloc[0]["auc"])
    assert ("dx_type", "follow_up", "both") not in sub.index  # no follow-up melanoma
    assert ("dx_type", "histo", "both") not in sub.index  # equal to the normals scope
    assert ("age", "[40, 60)", "both") in sub.index  # melanomas differ by age: both scopes
    young = test[(test["age"] < 40)]
    assert sub.loc[("age", "<40", "both"), "auc"] == pytest.approx(
        skm.roc_auc_score(young["class"] == "mel", young["score"]))
    stored = json.loads((tmp_path / "graphics" / "summary.json").read_text())
    assert len(stored["subgroups"]) == len(summary.subgroups)
    ages = [r["value"] for r in stored["subgroups"] if r["by"] == "age" and r["scope"] != "both"]
    assert ages == ["(all)", "<40", "[40, 60)", ">=60"]  # bins in their order
    with pytest.raises(UserError, match="--by localization: no score sheet has a column"):
        ev.evaluate_scores(_options(tmp_path, by=("localization",)))


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
    expected = {"auc", "auc_ci_low", "auc_ci_high", "average_precision", "ap_ci_low",
                "threshold", "threshold_rule", "sensitivity", "sensitivity_ci_low", "specificity",
                "precision", "f1", "sens_at_val_spec", "spec_at_val_spec", "n_normal",
                "n_anomaly", "n_groups", "ci_unit", "role", "val_auc"}
    assert expected <= set(table.columns)
    # log is monotone: both methods rank the images alike -> equal AUCs
    a = table.set_index(["method", "comparison"])["auc"]
    assert a["izif", "nv vs mel"] == pytest.approx(a["latent", "nv vs mel"])
    test = df[(df["split"] == "test") & df["class"].isin(["nv", "mel"])]
    assert a["izif", "nv vs mel"] == pytest.approx(skm.roc_auc_score(test["class"] == "mel",
                                                                      test["score"]))
    stored = json.loads((out / "summary.json").read_text())
    assert stored["options"]["threshold"] == "youden" and len(stored["rows"]) == 8
    assert stored["primary"] == "izif" and stored["rows"][0]["role"] == "primary"
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
        ev.evaluate_scores(ev.EvaluateOptions(tmp_path / "scores", tmp_path / "g", baseline="x"))
    with pytest.raises(UserError, match="--prepared"):
        ev.evaluate_scores(ev.EvaluateOptions(tmp_path / "scores", tmp_path / "g"))
    with pytest.raises(UserError, match="--split"):
        ev.evaluate_scores(_options(tmp_path, split="train"))


@pytest.mark.slow
def test_evaluate_command(tmp_path):
    from click.testing import CliRunner

    from anomaly.cli import main

    _write(tmp_path, {"izif": _lesions()})
    args = ["evaluate", "--scores", str(tmp_path / "scores"), "--outdir", str(tmp_path / "g"),
            "--baseline", "none", "--bootstrap", "50", "--threshold", "p95",
            "--by", "dx_type", "--primary", "izif"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "primary: izif" in lines[0] and "nv vs mel" in lines[2]
    stored = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert {r["threshold_rule"] for r in stored["rows"]} == {"p95 (val)"}
    assert {r["value"] for r in stored["subgroups"]} == {"(all)", "histo", "follow_up"}
    val = CliRunner().invoke(main, args[:5] + ["--split", "val", "--baseline", "none"])
    assert val.exit_code == 0 and "evaluated split: val" in val.output
    bad = CliRunner().invoke(main, args + ["--threshold", "p99"])
    assert bad.exit_code == 1 and "--threshold 'p99'" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, args + ["--knn-k", "0"])
    assert bad.exit_code == 1 and "--knn-k '0'" in bad.output


def test_evaluate_repeats_mean_and_sd(tmp_path):
    from click.testing import CliRunner

    from anomaly.cli import main

    aucs = {}
    for seed in range(3):
        df = _lesions(seed)
        _write(tmp_path / f"run{seed}", {"izif": df, "latent": df.assign(score=-df["score"])})
        for split in ("val", "test"):
            part = df[df["split"] == split]
            aucs.setdefault(split, []).append(skm.roc_auc_score(part["class"] == "mel",
                                                                part["score"]))
    stats, files = ev.write_repeats([tmp_path / f"run{i}" / "scores" for i in range(3)],
                                    tmp_path / "out")
    row = stats.set_index("method").loc["izif"]
    assert row["n_runs"] == 3 and stats.iloc[0]["method"] == "izif"  # ordered by val AUC
    assert row["val_auc_mean"] == pytest.approx(np.mean(aucs["val"]))
    assert row["test_auc_sd"] == pytest.approx(np.std(aucs["test"], ddof=1))
    assert stats.set_index("method").loc["latent", "test_auc_mean"] == pytest.approx(
        1 - np.mean(aucs["test"]))
    assert all(f.is_file() for f in files)
    args = ["evaluate-repeats", "--outdir", str(tmp_path / "cli")]
    for i in range(3):
        args += ["--scores", str(tmp_path / f"run{i}" / "scores")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "±" in result.output and "izif" in result.output.splitlines()[1]
    bad = CliRunner().invoke(main, ["evaluate-repeats", "--scores", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "is not a folder" in bad.output


def test_a_method_at_chance_never_earns_its_keep():
    """Beating a baseline that is itself at chance earns nothing: the method's own AUC CI must
    lie above 0.5 (with no CI, its AUC must)."""
    assert ev.above_chance({"auc": 0.62, "auc_ci_low": 0.55})
    assert not ev.above_chance({"auc": 0.539, "auc_ci_low": 0.48})
    assert not ev.above_chance({"auc": 0.50, "auc_ci_low": float("nan")})
    assert ev.above_chance({"auc": 0.51, "auc_ci_low": float("nan")})


def test_the_main_comparison_is_named_when_the_default_class_is_absent(tmp_path):
    """A collection that calls its melanomas 'melanoma' gets 'nv vs rest' as the main
    comparison, and the notes say so and how to choose the class."""
    df = _lesions(separation=2.0)
    df = df.assign(**{"class": df["class"].replace({"mel": "melanoma"})})
    _write(tmp_path, {"izif": df})
    summary = ev.evaluate_scores(_options(tmp_path, bootstrap=0))
    assert any(n.startswith("the main comparison is nv vs rest (no class 'mel'")
               and "--anomaly-class" in n for n in summary.notes), summary.notes


def test_anomaly_class_all_makes_the_pooled_comparison_main(tmp_path):
    """--anomaly-class all (as tune reads it): normal vs every other class comes first."""
    df = _scores()
    _write(tmp_path, {"izif": df})
    summary = ev.evaluate_scores(_options(tmp_path, anomaly_class="all", bootstrap=0))
    assert summary.table["comparison"].tolist() == ["nv vs rest", "nv vs mel", "nv vs bkl",
                                                    "nv vs bcc"]
    test = df[df["split"] == "test"]
    assert summary.table.iloc[0]["auc"] == pytest.approx(
        skm.roc_auc_score(test["class"] != "nv", test["score"]))
    assert summary.table.iloc[0]["anomaly_classes"] == "mel,bkl,bcc"  # largest first
