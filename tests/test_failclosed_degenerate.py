"""Degenerate data are refused, warned about or listed with the reason (issue 19, item 8):
images listed twice in a score sheet, split names in upper case, an empty sheet; prepare with
empty splits; images too small, too elongated or blank."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from anomaly.evaluation import evaluate as ev
from anomaly.evaluation import sheets
from stylegan.errors import UserError


def _sheet(seed: int = 0, n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("val", "test"):
        for cls, mean, count in (("nv", 0.0, n), ("mel", 1.0, n // 2)):
            rows += [{"score": float(rng.normal(mean, 1.0)), "label": int(cls != "nv"),
                      "file": f"{split}_{cls}_{i}.png", "class": cls, "split": split}
                     for i in range(count)]
    return pd.DataFrame(rows)


def _evaluate(tmp_path, df: pd.DataFrame) -> ev.Summary:
    sheets.write_score_sheet(df, tmp_path / "scores" / "m.xlsx")
    return ev.evaluate_scores(ev.EvaluateOptions(scores_dir=tmp_path / "scores",
                                                 outdir=tmp_path / "graphics", baseline="none",
                                                 bootstrap=0))


def test_an_image_listed_twice_counts_once(tmp_path):
    df = _sheet()
    test = df[df["split"] == "test"]
    twice = pd.concat([df, test[test["class"] == "mel"].head(7)], ignore_index=True)
    with pytest.warns(UserWarning, match=r"m\.xlsx lists 7 row\(s\) again"):
        summary = _evaluate(tmp_path, twice)
    auc = summary.table.set_index("comparison").loc["nv vs mel", "auc"]
    assert auc == pytest.approx(skm.roc_auc_score(test["label"], test["score"]), abs=1e-12)


def test_an_image_listed_twice_with_another_score_is_refused(tmp_path):
    df = _sheet()
    again = df.iloc[[-1]].assign(score=99.0)
    with pytest.raises(UserError, match=r"lists test/test_mel_14\.png more than once with "
                                        r"different scores or labels \(1 such images\)"):
        _evaluate(tmp_path, pd.concat([df, again], ignore_index=True))


@pytest.mark.parametrize("change, words", [
    (lambda df: df.assign(split=df["split"].str.upper()), "names the split(s) 'TEST', 'VAL'"),
    (lambda df: df.assign(split=df["split"] + " "), "names the split(s) 'test ', 'val '"),
    (lambda df: df.iloc[:0], "holds no val or test rows (splits found: none: the sheet is "
                             "empty)"),
    (lambda df: df.assign(split="train"), "holds no val or test rows (splits found: train)"),
])
def test_split_names_and_empty_sheets_are_one_sentence(tmp_path, change, words):
    with pytest.raises(UserError) as refused:
        _evaluate(tmp_path, change(_sheet()))
    text = str(refused.value)
    assert words in text and "label" not in text and "\n" not in text, text


# ------------------------------------------------------------------------------ prepare


def test_a_split_column_giving_every_row_val_warns_which_splits_are_empty(tmp_path):
    from test_splits import _opts, _write_set

    from anodata.prepare import prepare_dataset

    lesions = [("L00", "nv", 2, "val"), ("L01", "mel", 1, "val"), ("L02", "nv", 1, "VAL")]
    images, csv_path = _write_set(tmp_path, lesions)
    with pytest.warns(UserWarning, match=r"train\.zip and test\.zip hold no image: the split "
                                         r"column 'split' gives them none"):
        summary = prepare_dataset(_opts(images, csv_path, tmp_path / "out",
                                        split_column="split"))
    assert summary.counts["val"] == {"nv": 3, "mel": 1}


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


NOISE = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
DEGENERATE = {  # name: (pixels, reason in rejected.csv)
    "one-pixel.png": (NOISE[:1, :1], "image is 1x1 px, smaller than 6 px on a side"),
    "strip.png": (np.tile(NOISE[:1, :1], (10000, 1, 1)), "image is 1x10000 px, smaller than"),
    "long.png": (np.tile(NOISE[:10, :10], (100, 1, 1)), "image is 10x1000 px, more elongated "
                                                        "than 1:8"),
    "black.png": (np.zeros((64, 64, 3), np.uint8), "image is blank (black: one grey level 0)"),
    "white.png": (np.full((48, 64, 3), 255, np.uint8), "image is blank (white: one grey level "
                                                         "255)"),
}


def test_prepare_lists_degenerate_images_with_the_reason(tmp_path):
    import csv

    from anodata.prepare import PrepareOptions, prepare_dataset

    src = tmp_path / "src"
    (src / "nv").mkdir(parents=True)
    (src / "mel").mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        (src / "nv" / f"n{i}.png").write_bytes(_png(rng.integers(0, 256, (24, 32, 3),
                                                                 dtype=np.uint8)))
    for i in range(3):
        (src / "mel" / f"m{i}.png").write_bytes(_png(rng.integers(0, 256, (24, 32, 3),
                                                                  dtype=np.uint8)))
    for name, (pixels, _reason) in DEGENERATE.items():
        (src / "nv" / name).write_bytes(_png(pixels))
    summary = prepare_dataset(PrepareOptions(source=src, dest=tmp_path / "out", normal=("nv",),
                                             resolution=16, workers=1, val=0.25, test=0.25))
    with open(tmp_path / "out" / "rejected.csv", newline="") as f:
        reasons = {r["source"]: r["reason"] for r in csv.DictReader(f)}
    for name, (_pixels, reason) in DEGENERATE.items():
        assert reasons[f"nv/{name}"].startswith(reason), reasons[f"nv/{name}"]
    assert summary.num_images == 11 and summary.num_rejected == len(DEGENERATE)


def test_the_api_and_serve_path_refuses_the_same_images():
    from PIL import Image

    from stylegan.imageio import ImageRejected
    from anodata.policy import Preprocessing, fit_array, fit_image

    policy = Preprocessing(resolution=16)
    for pixels, reason in DEGENERATE.values():
        with pytest.raises(ImageRejected, match=re.escape(reason[:20])):
            fit_array(_png(pixels), ".png", policy)  # AnoModel.fit of bytes or a path; serve
        with pytest.raises(ImageRejected, match=re.escape(reason[:20])):
            fit_image(Image.fromarray(pixels), policy)  # AnoModel.fit of a PIL image
    assert fit_array(_png(NOISE), ".png", policy).shape == (3, 16, 16)
    grey = np.full((40, 30, 3), 128, np.uint8)  # one mid tone: allowed (see check_source_image)
    assert fit_array(_png(grey), ".png", policy).shape == (3, 16, 16)
