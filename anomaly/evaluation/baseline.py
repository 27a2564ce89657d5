"""Reference detectors without a GAN: k-nearest-neighbour distances in tiny pixel and colour spaces.

knn-pixels: each image is shrunk to size x size with an area (box) filter, scaled to [0, 1] and
    flattened; its score is the mean Euclidean distance to its k nearest normal TRAINING images
    (k-NN novelty detection; e.g. Ramaswamy et al. 2000 for the distance-to-kth-neighbour idea).
knn-colour: each image becomes its joint RGB histogram (bins per channel, b^3 cells, summing to
    1); its score is the mean L1 distance to the k nearest training histograms (Swain & Ballard
    1991 compare colour histograms by intersection, which is 1 - L1 / 2 for normalised ones).

The resolution/bins and k of each baseline are chosen by the AUC on the VALIDATION split, on the
main comparison of anomaly.evaluation.protocol (normal vs the anomaly class when given and present
in validation, else vs every anomaly); test is never looked at.
Every evaluation shows both beside the GAN scores, so a report tells whether StyleGAN + encoder
beat a detector that only looks at colour and coarse layout.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from anodata.prepared import MANIFEST, PreparedDataset
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json

from anomaly.evaluation import protocol, sheets
from anomaly.evaluation.metrics import roc_auc
from stylegan.progress import progress

METHOD = "knn-pixels"
COLOUR_METHOD = "knn-colour"
METHODS = (METHOD, COLOUR_METHOD)
EVAL_SPLITS = ("val", "test")
RECORD = "baselines.json"
_MANIFEST_SKIPPED = ("file", "class", "label", "split", "sha256")


@dataclass(frozen=True)
class BaselineGrid:
    """Configurations tried on validation: pixel sizes, colour bins per channel, neighbours k."""

    sizes: tuple[int, ...] = (8, 16, 32)
    bins: tuple[int, ...] = (4, 8)
    ks: tuple[int, ...] = (1, 5, 20)

    def __post_init__(self):
        for name in ("sizes", "bins", "ks"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise UserError(f"The baseline {name} {values} must be positive integers; "
                                f"e.g. sizes 8,16,32, bins 4,8, k 1,5,20.")
            object.__setattr__(self, name, tuple(sorted({int(v) for v in values})))


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [C, H, W] -> float32 [C * size * size] in [0, 1], area-averaged (no rounding)."""
    assert image.ndim == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div(255).unsqueeze(0)  # [1, C, H, W]
    return F.adaptive_avg_pool2d(x, size).reshape(-1).numpy()  # [C * size * size]


def colour_histogram(image: np.ndarray, bins: int) -> np.ndarray:
    """uint8 [C, H, W] -> float32 [bins ** C]: the joint histogram, normalised to sum 1.

    Channel value v falls in bin floor(v * bins / 256); cell index = sum_c bin_c * bins^(C-1-c).
    """
    assert image.ndim == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    cells = image.reshape(image.shape[0], -1).astype(np.int64) * bins // 256  # [C, H * W]
    index = np.zeros(cells.shape[1], dtype=np.int64)
    for channel in cells:
        index = index * bins + channel
    counts = np.bincount(index, minlength=bins ** image.shape[0]).astype(np.float32)
    return counts / counts.sum()


def dataset_features(dataset: ImageDataset, grid: BaselineGrid, *,
                     desc: str = "features") -> dict[str, np.ndarray]:
    """One pass over a dataset: {'pixels<size>': [N, C*size^2], 'colour<bins>': [N, bins^C]}."""
    rows: dict[str, list[np.ndarray]] = {}
    for i in progress(range(len(dataset)), desc=desc, unit="img", leave=False):
        image = dataset[i][0]
        for size in grid.sizes:
            rows.setdefault(f"pixels{size}", []).append(shrink(image, size))
        for bins in grid.bins:
            rows.setdefault(f"colour{bins}", []).append(colour_histogram(image, bins))
    return {k: np.stack(v) for k, v in rows.items()}


def knn_mean_distances(train: np.ndarray, queries: np.ndarray, ks: Sequence[int], *,
                       metric: str) -> dict[int, np.ndarray]:
    """{k: mean distance [M] of each query to its k nearest training rows} for every k."""
    index = NearestNeighbors(n_neighbors=max(ks), metric=metric).fit(train)
    distances, _ = index.kneighbors(queries)  # [M, max k], ascending
    return {k: distances[:, :k].mean(axis=1).astype(np.float64) for k in ks}


def _identity_frame(data: ImageDataset, split: str,
                    prepared: PreparedDataset | None) -> pd.DataFrame:
    """Columns label, file, class, split + the manifest's other columns (group, source, ...)."""
    names = [str(n) for n in data.names]
    frame = pd.DataFrame({"label": (np.asarray(data.labels) != 0).astype(np.int64),
                          "file": names, "split": split})
    if prepared is None:
        return frame.assign(**{"class": [str(lab) for lab in data.labels]})[
            ["label", "file", "class", "split"]]
    rows = prepared.rows_of(split, names)  # in the zip's order
    extra = [c for c in rows.columns if c not in _MANIFEST_SKIPPED]
    merged = frame.join(rows[["class", *extra]])
    fallback = pd.Series([str(lab) for lab in data.labels], index=merged.index)
    merged["class"] = merged["class"].where(merged["class"].notna(), fallback)
    return merged[["label", "file", "class", "split", *extra]]


def _zip_features(folder: Path, grid: BaselineGrid):
    """(train features, [(identity frame, features)] per eval split) of a prepared dataset."""
    train = ImageDataset(folder / "train.zip")
    if len(train) < max(grid.ks):
        raise UserError(f"{folder / 'train.zip'} holds {len(train)} images, fewer than "
                        f"k={max(grid.ks)} neighbours; prepare more normal training images or "
                        f"pass smaller k values.")
    prepared = PreparedDataset.find(folder)
    if prepared is None:
        warnings.warn(f"{folder / MANIFEST} is missing; the baselines name classes by "
                      f"their integer label.", stacklevel=3)
    parts = []
    for split in EVAL_SPLITS:
        if (folder / f"{split}.zip").is_file():
            data = ImageDataset(folder / f"{split}.zip")
            parts.append((_identity_frame(data, split, prepared),
                          dataset_features(data, grid, desc=split)))
    return dataset_features(train, grid, desc="train"), parts


def _selection(ident: pd.DataFrame, normal_class: str | None,
               anomaly_class: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(mask [N] of the validation rows of the selection comparison, their y): the protocol's
    main comparison, normal vs every anomaly when `anomaly_class` has no validation images."""
    normal = protocol.resolve_normal_class([ident], normal_class, where="the prepared dataset")
    val = ident["split"].to_numpy() == "val"
    rows = ident[val]
    if anomaly_class is None or not (rows["class"] == anomaly_class).any():
        anomaly_class = protocol.ALL_ANOMALIES
    main = protocol.build_comparisons(rows, normal, anomaly_class, where="validation images")[0]
    return val & main.mask(ident), main.labels(rows)


def baseline_frames(prepared: str | os.PathLike, grid: BaselineGrid = BaselineGrid(), *,
                    anomaly_class: str | None = None,
                    normal_class: str | None = None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Score val and test with every configuration; keep the best on validation per baseline.

    Returns ({method: score frame}, record) where the record lists every configuration's
    validation AUC and the chosen one (and the normal class when one is given).
    """
    prepared = Path(prepared)
    train, parts = _zip_features(prepared, grid)
    ident = pd.concat([p[0] for p in parts], ignore_index=True)
    target, y_val = _selection(ident, normal_class, anomaly_class)
    frames, record = {}, {"grid": asdict(grid), "anomaly_class": anomaly_class, "tried": []}
    if normal_class is not None:
        record["normal_class"] = normal_class
    for method, kind, metric, values in ((METHOD, "pixels", "euclidean", grid.sizes),
                                         (COLOUR_METHOD, "colour", "manhattan", grid.bins)):
        best = None
        for value in values:
            key = f"{kind}{value}"
            per_k = [knn_mean_distances(train[key], f[key], grid.ks, metric=metric)
                     for _, f in parts]
            for k in grid.ks:
                scores = np.concatenate([d[k] for d in per_k])
                auc = roc_auc(y_val, scores[target])
                record["tried"].append({"method": method, kind: value, "k": k,
                                        "val_auc": _finite(auc)})
                if best is None or auc > best[0] or (np.isnan(best[0]) and not np.isnan(auc)):
                    best = (auc, value, k, scores)
        auc, value, k, scores = best
        record[method] = {kind: value, "k": k, "val_auc": _finite(auc)}
        frames[method] = sheets.order_score_columns(ident.assign(score=scores))
    return frames, record


def _finite(value: float) -> float | None:
    """JSON-safe number: None for NaN (no validation anomalies to compute an AUC)."""
    return None if value is None or not np.isfinite(value) else float(value)


def find_prepared(scores_dir: Path, prepared: Path | None) -> Path | None:
    """The prepared dataset folder: the given one, or score.json's "prepared" entry, or None."""
    if prepared is None:
        record = Path(scores_dir) / "score.json"
        if not record.is_file():
            return None
        try:
            entry = json.loads(record.read_text()).get("prepared")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise UserError(f"{record} is not a valid JSON object; re-run `anostyle score` or "
                            f"pass --prepared DIR.") from None
        if not entry:
            return None
        prepared = Path(entry)
        if not prepared.is_absolute() and not prepared.exists():
            prepared = Path(scores_dir) / prepared  # a path relative to the score folder
    prepared = Path(prepared)
    if not (prepared / "train.zip").is_file() or not (prepared / "test.zip").is_file():
        raise UserError(f"Prepared dataset {prepared} lacks train.zip or test.zip; pass the "
                        f"folder `anostyle prepare --dest` wrote, or --baseline none.")
    return prepared


def _up_to_date(scores_dir: Path, prepared: Path, grid: BaselineGrid,
                anomaly_class: str | None, normal_class: str | None) -> dict | None:
    """The recorded choice when every baseline sheet is newer than the dataset and was made
    with this grid, anomaly class and normal class; else None."""
    record_path = scores_dir / RECORD
    paths = [scores_dir / f"{m}.xlsx" for m in METHODS] + [record_path]
    if not all(p.is_file() for p in paths):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("grid") != json.loads(json.dumps(asdict(grid))) \
            or record.get("anomaly_class") != anomaly_class \
            or record.get("normal_class") != normal_class:
        return None
    inputs = [prepared / f"{s}.zip" for s in ("train", *EVAL_SPLITS)] + [prepared / MANIFEST]
    newest = max(p.stat().st_mtime for p in inputs if p.is_file())
    return record if min(p.stat().st_mtime for p in paths) >= newest else None


def _describe(record: dict) -> str:
    pix, col = record[METHOD], record[COLOUR_METHOD]

    def auc(entry: dict) -> str:
        value = entry.get("val_auc")
        return "n/a: no validation anomalies" if value is None else f"{value:.3f}"
    return (f"{METHOD}: {pix['pixels']}x{pix['pixels']} pixels, k={pix['k']} (val AUC "
            f"{auc(pix)}); {COLOUR_METHOD}: {col['colour']} bins per channel RGB histogram, L1, "
            f"k={col['k']} (val AUC {auc(col)}); chosen on validation")


def baseline_sheets(scores_dir: str | os.PathLike, prepared: str | os.PathLike | None,
                    grid: BaselineGrid = BaselineGrid(), *,
                    anomaly_class: str | None = None,
                    normal_class: str | None = None) -> list[str]:
    """Write knn-pixels.xlsx, knn-colour.xlsx and baselines.json into the scores folder unless
    up to date; returns notes."""
    scores_dir = Path(scores_dir)
    prepared = find_prepared(scores_dir, None if prepared is None else Path(prepared))
    if prepared is None:
        if all((scores_dir / f"{m}.xlsx").is_file() for m in METHODS):
            return [f"baseline sheets in {scores_dir} reused: no prepared dataset given to "
                    f"recompute them"]
        raise UserError("The k-NN baselines need the prepared dataset: pass --prepared DIR "
                        "(the folder holding train.zip) or --baseline none.")
    record = _up_to_date(scores_dir, prepared, grid, anomaly_class, normal_class)
    if record is not None:
        return [f"baseline sheets reused (newer than {prepared}); {_describe(record)}"]
    frames, record = baseline_frames(prepared, grid, anomaly_class=anomaly_class,
                                     normal_class=normal_class)
    for method, frame in frames.items():
        sheets.write_score_sheet(frame, scores_dir / f"{method}.xlsx")
    atomic_write_json(scores_dir / RECORD, {**record, "prepared": str(prepared)})
    return [f"baseline sheets computed from {prepared}; {_describe(record)}"]
