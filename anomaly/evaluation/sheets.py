"""Excel score sheets (openpyxl): safe to open, readable, written atomically.

A score sheet holds one method's scores: columns `score`, `label` (0 normal, 1 anomaly) first,
then `file`, `class`, `split`, then any extra columns. Every string is stored as a text cell,
so a file or class name such as `=HYPERLINK(...)` can never become a formula; names that begin
with a character a spreadsheet would read as the start of a formula (= + - @ tab CR) also get
Excel's quote prefix, so editing the cell in Excel keeps it text.

Known limit of the xlsx (XML) format: a carriage return inside a string reads back as a line
feed, because XML normalises line ends; the cell is still plain text.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import openpyxl
import pandas as pd
from openpyxl.styles import Font, PatternFill
from openpyxl.utils import get_column_letter

from stylegan.errors import UserError
from stylegan.fileio import atomic_path

SCORE_COLUMNS = ("score", "label", "file", "class", "split")
ID_COLUMNS = ("file", "class", "split", "label")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")
_HEADER_FILL = PatternFill("solid", fgColor="DDE4EE")
_MIN_WIDTH, _MAX_WIDTH = 8, 60


def _cell_value(value: Any) -> Any:
    """Convert a pandas/numpy value to something openpyxl stores (None for missing)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_sheet(ws, df: pd.DataFrame, *, float_format: str | None,
                 column_formats: Mapping[str, str]) -> None:
    """Fill worksheet `ws` with `df`: bold frozen header, text-only strings, readable widths."""
    columns = [str(c) for c in df.columns]
    formats = [column_formats.get(c, float_format) for c in columns]
    for j, name in enumerate(columns, start=1):
        cell = ws.cell(row=1, column=j, value=name)
        cell.data_type = "s"  # a header such as '=x' stays text too
        cell.font = Font(bold=True)
        cell.fill = _HEADER_FILL
    widths = [len(name) for name in columns]
    for i, row in enumerate(df.itertuples(index=False, name=None), start=2):
        for j, raw in enumerate(row, start=1):
            value = _cell_value(raw)
            cell = ws.cell(row=i, column=j, value=value)
            if isinstance(value, str):
                cell.data_type = "s"  # never 'f' (formula), whatever the text starts with
                if value.startswith(FORMULA_PREFIXES):
                    cell.quotePrefix = True
            elif isinstance(value, float) and formats[j - 1]:
                cell.number_format = formats[j - 1]
            shown = len(value) if isinstance(value, str) else 12 if isinstance(value, float) else 8
            widths[j - 1] = max(widths[j - 1], shown)
    for j, width in enumerate(widths, start=1):
        width = min(max(width + 2, _MIN_WIDTH), _MAX_WIDTH)
        ws.column_dimensions[get_column_letter(j)].width = width
    ws.freeze_panes = "A2"
    if len(df) and columns:
        ws.auto_filter.ref = f"A1:{get_column_letter(len(columns))}{len(df) + 1}"


def write_frames(
    frames: Mapping[str, pd.DataFrame], path: str | os.PathLike, *, float_format: str | None = None,
    column_formats: Mapping[str, str] | None = None,
) -> Path:
    """Write one sheet per DataFrame (sheet name -> frame) to an .xlsx file, atomically.

    float_format: Excel number format of float cells (None: General); column_formats overrides
    it per column name.
    """
    path = Path(path)
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, df in frames.items():
        _write_sheet(wb.create_sheet(title=_sheet_title(name)), df, float_format=float_format,
                     column_formats=column_formats or {})
    with atomic_path(path) as tmp:
        wb.save(tmp)
    return path


def _sheet_title(name: str) -> str:
    """Excel sheet titles: at most 31 characters, none of []:*?/\\."""
    cleaned = "".join("_" if ch in "[]:*?/\\" else ch for ch in str(name)).strip("'") or "sheet"
    return cleaned[:31]


def _check_columns(df: pd.DataFrame, required: tuple[str, ...], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{where} lacks the column(s) {', '.join(missing)}; a score sheet needs "
            f"{', '.join(required)}.")


def order_score_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Columns score, label, file, class, split first, extra columns after, in their order."""
    _check_columns(df, SCORE_COLUMNS, "The score table")
    extra = [c for c in df.columns if c not in SCORE_COLUMNS]
    return df.loc[:, list(SCORE_COLUMNS) + extra]


def write_score_sheet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write one method's scores (columns score, label, file, class, split [+ extras])."""
    return write_frames({"scores": order_score_columns(df)}, path)


def all_scores_frame(dfs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every method side by side: columns file, class, split, label, <method>...; one row per image.

    Images missing from a method's table get an empty cell there. The same (split, file) with a
    different class or label in two tables is an error.
    """
    merged: pd.DataFrame | None = None
    for method, df in dfs.items():
        _check_columns(df, SCORE_COLUMNS, f"The '{method}' score table")
        if df.duplicated(["split", "file"]).any():
            dup = df.loc[df.duplicated(["split", "file"]), "file"].iloc[0]
            raise UserError(f"The '{method}' score table lists '{dup}' twice in one split; "
                            "score every image once.")
        part = df.loc[:, list(ID_COLUMNS) + ["score"]].rename(columns={"score": method})
        if merged is None:
            merged = part
            continue
        merged = merged.merge(part, on=["split", "file"], how="outer", suffixes=("", "_new"))
        for col in ("class", "label"):
            new = merged.pop(f"{col}_new")
            clash = merged[col].notna() & new.notna() & (merged[col] != new)
            if clash.any():
                raise UserError(
                    f"The '{method}' score table gives '{merged.loc[clash, 'file'].iloc[0]}' a "
                    f"different {col} than the other tables; score all methods on one dataset.")
            merged[col] = merged[col].where(merged[col].notna(), new)
    if merged is None:
        return pd.DataFrame(columns=list(ID_COLUMNS))
    merged["label"] = merged["label"].astype("int64")
    extra = _descriptive_columns(dfs)  # image, group, metadata: one value per (split, file)
    merged = merged.loc[:, list(ID_COLUMNS) + list(dfs)]
    if extra is not None:
        merged = merged.merge(extra, on=["split", "file"], how="left")
        merged = merged.loc[:, list(ID_COLUMNS) + list(extra.columns[2:]) + list(dfs)]
    return merged


def _descriptive_columns(dfs: Mapping[str, pd.DataFrame]) -> pd.DataFrame | None:
    """(split, file, extra columns...) from the score tables' extra columns, first table first."""
    parts = [df.loc[:, ["split", "file", *[c for c in df.columns if c not in SCORE_COLUMNS]]]
             for df in dfs.values() if any(c not in SCORE_COLUMNS for c in df.columns)]
    if not parts:
        return None
    out = pd.concat(parts, ignore_index=True).drop_duplicates(["split", "file"], keep="first")
    return out.fillna("")


def write_all_scores(dfs: Mapping[str, pd.DataFrame], path: str | os.PathLike) -> Path:
    """Write `all_scores.xlsx`: one row per image, one score column per method."""
    return write_frames({"all_scores": all_scores_frame(dfs)}, path)


def read_score_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """Read a score sheet back, validated: required columns, numeric scores, labels 0/1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Score sheet {path} does not exist; run `anostyle score` first.")
    try:
        df = pd.read_excel(path, sheet_name=0, engine="openpyxl",
                           dtype={"file": str, "class": str, "split": str})
    except Exception as exc:  # zip/XML errors: not an xlsx file
        raise UserError(f"{path} is not a readable .xlsx file ({exc}); re-create it.") from None
    _check_columns(df, SCORE_COLUMNS, str(path))
    score = pd.to_numeric(df["score"], errors="coerce")
    if score.isna().any() or not np.isfinite(score.to_numpy()).all():
        bad = int((score.isna() | ~np.isfinite(score.fillna(0).to_numpy())).sum())
        raise UserError(f"{path} has {bad} empty or non-numeric score(s); re-score those images.")
    label = pd.to_numeric(df["label"], errors="coerce")
    if not label.isin([0, 1]).all():
        raise UserError(f"{path} has labels other than 0 (normal) and 1 (anomaly); fix the "
                        "label column.")
    df["score"] = score.astype("float64")
    df["label"] = label.astype("int64")
    for col in ("file", "class", "split"):
        df[col] = df[col].fillna("").astype(str)
    return df


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_dict(config: Any) -> dict[str, Any]:
    """A frozen dataclass config as a JSON-ready dict (paths become strings)."""
    assert dataclasses.is_dataclass(config), "expected a dataclass instance"
    return _jsonable(dataclasses.asdict(config))
