"""Find the raw images of `anostyle prepare` and their classes, groups and given splits.

Three layouts:
  (a) `SOURCE/<class>/**/*`                       class folders;
  (b) `SOURCE/{train,val,test}/<class>/**/*`      class folders inside given splits (kept);
  (c) `SOURCE/**/*` + a metadata CSV              an id column (file name, file stem or relative
      path), a label column (HAM10000: `dx`) or one-hot columns (ISIC: `MEL,NV,...`), an
      optional group column (HAM10000: `lesion_id`) so that one lesion never sits in two splits,
      and an optional split column (train/val/test, e.g. an official split). Every other
      column (HAM10000: `dx_type, age, sex, localization`) travels with its image as metadata.

Every input that cannot be used becomes a `Rejection` (source, reason) instead of an error.
Paths are kept relative to SOURCE, in posix form, and lists are sorted so that everything
downstream is independent of file-system order.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from stylegan.errors import UserError
from stylegan.imageio import SOURCE_EXTENSIONS, is_hidden_part

SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                      "test": "test"}
ID_COLUMN_DEFAULTS = ("image_id", "image", "isic_id")


@dataclass(frozen=True)
class Candidate:
    """One raw image found in the source: where it is, what it shows, what it belongs to."""

    source: str  # path relative to the source folder (posix)
    class_name: str
    group: str  # images of one group (lesion) always share a split
    split: str | None = None  # given by layout (b) or a split column, else None
    meta: tuple[tuple[str, str], ...] = ()  # (column, value): the CSV row's other columns


@dataclass(frozen=True)
class Rejection:
    """An input left out, with the reason written to rejected.csv."""

    source: str
    reason: str


@dataclass(frozen=True)
class CsvSpec:
    """How to read the metadata CSV of layout (c)."""

    path: Path
    id_column: str | None = None  # None: the first of ID_COLUMN_DEFAULTS present
    label_column: str | None = None
    group_column: str | None = None
    onehot_columns: tuple[str, ...] = ()
    onehot_zero_class: str | None = None  # class of rows whose one-hot columns are all 0
    split_column: str | None = None  # train/val/test per row (e.g. the official ISIC split)


@dataclass(frozen=True)
class LabelRow:
    """One usable row of the metadata CSV."""

    line: int
    image_id: str
    class_name: str
    group: str  # '' without a group column
    split: str | None  # from the split column, normalised to train/val/test
    meta: tuple[tuple[str, str], ...]  # every column not used above, in CSV order


def normalise_split(value: str) -> str | None:
    """'Train', 'valid', 'VALIDATION', ... -> 'train', 'val', ...; None for anything else."""
    return SPLIT_FOLDER_NAMES.get(value.strip().lower())


def find_candidates(source: Path, *, csv_spec: CsvSpec | None = None,
                    exclude: Path | None = None) -> tuple[list[Candidate], list[Rejection]]:
    """All usable inputs of `source` (sorted by path) and the rejected ones."""
    files, rejected = _list_files(source, exclude=exclude)
    if csv_spec is not None:
        found, more = _match_csv(files, csv_spec, source)
    elif has_split_folders(source):
        found, more = _from_split_folders(files)
    else:
        found, more = _from_class_folders(files, prefix="")
    return sorted(found, key=lambda c: c.source), rejected + more


def has_split_folders(source: Path) -> bool:
    """Layout (b): every visible subfolder is a split folder (train, val/valid/validation, test)."""
    subdirs = {p.name.lower() for p in source.iterdir() if p.is_dir() and not is_hidden_part(p.name)}
    return bool(subdirs) and subdirs <= set(SPLIT_FOLDER_NAMES)


def _list_files(root: Path, *, exclude: Path | None) -> tuple[list[str], list[Rejection]]:
    """Relative posix paths of the image files under root; other files are rejected."""
    exclude = exclude.resolve() if exclude is not None else None
    files, rejected = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames
                       if not is_hidden_part(d) and (here / d).resolve() != exclude]
        for name in filenames:
            if is_hidden_part(name):
                continue
            rel = (here / name).relative_to(root).as_posix()
            if Path(name).suffix.lower() in SOURCE_EXTENSIONS:
                files.append(rel)
            else:
                rejected.append(Rejection(rel, f"unsupported file type '{Path(name).suffix}' "
                                               f"(images: {', '.join(sorted(SOURCE_EXTENSIONS))})"))
    return sorted(files), rejected


def _from_class_folders(files: list[str], *, prefix: str,
                        split: str | None = None) -> tuple[list[Candidate], list[Rejection]]:
    """Layout (a): the first folder below `prefix` names the class; each image is its own group."""
    found, rejected = [], []
    for rel in files:
        parts = rel[len(prefix):].split("/")
        if len(parts) < 2:
            rejected.append(Rejection(rel, "not inside a class folder (expected "
                                           f"{prefix or 'SOURCE/'}<class>/<image>)"))
        else:
            found.append(Candidate(rel, parts[0], group=rel, split=split))
    return found, rejected


def _from_split_folders(files: list[str]) -> tuple[list[Candidate], list[Rejection]]:
    """Layout (b): SOURCE/<split>/<class>/<image>, splits kept as given."""
    found, rejected = [], []
    for rel in files:
        top = rel.split("/")[0]
        if "/" not in rel or top.lower() not in SPLIT_FOLDER_NAMES:
            rejected.append(Rejection(rel, "not inside a train/val/test folder"))
            continue
        more_found, more_rejected = _from_class_folders(
            [rel], prefix=top + "/", split=SPLIT_FOLDER_NAMES[top.lower()])
        found += more_found
        rejected += more_rejected
    return found, rejected


# ------------------------------------------------------------------------- layout (c): CSV

def _match_csv(files: list[str], spec: CsvSpec,
               source: Path) -> tuple[list[Candidate], list[Rejection]]:
    """Layout (c): join CSV rows to image files by id (relative path, file name or file stem)."""
    rows, rejected = read_label_rows(spec)
    by_key = _index_files(files)
    used: dict[str, str] = {}  # file -> id of the row that took it
    found = []
    for row in rows:
        line, image_id = row.line, row.image_id
        matches = by_key.get(image_id, [])
        if not matches:
            rejected.append(Rejection(image_id, f"{spec.path.name} line {line}: no image file "
                                                f"named {image_id}.* under {source}"))
            continue
        for other in matches[1:]:
            rejected.append(Rejection(other, f"another file with id {image_id} was used: "
                                             f"{matches[0]}"))
            used[other] = image_id
        used[matches[0]] = image_id
        found.append(Candidate(matches[0], row.class_name, group=row.group or image_id,
                               split=row.split, meta=row.meta))
    rejected += [Rejection(rel, f"no row for this image in {spec.path.name}")
                 for rel in files if rel not in used]
    return found, rejected


def _index_files(files: list[str]) -> dict[str, list[str]]:
    """Lookup id -> files: relative path first, then file name, then file stem (sorted)."""
    index: dict[str, list[str]] = {}
    for key_of in (lambda rel: rel, lambda rel: rel.rsplit("/", 1)[-1],
                   lambda rel: Path(rel).stem):
        keyed: dict[str, list[str]] = {}
        for rel in files:
            keyed.setdefault(key_of(rel), []).append(rel)
        for key, rels in keyed.items():
            index.setdefault(key, rels)
    return index


def read_label_rows(spec: CsvSpec) -> tuple[list[LabelRow], list[Rejection]]:
    """Every usable CSV row, and the rejected rows; a bad split value is a UserError."""
    try:
        with open(spec.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            id_column = _check_columns(spec, header)
            used = {id_column, spec.label_column, spec.group_column, spec.split_column,
                    *spec.onehot_columns}
            meta_columns = [c for c in header if c not in used]
            raw_rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise UserError(f"--labels {spec.path} is not UTF-8 text; save it as UTF-8 CSV.") from None
    rows, rejected, seen = [], [], {}
    for line, row in raw_rows:
        image_id = (row.get(id_column) or "").strip()
        class_name, problem = _row_class(row, spec)
        group = (row.get(spec.group_column) or "").strip() if spec.group_column else ""
        where = f"{spec.path.name} line {line}"
        if not image_id:
            rejected.append(Rejection(where, f"empty {id_column}"))
        elif image_id in seen:
            rejected.append(Rejection(image_id, f"{where}: second row for this id "
                                                f"(first on line {seen[image_id]})"))
        elif problem:
            seen[image_id] = line
            rejected.append(Rejection(image_id, f"{where}: {problem}"))
        else:
            seen[image_id] = line
            meta = tuple((c, (row.get(c) or "").strip()) for c in meta_columns)
            rows.append(LabelRow(line, image_id, class_name, group,
                                 _row_split(row, spec, where), meta))
    return rows, rejected


def _check_columns(spec: CsvSpec, header: list[str]) -> str:
    """Check that the named columns exist; return the id column to use."""
    id_column = spec.id_column
    if id_column is None:
        id_column = next((c for c in ID_COLUMN_DEFAULTS if c in header), None)
        if id_column is None:
            raise UserError(f"--labels {spec.path} has none of the columns "
                            f"{', '.join(ID_COLUMN_DEFAULTS)}; name the image id column with "
                            f"--id-column (columns: {', '.join(header)}).")
    wanted = [id_column, spec.label_column, spec.group_column, spec.split_column,
              *spec.onehot_columns]
    missing = [c for c in wanted if c is not None and c not in header]
    if missing:
        raise UserError(f"--labels {spec.path} has no column {', '.join(missing)}; "
                        f"its columns are: {', '.join(header)}.")
    return id_column


def _row_split(row: dict[str, str], spec: CsvSpec, where: str) -> str | None:
    """The row's split from the split column (None without one); other values: UserError."""
    if spec.split_column is None:
        return None
    value = (row.get(spec.split_column) or "").strip()
    split = normalise_split(value)
    if split is None:
        raise UserError(f"{where}: --split-column {spec.split_column} is {value!r}, not one of "
                        f"train, val (or valid, validation) and test; fix the value or "
                        f"leave out --split-column.")
    return split


def _row_class(row: dict[str, str], spec: CsvSpec) -> tuple[str, str | None]:
    """(class name, None) for a row, or ("", reason) when the row has no usable class."""
    if spec.label_column is not None:
        value = (row.get(spec.label_column) or "").strip()
        return (value, None) if value else ("", f"empty {spec.label_column}")
    hot = []
    for column in spec.onehot_columns:
        text = (row.get(column) or "").strip()
        try:
            value = float(text)
        except ValueError:
            return "", f"{column} = {text!r} is not a number"
        if value >= 0.5:
            hot.append(column)
    if len(hot) > 1:
        return "", f"several one-hot columns are set ({', '.join(hot)})"
    if hot:
        return hot[0], None
    if spec.onehot_zero_class is None:
        return "", ("no one-hot column is set; name the class of such rows with "
                    "--onehot-zero-class")
    return spec.onehot_zero_class, None
