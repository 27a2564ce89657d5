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

from anomaly import baseline
from anomaly import evaluate as ev
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


def test_knn_scores_by_hand(prepared):
    df = baseline.knn_pixel_scores(prepared / "train.zip",
                                   [prepared / "val.zip", prepared / "test.zip"], size=4, k=2)
    assert list(df.columns) == ["score", "label", "file", "class", "split"]
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


def test_baseline_sheet_written_reused_and_found_via_score_json(prepared, tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    with pytest.raises(UserError, match="--prepared"):
        baseline.baseline_sheet(scores, None)
    (scores / "score.json").write_text(json.dumps({"prepared": str(prepared)}))
    notes = baseline.baseline_sheet(scores, None, size=4, k=2)
    assert "computed" in notes[0] and (scores / "knn-pixels.xlsx").is_file()
    assert "reused" in baseline.baseline_sheet(scores, None, size=4, k=2)[0]
    future = time.time() + 100
    os.utime(prepared / "test.zip", (future, future))  # dataset changed -> recomputed
    assert "computed" in baseline.baseline_sheet(scores, prepared, size=4, k=2)[0]
    with pytest.raises(UserError, match="train.zip"):
        baseline.baseline_sheet(scores, tmp_path)


def test_too_few_training_images(prepared):
    with pytest.raises(UserError, match="k=7"):
        baseline.knn_pixel_scores(prepared / "train.zip", [prepared / "test.zip"], k=7)


@pytest.mark.slow
def test_evaluate_includes_the_baseline(prepared, tmp_path):
    scores = tmp_path / "scores"
    df = baseline.knn_pixel_scores(prepared / "train.zip",
                                   [prepared / "val.zip", prepared / "test.zip"], size=4, k=2)
    from anomaly import sheets

    sheets.write_score_sheet(df.assign(score=-df["score"]), scores / "izif.xlsx")
    summary = ev.evaluate_scores(ev.EvaluateOptions(scores, tmp_path / "graphics",
                                                    prepared=prepared, bootstrap=50))
    table = summary.table.set_index(["method", "comparison"])
    assert table.loc[("knn-pixels", "nv vs mel"), "auc"] == 1.0
    assert table.loc[("izif", "nv vs mel"), "auc"] == 0.0  # negated scores: perfectly wrong
    assert (tmp_path / "graphics" / "roc_knn-pixels.png").is_file()
