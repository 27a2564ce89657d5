"""A trivial reference detector: k-nearest-neighbour distance in a tiny pixel space.

Each image is shrunk to size x size with an area (box) filter, scaled to [0, 1] and flattened;
its anomaly score is the mean Euclidean distance to its k nearest normal TRAINING images
(k-NN novelty detection; e.g. Ramaswamy et al. 2000 for the distance-to-kth-neighbour idea).
Every evaluation shows it beside the GAN scores, so a report tells whether StyleGAN + encoder
beat a detector that only looks at colour and coarse layout.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

from stylegan.dataset import ImageDataset
from stylegan.errors import UserError

from anomaly import sheets

METHOD = "knn-pixels"
EVAL_SPLITS = ("val", "test")


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [C, H, W] -> float32 [C * size * size] in [0, 1], area-averaged (no rounding)."""
    assert image.ndim == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div(255).unsqueeze(0)  # [1, C, H, W]
    return F.adaptive_avg_pool2d(x, size).reshape(-1).numpy()  # [C * size * size]


def pixel_features(dataset: ImageDataset, *, size: int, desc: str = "pixels") -> np.ndarray:
    """All images of a dataset as shrunk pixel vectors: [N, C * size * size]."""
    rows = [shrink(dataset[i][0], size)
            for i in tqdm(range(len(dataset)), desc=desc, unit="img", disable=None, leave=False)]
    return np.stack(rows) if rows else np.zeros((0, 3 * size * size), dtype=np.float32)


def _manifest_classes(folder: Path) -> dict[tuple[str, str], str] | None:
    """(split, file) -> class name from the prepared dataset's manifest.csv, or None."""
    path = folder / "manifest.csv"
    if not path.is_file():
        return None
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("file", "class", "split") if c not in manifest.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; rebuild it with "
                        f"`anostyle prepare`.")
    return {(s, f): c for s, f, c in manifest[["split", "file", "class"]].itertuples(index=False)}


def knn_pixel_scores(train_zip: str | os.PathLike, eval_zips: Sequence[str | os.PathLike], *,
                     size: int = 16, k: int = 5) -> pd.DataFrame:
    """Score every image of `eval_zips` by its mean distance to the k nearest training images.

    The split of each eval zip is its file stem (val.zip -> 'val'); class names come from the
    manifest.csv beside `train_zip` (without one, the class is the label as text).
    Returns columns score, label (0 normal, 1 anomaly), file, class, split.
    """
    if size < 1 or k < 1:
        raise ValueError(f"size and k must be positive, got size={size}, k={k}")
    train = ImageDataset(train_zip)
    if len(train) < k:
        raise UserError(f"{train_zip} holds {len(train)} images, fewer than k={k} neighbours; "
                        f"prepare more normal training images.")
    index = NearestNeighbors(n_neighbors=k).fit(pixel_features(train, size=size, desc="train"))
    classes = _manifest_classes(Path(train_zip).parent)
    if classes is None:
        warnings.warn(f"{Path(train_zip).parent / 'manifest.csv'} is missing; the baseline names "
                      f"classes by their integer label.", stacklevel=2)
    parts = []
    for path in eval_zips:
        data, split = ImageDataset(path), Path(path).stem
        distances, _ = index.kneighbors(pixel_features(data, size=size, desc=split))  # [N, k]
        names = [str(n) for n in data.names]
        parts.append(pd.DataFrame({
            "score": distances.mean(axis=1).astype(np.float64),
            "label": (np.asarray(data.labels) != 0).astype(np.int64),
            "file": names,
            "class": [classes.get((split, n), str(lab)) if classes is not None else str(lab)
                      for n, lab in zip(names, data.labels)],
            "split": split,
        }))
    return pd.concat(parts, ignore_index=True)


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


def baseline_sheet(scores_dir: Path, prepared: Path | None, *, size: int = 16,
                   k: int = 5) -> list[str]:
    """Write `<scores_dir>/knn-pixels.xlsx` unless an up-to-date one exists; returns notes."""
    sheet = Path(scores_dir) / f"{METHOD}.xlsx"
    prepared = find_prepared(Path(scores_dir), prepared)
    if prepared is None:
        if sheet.is_file():
            return [f"{sheet} reused: no prepared dataset given to recompute it"]
        raise UserError("--baseline knn-pixels needs the prepared dataset: pass --prepared DIR "
                        "(the folder holding train.zip) or --baseline none.")
    inputs = [prepared / f"{s}.zip" for s in ("train", *EVAL_SPLITS)] + [prepared / "manifest.csv"]
    newest = max(p.stat().st_mtime for p in inputs if p.is_file())
    if sheet.is_file() and sheet.stat().st_mtime >= newest:
        return [f"{sheet} reused (newer than {prepared})"]
    evals = [prepared / f"{s}.zip" for s in EVAL_SPLITS if (prepared / f"{s}.zip").is_file()]
    df = knn_pixel_scores(prepared / "train.zip", evals, size=size, k=k)
    sheets.write_score_sheet(df, sheet)
    return [f"{sheet} computed from {prepared} ({size}x{size} pixels, k={k})"]
