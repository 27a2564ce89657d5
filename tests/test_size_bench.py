"""bench/size.py: how much of the detector's signal is the lesion's size. Its pure functions
against hand-made numbers and independent references (numpy, scikit-learn), and one run on the
real demo photos with the shipped model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from bench import size as bench
from stylegan.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_the_size_fit_recovers_a_log_linear_line_and_skips_missing_sides():
    sides = np.array([0.5, 0.8, 1.0, 1.6, 2.0, np.nan])
    s = np.exp(0.7 * np.log(np.nan_to_num(sides, nan=1.0)) - 3.0)
    s[-1] = 123.0  # no lesion: not in the fit, whatever its score
    transform, trend = bench.size_fit(s, sides)
    assert transform == "log" and trend.slope == pytest.approx(0.7)
    assert trend.median_log_area == pytest.approx(np.log(1.0))
    got = bench.size_scores(s, sides, transform, trend)
    assert np.allclose(got["partialled"][:5], -3.0)  # the line's intercept: no size left
    with pytest.raises(UserError, match="training naevi"):
        bench.size_fit(np.ones(4), np.array([1.0, 1.0, 1.0, np.nan]))


def test_partialled_scores_do_not_follow_the_size_and_missing_sides_take_the_median():
    rng = np.random.default_rng(0)
    sides = np.exp(rng.normal(0, 0.3, 200))
    noise = rng.normal(0, 0.2, 200)
    s = np.exp(0.5 * np.log(sides) + noise)
    transform, trend = bench.size_fit(s, sides)
    got = bench.size_scores(s, sides, transform, trend)
    assert np.allclose(got["t"], np.log(s)) and np.array_equal(got["score"], s)
    # the least-squares residual is uncorrelated with the regressor (up to the intercept)
    assert abs(np.corrcoef(got["partialled"], np.log(sides))[0, 1]) < 1e-9
    assert np.allclose(got["partialled"], np.log(s) - trend.slope * np.log(sides))
    missing = bench.size_scores(np.array([2.0]), np.array([np.nan]), transform, trend)
    assert missing["side"][0] == pytest.approx(np.exp(trend.median_log_area))
    assert missing["partialled"][0] == pytest.approx(np.log(2.0) - trend.slope
                                                     * trend.median_log_area)


def test_scores_that_are_not_positive_are_fitted_as_they_are():
    sides = np.array([0.5, 1.0, 2.0, 4.0])
    s = np.array([-1.0, 0.0, 1.0, 2.0])  # s = log2(side): linear in log(side) with slope 1/ln 2
    transform, trend = bench.size_fit(s, sides)
    assert transform == "identity" and trend.slope == pytest.approx(1 / np.log(2))
    assert np.allclose(bench.size_scores(s, sides, transform, trend)["partialled"], 0.0)
    log_transform, log_trend = bench.size_fit(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 4.0]))
    with pytest.raises(UserError, match="<= 0"):
        bench.size_scores(np.array([0.0]), np.array([1.0]), log_transform, log_trend)


def test_routes_count_the_normals_of_each_value_against_all_anomalies():
    by = np.array(["histo", "histo", "follow_up", "histo", "histo", "consensus"])
    y = np.array([0, 0, 0, 1, 1, 0])
    masks = bench.routes(by, y, min_normals=2)
    assert sorted(masks) == ["all", "histo"]
    assert masks["histo"].tolist() == [True, True, False, True, True, False]
    assert bench.routes(by, y, min_normals=1)["follow_up"].tolist() == [
        False, False, True, True, True, False]


def test_the_route_table_and_correlations_match_independent_references():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 40)
    sides = np.exp(rng.normal(0.2 * y, 0.3))
    s = np.exp(rng.normal(y * 0.8, 0.5) + 0.4 * np.log(sides))
    by = np.where(np.arange(80) % 2, "a", "b")
    groups = np.arange(80).astype(str)
    scores = bench.size_scores(s, sides, *bench.size_fit(s[y == 0], sides[y == 0]))
    table = bench.route_table(scores, y, groups, bench.routes(by, y, 5), n=50, seed=0)
    assert sorted(table) == ["a", "all", "b"]
    for route, keep in (("all", np.ones(80, bool)), ("a", (by == "a") | (y == 1))):
        row = table[route]
        assert row["n_normal"] == int((y[keep] == 0).sum()) and row["n_anomaly"] == 40
        for key in bench.SCORES:
            assert row[key]["auc"] == pytest.approx(roc_auc_score(y[keep], scores[key][keep]),
                                                    abs=1e-4)
            low, high = row[key]["auc_ci"]
            assert low <= row[key]["auc"] <= high
        assert row["score_minus_partialled"]["difference"] == pytest.approx(
            row["score"]["auc"] - row["partialled"]["auc"], abs=2e-4)
    corr = bench.correlations(scores, sides, y)
    for name, cls in (("normal", 0), ("anomaly", 1)):
        ref = np.corrcoef(np.log(s[y == cls]), np.log(sides[y == cls]))[0, 1]
        assert corr[name]["r_t"] == pytest.approx(ref, abs=1e-4) and corr[name]["n"] == 40
    assert abs(corr["normal"]["r_partialled"]) < 1e-4  # fitted on these normals
    assert table["all"]["side"]["auc"] > 0.6  # the anomalies were drawn larger


def test_the_bench_runs_on_the_demo_photos_with_the_shipped_model(tmp_path, monkeypatch,
                                                                  capsys, ham_dir):
    from anomaly.cli import main as cli

    model = REPO / "models" / "ham64-cpu"
    prepared = tmp_path / "demo"
    result = CliRunner().invoke(cli, [
        "prepare", "--source", str(ham_dir / "images"), "--labels", str(ham_dir / "metadata.csv"),
        "--id-column", "image_id", "--label-column", "dx", "--group-column", "lesion_id",
        "--normal", "nv", "--dest", str(prepared), "--splits-from", str(model / "splits.csv"),
        "--model", str(model), "--workers", "1"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(sys, "argv", ["size.py", "--model", str(model), "--prepared",
                                      str(prepared), "--images", str(ham_dir / "images"),
                                      "--fit-images", "30", "--bootstrap", "20", "--threads", "1"])
    bench.main()
    report = json.loads(capsys.readouterr().out)
    assert report["n_normal"] == 60 and report["n_anomaly"] == 33  # the demo's val split
    assert report["fit"]["images"] == 30 and report["method"] == "izif:1"
    assert set(report["routes"]) >= {"all"} and report["framing"] == "lesion"
    # the detector's own answers on the raw val photos (the Python API) give the same AUC
    from anodata.prepared import PreparedDataset
    from anomaly.model.ano_model import AnoModel

    rows = PreparedDataset.open(prepared).rows("val")
    detector = AnoModel.open(model, device="cpu")
    judged = [detector.judge(ham_dir / "images" / source).score for source in rows["source"]]
    assert report["routes"]["all"]["score"]["auc"] == pytest.approx(
        roc_auc_score(rows["class"] == "mel", judged), abs=1e-4)
    assert -1.0 <= report["correlation_with_log_side"]["normal"]["r_t"] <= 1.0


def test_too_few_fit_images_end_in_one_sentence(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["size.py", "--fit-images", "2"])
    with pytest.raises(SystemExit, match="--fit-images must be at least 3"):
        bench.main()


def test_a_bench_ends_a_user_error_in_one_sentence():
    from stylegan.errors import run_main

    def main():
        raise UserError("The folder x is not a prepared folder; give the one prepare wrote.")

    with pytest.raises(SystemExit) as ended:
        run_main(main)
    assert str(ended.value.code) == ("Error: The folder x is not a prepared folder; give the one "
                                     "prepare wrote.")
