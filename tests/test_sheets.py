"""Excel sheets: column order, formula-injection safety, round trip, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import openpyxl
import pandas as pd
import pytest

from anomaly.evaluation import sheets
from stylegan.errors import UserError

NASTY = ["=1+1", "+SUM(A1)", "-2", "@cmd", "\tTAB", '=HYPERLINK("http://x","y")']


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "file": ["a.png", "b.png", *NASTY],
        "split": ["val", "test"] * 4,
        "class": ["nv", "mel", "=evil()", "bkl", "nv", "nv", "mel", "nv"],
        "score": [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.8, 1e-6],
        "label": [0, 1, 1, 1, 0, 0, 1, 0],
        "extra": [1, 2, 3, 4, 5, 6, 7, 8],
    })


def test_score_sheet_layout_and_round_trip(tmp_path):
    path = sheets.write_score_sheet(_frame(), tmp_path / "izif.xlsx")
    ws = openpyxl.load_workbook(path).active
    header = [c.value for c in ws[1]]
    assert header == ["score", "label", "file", "class", "split", "extra"]
    assert all(c.font.bold for c in ws[1])
    assert ws.freeze_panes == "A2"
    assert ws.column_dimensions["C"].width >= len('=HYPERLINK("http://x","y")')
    back = sheets.read_score_sheet(path)
    original = sheets.order_score_columns(_frame())
    pd.testing.assert_frame_equal(back, original, check_dtype=False)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_formula_like_strings_stay_text(tmp_path):
    path = sheets.write_score_sheet(_frame(), tmp_path / "izif.xlsx")
    ws = openpyxl.load_workbook(path).active
    cells = {c.value: c for row in ws.iter_rows(min_row=2) for c in row}
    for text in NASTY + ["=evil()"]:
        cell = cells[text]  # the value reads back unchanged ...
        assert cell.data_type != "f" and cell.data_type == "s"  # ... and is not a formula
        assert cell.quotePrefix
    assert not cells["a.png"].quotePrefix


def test_carriage_return_stays_text(tmp_path):
    # XML normalises CR to LF on reading (documented limit); the cell must still be text.
    df = _frame().assign(file=["\rCR=1", *_frame()["file"][1:]])
    ws = openpyxl.load_workbook(sheets.write_score_sheet(df, tmp_path / "s.xlsx")).active
    assert ws["C2"].data_type == "s" and ws["C2"].value in ("\rCR=1", "\nCR=1")


def test_all_scores_side_by_side(tmp_path):
    a = _frame().iloc[:4]
    b = a.assign(score=a["score"] * 10).iloc[::-1]  # other order, same images
    c = a.iloc[:2].assign(score=[7.0, 8.0])  # a method that scored fewer images
    path = sheets.write_all_scores({"izif": a, "latent": b, "knn-pixels": c}, tmp_path / "all.xlsx")
    df = pd.read_excel(path)
    # descriptive columns (image, group, metadata; here 'extra') follow the id columns
    assert list(df.columns) == ["file", "class", "split", "label", "extra", "izif", "latent",
                                "knn-pixels"]
    assert len(df) == 4
    row = df.set_index("file").loc["b.png"]
    assert row["extra"] == 2
    assert row["izif"] == 0.9 and row["latent"] == 9.0 and row["knn-pixels"] == 8.0
    assert df["knn-pixels"].isna().sum() == 2


def test_all_scores_refuses_conflicting_classes():
    a = _frame().iloc[:2]
    b = a.assign(**{"class": ["nv", "bcc"]})
    with pytest.raises(UserError, match="different class"):
        sheets.all_scores_frame({"izif": a, "latent": b})


def test_read_validation_names_file_and_columns(tmp_path):
    path = tmp_path / "bad.xlsx"
    sheets.write_frames({"x": _frame().drop(columns=["label", "split"])}, path)
    with pytest.raises(UserError, match=r"bad\.xlsx.*label, split"):
        sheets.read_score_sheet(path)
    with pytest.raises(UserError, match="does not exist"):
        sheets.read_score_sheet(tmp_path / "missing.xlsx")
    (tmp_path / "junk.xlsx").write_text("not a workbook")
    with pytest.raises(UserError, match="junk.xlsx"):
        sheets.read_score_sheet(tmp_path / "junk.xlsx")
    sheets.write_score_sheet(_frame().assign(label=2), tmp_path / "labels.xlsx")
    with pytest.raises(UserError, match="labels other than"):
        sheets.read_score_sheet(tmp_path / "labels.xlsx")


def test_config_dict_is_json_ready():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        path: Path
        kappa: float = 1.0
        methods: tuple[str, ...] = ("izif",)

    out = sheets.config_dict(Cfg(Path("/data/x")))
    assert json.loads(json.dumps(out)) == {"path": "/data/x", "kappa": 1.0, "methods": ["izif"]}


def test_number_formats(tmp_path):
    df = pd.DataFrame({"auc": [0.91234], "threshold": [0.000123], "n": [3]})
    path = sheets.write_frames({"s": df}, tmp_path / "f.xlsx", float_format="0.000",
                               column_formats={"threshold": "General"})
    ws = openpyxl.load_workbook(path)["s"]
    assert ws["A2"].number_format == "0.000" and ws["A2"].value == 0.91234  # full value kept
    assert ws["B2"].number_format == "General" and ws["C2"].number_format == "General"
