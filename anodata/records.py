"""Read back what `anostyle prepare` recorded about each image of a prepared zip: its original id
(the source file stem, e.g. ISIC_0024307) and its group (lesion).

    records = read_image_records("prepared/test.zip")
    records["00000/img00000003.png"].image    # 'ISIC_0024307'

The records live in the zip's dataset.json under `"anostyle": {"images": {name: {"image", "group"}}}`;
zips prepared before that key existed are read from manifest.csv beside them (rows of the zip's
split), so that both give the same answer.
"""

from __future__ import annotations

import csv
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from anodata.prepare import RECORDS_KEY, original_id
from stylegan.errors import UserError
from stylegan.fileio import UntrustedJSONError, loads_untrusted

DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class ImageRecord:
    """Where one prepared image came from."""

    image: str  # original id: the source file stem (e.g. ISIC_0024307)
    group: str  # its group (e.g. the HAM10000 lesion_id)


def read_image_records(dataset: str | os.PathLike) -> dict[str, ImageRecord]:
    """Zip entry name -> ImageRecord for a prepared zip (or folder with dataset.json); {} when
    neither dataset.json nor manifest.csv records anything."""
    path = Path(dataset)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a zip written by `anostyle prepare`.")
    body = _dataset_json(path)
    images = body.get(RECORDS_KEY, {}).get("images") if isinstance(body, dict) else None
    if isinstance(images, dict):
        return {name: ImageRecord(str(r.get("image", "")), str(r.get("group", "")))
                for name, r in images.items() if isinstance(r, dict)}
    return _from_manifest(path)


def _dataset_json(path: Path) -> dict | None:
    try:
        if path.is_dir():
            file = path / DATASET_JSON
            text = file.read_text(encoding="utf-8") if file.is_file() else None
        else:
            with zipfile.ZipFile(path) as z:
                text = z.read(DATASET_JSON).decode("utf-8") if DATASET_JSON in z.namelist() \
                    else None
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a readable prepared dataset ({exc}).") from None
    if text is None:
        return None
    try:
        return loads_untrusted(text)
    except UntrustedJSONError as exc:
        raise UserError(f"{path}: {DATASET_JSON} cannot be read: {exc}; prepare the data "
                        f"again.") from None


def _from_manifest(path: Path) -> dict[str, ImageRecord]:
    """Records of a zip's split from manifest.csv beside it (older prepared data)."""
    manifest = (path.parent if path.is_file() else path) / "manifest.csv"
    split = path.stem
    if not manifest.is_file() or split not in ("train", "val", "test"):
        return {}
    with open(manifest, newline="", encoding="utf-8") as f:
        return {r["file"]: ImageRecord(original_id(r.get("source") or ""), r.get("group") or "")
                for r in csv.DictReader(f) if r.get("split") == split and r.get("file")}
