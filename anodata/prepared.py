"""A prepared folder, read in one place: what `anostyle prepare` wrote (anodata/prepare.py).

`PreparedDataset.open(folder)` gives the split zips, manifest.csv as a frame (text cells; `label`
an integer), the rows of one split or of one zip's files in zip order, the sheets' description of
each file (original name, lesion group, metadata columns) and the policy prepare.json records.
Every command that reads manifest.csv reads it here (`read_manifest_csv`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd

from anodata.policy import Preprocessing, read_prepare_json, read_prepared_policy
from anodata.prepare import MANIFEST_COLUMNS
from anodata.sources import SPLITS
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("file", "class", "label", "split")  # the others may be absent in old folders


def prepared_folder(path: str | os.PathLike) -> Path:
    """The prepared folder, also when given one of its zips (e.g. `prepared/test.zip`)."""
    path = Path(path)
    return path.parent if path.suffix.lower() == ".zip" or path.is_file() else path


def split_of_zip(path: str | os.PathLike) -> str:
    """The split a zip holds by its name (`val.zip` -> val); any other name counts as test."""
    stem = Path(path).stem
    return stem if stem in SPLITS else "test"


def original_name(source: str) -> str:
    """The original image id of a manifest `source` path: its file stem (e.g. ISIC_0024307)."""
    return PurePosixPath(str(source).replace("\\", "/")).stem


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """manifest.csv as a frame: text cells ('' where empty), `label` int64; a file that is not
    a manifest is refused in one sentence."""
    fix = "prepare the data again with `anostyle prepare`"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable CSV ({reason}); {fix}.") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; {fix}.")
    label = pd.to_numeric(frame["label"].str.strip(), errors="coerce")
    bad = ~np.isfinite(label.to_numpy(np.float64)) | (label % 1 != 0).to_numpy()
    if bad.any():
        line = int(np.flatnonzero(bad)[0]) + 2  # the header is line 1
        raise UserError(f"{path} line {line} has the label {frame['label'].iloc[line - 2]!r}, "
                        f"not an integer class index (0 = normal); {fix}.")
    return frame.assign(label=label.astype(np.int64))


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """A folder written by `anostyle prepare`: {train,val,test}.zip, manifest.csv, prepare.json.

    manifest: one row per image, columns file, source, class, label, group, split, sha256 (source
    and sha256 may be absent) then the metadata columns; `label` is int64, the others text.
    """

    folder: Path
    manifest: pd.DataFrame

    @classmethod
    def open(cls, path: str | os.PathLike) -> PreparedDataset:
        """The prepared folder `path` (or the folder of its zip); one sentence when it is not."""
        folder = prepared_folder(path)
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{folder} is not a prepared folder: it has no {MANIFEST}; give the "
                            f"folder `anostyle prepare --dest` wrote (train.zip, val.zip, "
                            f"test.zip, {MANIFEST}).")
        return cls(folder, read_manifest_csv(folder / MANIFEST))

    @classmethod
    def find(cls, path: str | os.PathLike) -> PreparedDataset | None:
        """The prepared folder of a zip or folder, or None when no manifest.csv lies there (a
        dataset made otherwise, e.g. by NVlabs' dataset_tool.py: labels only)."""
        if not (prepared_folder(path) / MANIFEST).is_file():
            return None
        return cls.open(path)

    # ------------------------------------------------------------------ files

    def zip_path(self, split: str) -> Path:
        """The zip of one split (it may be absent)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        return self.folder / f"{split}.zip"

    def images(self, split: str) -> ImageDataset:
        """The images of one split (its zip, labels from its dataset.json)."""
        return ImageDataset(self.zip_path(split))

    @property
    def policy(self) -> Preprocessing | None:
        """The preprocessing policy prepare.json records (None when it records none)."""
        return read_prepared_policy(self.folder)

    @property
    def info(self) -> dict:
        """prepare.json as a dict ({} when absent)."""
        return read_prepare_json(self.folder) or {}

    @property
    def source_folder(self) -> str | None:
        """The raw image folder the data were prepared from, as prepare.json records it."""
        options = self.info.get("options")
        source = options.get("source") if isinstance(options, dict) else None
        return source if isinstance(source, str) and source else None

    # ------------------------------------------------------------------ rows

    @property
    def meta_columns(self) -> tuple[str, ...]:
        """The metadata columns (those after the standard ones, e.g. dx_type, age)."""
        return tuple(c for c in self.manifest.columns if c not in MANIFEST_COLUMNS)

    def rows(self, split: str) -> pd.DataFrame:
        """The manifest rows of one split in manifest order, one per file (the first where a
        name repeats; names repeat across the splits' zips, never within one)."""
        rows = self.manifest[self.manifest["split"] == split]
        return rows.drop_duplicates("file").reset_index(drop=True)

    def rows_of(self, split: str, files: Sequence[str]) -> pd.DataFrame:
        """The manifest rows of `files` of one split in the given order (e.g. a zip's), with the
        `file` column first; a file the manifest does not list gets NaN cells."""
        rows = self.rows(split).set_index("file").reindex(pd.Index(list(files), name="file"))
        return rows.reset_index()

    def descriptions(self, split: str) -> dict[str, dict[str, str]]:
        """file -> what the score sheets show of it: `image` (original name), `group` (lesion),
        then every metadata column."""
        out = {}
        for row in self.rows(split).to_dict("records"):
            meta = {"image": original_name(row.get("source", "")), "group": row.get("group", "")}
            meta.update({k: v for k, v in row.items() if k not in MANIFEST_COLUMNS
                         and k not in meta})
            out[row["file"]] = meta
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of images (splits and classes sorted by name)."""
        out: dict[str, dict[str, int]] = {}
        for (split, cls), n in self.manifest.groupby(["split", "class"]).size().items():
            out.setdefault(str(split), {})[str(cls)] = int(n)
        return out

    def normal_classes(self) -> list[str]:
        """The classes labelled 0, sorted."""
        return sorted(set(self.manifest.loc[self.manifest["label"] == 0, "class"]))

    def lesion_groups(self) -> pd.DataFrame:
        """Columns group, split: the lesion of each row ('image:<file>' for an image without a
        group), each (group, split) once, in manifest order."""
        group = self.manifest.get("group", pd.Series("", index=self.manifest.index))
        groups = group.where(group != "", "image:" + self.manifest["file"])
        return pd.DataFrame({"group": groups, "split": self.manifest["split"]}).drop_duplicates()
