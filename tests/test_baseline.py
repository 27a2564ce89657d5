"""knn-pixels baseline on tiny NVlabs-layout zips: values derived by hand."""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly.evaluation import baseline
from anomaly.evaluation import evaluate as ev
from stylegan.errors import UserError


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path, items: list[tuple[str, int, int]]) -> None:
    """items: (name, grey value, label) -> constant 8x8 RGB PNGs + dataset.json."""
    with zipfile.ZipFile(path, "w") as z:
        for name, value, _ in items:
            z.writestr(name, _png(value))
        z.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, _, lab in items]}))


@pytest.fixture
def prepared(tmp_path):
    d = tmp_path / "prepared"
    d.mkdir()
    train = [(f"img{i:02d}.png", v, 0) for i, v in enumerate([0, 10, 20, 30, 40, 50])]
    val = [("v0.png", 25, 0), ("v1.png", 100, 1)]
    test = [("t0.png", 5, 0), ("t1.png", 100, 1), ("t2.png", 200, 2)]
    _zip(d / "train.zip", train)
    _zip(d / "val.zip", val)
    _zip(d / "test.zip", test)
    rows = [(n, "nv", lab, "train") for n, _, lab in train]
    rows += [("v0.png", "nv", 0, "val"), ("v1.png", "mel", 1, "val"), ("t0.png", "nv", 0, "test"),
             ("t1.png", "mel", 1, "test"), ("t2.png", "bkl", 2, "test")]
    pd.DataFrame(rows, columns=["file", "class", "label", "split"]).assign(
        source="x", group="g", sha256="0").to_csv(d / "manifest.csv", index=False)
    return d


def _dist(a: float, b: float, size: int) -> float:
    """Euclidean distance between two constant RGB images of grey a and b, shrunk to size^2."""
    return math.sqrt(3 * size * size) * abs(a - b) / 255


def test_shrink_is_an_area_average():
    image = np.zeros((1, 4, 4), dtype=np.uint8)
    image[0, ::2, ::2] = 255  # one bright pixel per 2x2 block -> 255 / 4 each
    assert np.allclose(baseline.shrink(image, 2), 0.25)
    rgb = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 51, 255)])
    assert np.allclose(baseline.shrink(rgb, 1), [0.0, 0.2, 1.0])


def _knn_pixels(prepared, *, size: int, k: int) -> pd.DataFrame:
    """The knn-pixels sheet of one configuration (the only one on the grid)."""
    grid = baseline.BaselineGrid(sizes=(size,), bins=(2,), ks=(k,))
    return baseline.baseline_frames(prepared, grid)[0]["knn-pixels"]


def test_knn_scores_by_hand(prepared):
    df = _knn_pixels(prepared, size=4, k=2)
    # the manifest's other columns (lesion id, source, ...) travel into the sheet; sha256 does not
    assert list(df.columns) == ["score", "label", "file", "class", "split", "source", "group"]
    got = df.set_index("file")
    # v0 = 25: nearest 20 and 30; t0 = 5: nearest 0 and 10; 100: 50 and 40; 200: 50 and 40.
    expected = {"v0.png": (5 + 5) / 2, "v1.png": (50 + 60) / 2, "t0.png": (5 + 5) / 2,
                "t1.png": (50 + 60) / 2, "t2.png": (150 + 160) / 2}
    for name, mean_gap in expected.items():
        assert got.loc[name, "score"] == pytest.approx(_dist(0, mean_gap, 4), rel=1e-5)
    assert got["class"].to_dict() == {"v0.png": "nv", "v1.png": "mel", "t0.png": "nv",
                                      "t1.png": "mel", "t2.png": "bkl"}
    assert got["split"].tolist() == ["val", "val", "test", "test", "test"]
    assert got["label"].tolist() == [0, 1, 0, 1, 1]


def test_colour_histogram_by_hand():
    image = np.zeros((3, 2, 2), dtype=np.uint8)
    image[:, 0, 0] = (255, 0, 0)  # red: bins (1, 0, 0) -> cell 1*4 + 0*2 + 0 = 4
    image[:, 0, 1] = (0, 128, 255)  # bins (0, 1, 1) -> cell 3; the other two pixels: cell 0
    hist = baseline.colour_histogram(image, 2)
    assert hist.tolist() == [0.5, 0, 0, 0.25, 0.25, 0, 0, 0]
    # constant images: a one-hot histogram; L1 distance 2 between different cells, 0 if same
    grey = baseline.colour_histogram(np.full((3, 4, 4), 100, np.uint8), 4)
    assert grey.sum() == 1 and grey[1 * 16 + 1 * 4 + 1] == 1


def test_configuration_chosen_on_validation(prepared):
    grid = baseline.BaselineGrid(sizes=(1, 4), bins=(2, 4), ks=(1, 2))
    frames, record = baseline.baseline_frames(prepared, grid, anomaly_class="mel")
    assert set(frames) == {"knn-pixels", "knn-colour"}
    tried = pd.DataFrame(record["tried"])
    assert len(tried) == 2 * 2 * 2
    for method, kind in (("knn-pixels", "pixels"), ("knn-colour", "colour")):
        rows = tried[tried["method"] == method]
        best = rows.loc[rows["val_auc"].idxmax()]  # first of the best, in grid order
        assert (record[method][kind], record[method]["k"]) == (best[kind], best["k"])
    # grey 100 (mel) and 25 (nv) on val: k=1 on 4x4 pixels gives AUC 1 on val
    pix = frames["knn-pixels"].set_index("file")
    assert record["knn-pixels"]["val_auc"] == 1.0
    k, size = record["knn-pixels"]["k"], record["knn-pixels"]["pixels"]
    gaps = {1: {"t2.png": 150}, 2: {"t2.png": (150 + 160) / 2}}[k]
    assert pix.loc["t2.png", "score"] == pytest.approx(_dist(0, gaps["t2.png"], size), rel=1e-5)
    # colour histograms of constant greys at 2 bins/channel: 0..127 -> one cell, 128.. -> other
    col = frames["knn-colour"].set_index("file")
    assert col.loc["t2.png", "score"] == pytest.approx(2.0)  # grey 200 vs training greys <= 50
    assert col.loc["t0.png", "score"] == 0.0 and set(col["group"]) == {"g"}


def test_baseline_sheets_written_reused_and_found_via_score_json(prepared, tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    grid = baseline.BaselineGrid(sizes=(2, 4), bins=(2,), ks=(1, 2))
    with pytest.raises(UserError, match="--prepared"):
        baseline.baseline_sheets(scores, None, grid)
    (scores / "score.json").write_text(json.dumps({"prepared": str(prepared)}))
    notes = baseline.baseline_sheets(scores, None, grid)
    assert "computed" in notes[0] and "chosen on validation" in notes[0]
    for name in ("knn-pixels.xlsx", "knn-colour.xlsx", "baselines.json"):
        assert (scores / name).is_file()
    assert "reused" in baseline.baseline_sheets(scores, None, grid)[0]
    assert "computed" in baseline.baseline_sheets(scores, None, grid, anomaly_class="mel")[0]
    assert "computed" in baseline.baseline_sheets(
        scores, None, baseline.BaselineGrid(sizes=(2,), bins=(2,), ks=(1,)))[0]  # new grid
    future = time.time() + 100
    os.utime(prepared / "test.zip", (future, future))  # dataset changed -> recomputed
    assert "computed" in baseline.baseline_sheets(scores, prepared, grid)[0]
    with pytest.raises(UserError, match="train.zip"):
        baseline.baseline_sheets(scores, tmp_path, grid)
    with pytest.raises(UserError, match="positive integers"):
        baseline.BaselineGrid(sizes=(0,))


def test_too_few_training_images(prepared):
    with pytest.raises(UserError, match="k=7"):
        baseline.baseline_frames(prepared, baseline.BaselineGrid(ks=(1, 7)))


@pytest.mark.slow
def test_evaluate_includes_the_baseline(prepared, tmp_path):
    scores = tmp_path / "scores"
    df = _knn_pixels(prepared, size=4, k=2)
    from anomaly.evaluation import sheets

    sheets.write_score_sheet(df.assign(score=-df["score"]), scores / "izif.xlsx")
    summary = ev.evaluate_scores(ev.EvaluateOptions(scores, tmp_path / "graphics",
                                                    prepared=prepared, bootstrap=50,
                                                    knn_sizes=(2, 4), knn_bins=(2,), knn_k=(1, 2)))
    table = summary.table.set_index(["method", "comparison"])
    assert table.loc[("knn-pixels", "nv vs mel"), "auc"] == 1.0
    assert table.loc[("izif", "nv vs mel"), "auc"] == 0.0  # negated scores: perfectly wrong
    assert (tmp_path / "graphics" / "roc_knn-pixels.png").is_file()
    assert summary.best_baseline in ("knn-pixels", "knn-colour")
    assert table.loc[("izif", "nv vs mel"), "vs_baseline"] == summary.best_baseline


def test_selection_rows_follow_the_protocol_main_comparison():
    # val: nv and bkl both labelled normal, mel and scc anomalies; test rows never selected
    ident = pd.DataFrame({"class": ["nv", "bkl", "mel", "scc", "nv", "mel"],
                          "label": [0, 0, 1, 1, 0, 1],
                          "split": ["val"] * 4 + ["test"] * 2})
    with pytest.raises(UserError, match="The prepared dataset label 2 classes as normal"):
        baseline._selection(ident, None, "mel")
    mask, y = baseline._selection(ident, "nv", "mel")
    assert mask.tolist() == [True, False, True, False, False, False] and y.tolist() == [0, 1]
    mask, y = baseline._selection(ident, "nv", "vasc")  # no val vasc: every other class
    assert mask.tolist() == [True, True, True, True, False, False]
    assert y.tolist() == [0, 1, 1, 1]
    one_normal = ident.assign(label=[0, 1, 1, 1, 0, 1])
    mask, y = baseline._selection(one_normal, None, None)  # the class labelled 0, pooled
    assert mask.tolist() == [True, True, True, True, False, False]


def test_baseline_sheets_are_remade_for_another_normal_class(prepared, tmp_path):
    grid = baseline.BaselineGrid(sizes=(2,), bins=(2,), ks=(1,))
    scores = tmp_path / "scores"
    scores.mkdir()
    assert "computed" in baseline.baseline_sheets(scores, prepared, grid, normal_class="nv")[0]
    assert json.loads((scores / "baselines.json").read_text())["normal_class"] == "nv"
    assert "reused" in baseline.baseline_sheets(scores, prepared, grid, normal_class="nv")[0]
    assert "computed" in baseline.baseline_sheets(scores, prepared, grid)[0]
    assert "normal_class" not in json.loads((scores / "baselines.json").read_text())
