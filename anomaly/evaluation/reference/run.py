"""`anostyle reference`: what the validation labels buy with a plain supervised classifier.

The protocol, the one `tune` and `evaluate` follow:
- The classifier is trained on the VALIDATION split only (normal class = the rows labelled 0,
  anomaly class 'mel' when present, else every other class), its one setting chosen by
  lesion-grouped cross-validation inside validation (anomaly/evaluation/reference/classifier.py).
- Only then is test.zip opened and scored by the refitted classifier.
- The sheet `reference.xlsx` (columns score, label, file, class, split + the manifest's group and
  metadata) holds test scores and validation scores; the validation images of the training
  comparison carry their OUT-OF-FOLD scores (a model that never saw their lesion), the other
  validation images the refitted model's, so `evaluate` can choose a threshold on validation.

Backbones: 'efficientnet-lite0' (ImageNet weights from the optional package of the
`reference` extra; pooled 1280 features, then logistic regression, C by cross-validation) and
'small-cnn' (a small CNN trained from scratch on the validation images, its epochs chosen by
cross-validation; no extra package). Backbone features are cached per dataset file, backbone
and input size (`<prepared>/features/*.npz`, loaded with allow_pickle=False), so a re-run
takes seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from stylegan.progress import progress

from anomaly.evaluation import sheets
from anodata.prepared import PreparedDataset
from anomaly.evaluation.baseline import _identity_frame  # the baselines' sheet identity columns
from anomaly.evaluation.reference.classifier import FittedReference, fit_logistic
from stylegan.dataset import ImageDataset, iterate_batches
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json, sha256_file

BACKBONES = ("efficientnet-lite0", "small-cnn")
INPUT_SIZES = {"efficientnet-lite0": 224, "small-cnn": 64}
SHEET = "reference"
DEFAULT_ANOMALY_CLASS = "mel"
CACHE_VERSION = 1  # bump when the feature computation changes


@dataclass(frozen=True)
class ReferenceOptions:
    """Options of `anostyle reference` (saved as reference.json beside the sheet)."""

    prepared: str  # folder of `anostyle prepare`: val.zip, test.zip, manifest.csv
    outdir: str  # the score folder: reference.xlsx + reference.json
    backbone: str = "efficientnet-lite0"  # or 'small-cnn'
    size: int | None = None  # input pixels of the backbone (None: 224 / 64 for small-cnn)
    normal_class: str | None = None  # None: the class of the rows labelled 0
    anomaly_class: str | None = None  # None: 'mel' when present, else every other class
    folds: int = 5  # lesion-grouped cross-validation folds inside validation
    cs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # logistic regression C
    epochs: tuple[int, ...] = (5, 10, 20, 30)  # small-cnn epochs tried
    seed: int = 0
    batch: int = 32
    cache: str | None = None  # feature cache folder (None: <prepared>/features)

    @property
    def input_size(self) -> int:
        return self.size or INPUT_SIZES[self.backbone]


@dataclass(frozen=True)
class Split:
    """One prepared split: its identity rows (label, file, class, split, group, ...) and zip."""

    frame: pd.DataFrame
    path: Path


def run_reference(opts: ReferenceOptions) -> dict[str, Path]:
    """Fit on validation (settings by grouped CV inside it), then score test; write the sheet."""
    opts = _checked(opts)
    start = time.time()
    prepared = Path(opts.prepared)
    dataset = PreparedDataset.find(prepared)  # None: no manifest.csv, labels only
    val = _open_split(prepared, "val", dataset)
    normal, anomalies = training_classes(val.frame, opts.normal_class, opts.anomaly_class)
    rows = val.frame["class"].isin((normal, *anomalies)).to_numpy()
    y = val.frame["class"].isin(anomalies).to_numpy()[rows].astype(np.int64)
    groups = lesion_groups(val.frame)[rows]
    inputs = _backbone_inputs(opts, val)
    fitted = _fit(opts, _take(inputs, rows), y, groups)
    val_scores = fitted.score(inputs)
    val_scores[rows] = fitted.oof_scores
    test = _open_split(prepared, "test", dataset)  # opened only after fitting
    test_scores = fitted.score(_backbone_inputs(opts, test))
    frame = pd.concat([val.frame.assign(score=val_scores), test.frame.assign(score=test_scores)],
                      ignore_index=True)
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sheet = sheets.write_score_sheet(sheets.order_score_columns(frame), outdir / f"{SHEET}.xlsx")
    record = outdir / f"{SHEET}.json"
    atomic_write_json(record, {
        "options": sheets.config_dict(opts), "backbone": opts.backbone,
        "input_size": opts.input_size, "normal_class": normal, "anomaly_classes": list(anomalies),
        "trained_on": {"split": "val", "images": int(rows.sum()), "anomalies": int(y.sum()),
                       "lesions": int(len(np.unique(groups)))},
        "chosen": {fitted.setting: fitted.value, "folds": fitted.folds,
                   "cv_auc": fitted.cv_auc[fitted.value]},
        "cv_auc": [{fitted.setting: k, "auc": v} for k, v in fitted.cv_auc.items()],
        "images": len(frame), "seconds": round(time.time() - start, 1)})
    return {"sheet": sheet, "record": record}


def training_classes(frame: pd.DataFrame, normal: str | None,
                     anomaly: str | None) -> tuple[str, tuple[str, ...]]:
    """(normal class, anomaly classes) of the training comparison, as `evaluate` defaults them."""
    classes = sorted(set(frame["class"]))
    if normal is None:
        zero = sorted(set(frame.loc[frame["label"] == 0, "class"]))
        if len(zero) != 1:
            raise UserError(f"The validation split labels {len(zero)} classes as normal "
                            f"({', '.join(zero) or 'none'}); pass --normal-class NAME.")
        normal = zero[0]
    others = [c for c in classes if c != normal]
    for name, flag in ((normal, "--normal-class"), (anomaly, "--anomaly-class")):
        if name is not None and name not in classes:
            raise UserError(f"{flag} '{name}' has no validation images; classes found: "
                            f"{', '.join(classes)}.")
    if anomaly is not None:
        return normal, (anomaly,)
    if DEFAULT_ANOMALY_CLASS in others:
        return normal, (DEFAULT_ANOMALY_CLASS,)
    if not others:
        raise UserError("The validation split holds only normal images; the reference needs "
                        "labelled anomalies in val.zip.")
    return normal, tuple(others)


def lesion_groups(frame: pd.DataFrame) -> np.ndarray:
    """Lesion id of each row (the manifest's `group`; an image without one is its own)."""
    if "group" not in frame.columns:
        return ("image:" + frame["file"].astype(str)).to_numpy()
    raw = frame["group"].fillna("").astype(str).str.strip()
    return raw.where(raw != "", "image:" + frame["file"].astype(str)).to_numpy()


def _checked(opts: ReferenceOptions) -> ReferenceOptions:
    if opts.backbone not in BACKBONES:
        raise UserError(f"--backbone '{opts.backbone}' is unknown; use {' or '.join(BACKBONES)}.")
    if opts.folds < 2:
        raise UserError(f"--folds {opts.folds}: cross-validation needs at least 2 folds.")
    if not opts.cs or min(opts.cs) <= 0:
        raise UserError(f"--cs {opts.cs}: give positive values of C, e.g. 0.01,0.1,1.")
    if not opts.epochs or min(opts.epochs) < 1:
        raise UserError(f"--epochs {opts.epochs}: give positive epoch counts, e.g. 5,10,20.")
    for split in ("val", "test"):
        if not (Path(opts.prepared) / f"{split}.zip").is_file():
            raise UserError(f"--prepared {opts.prepared} has no {split}.zip; give the folder "
                            f"`anostyle prepare --dest` wrote.")
    return opts


def _open_split(prepared: Path, split: str, dataset: PreparedDataset | None) -> Split:
    path = prepared / f"{split}.zip"
    return Split(_identity_frame(ImageDataset(path), split, dataset), path)


def _take(inputs, rows: np.ndarray):
    """The rows (a boolean mask) of features [N, D] or images [N, C, S, S]."""
    return inputs[torch.from_numpy(np.flatnonzero(rows))] if torch.is_tensor(inputs) \
        else inputs[rows]


def _fit(opts: ReferenceOptions, inputs, y: np.ndarray, groups: np.ndarray) -> FittedReference:
    if opts.backbone == "small-cnn":
        from anomaly.evaluation.reference.small_cnn import fit_small_cnn

        return fit_small_cnn(inputs, y, groups, epochs=opts.epochs, folds=opts.folds,
                             seed=opts.seed, batch=opts.batch)
    return fit_logistic(inputs, y, groups, cs=opts.cs, folds=opts.folds, seed=opts.seed)


def _backbone_inputs(opts: ReferenceOptions, split: Split):
    """What the classifier reads: pooled backbone features [N, D] (numpy), or for the small
    CNN the images resized to its input, uint8 [N, C, S, S] (torch)."""
    dataset = ImageDataset(split.path)
    if opts.backbone == "small-cnn":
        return torch.cat([resize_u8(images, opts.input_size) for images, _l, _n in
                          iterate_batches(dataset, opts.batch)])
    return cached_features(opts, dataset, split.path.stem)


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size] (bilinear; area-like when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def cached_features(opts: ReferenceOptions, dataset: ImageDataset, split: str) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features [N, 1280] of every image, from the cache when the
    zip (by SHA-256), backbone and input size match."""
    cache = Path(opts.cache) if opts.cache else Path(opts.prepared) / "features"
    key = f"{split}-{opts.backbone}-{opts.input_size}px-v{CACHE_VERSION}-" \
          f"{sha256_file(dataset.path)[:16]}.npz"
    path = cache / key
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if list(data["names"]) == list(dataset.names):
                return data["features"]
    features = backbone_features(dataset, size=opts.input_size, batch=opts.batch, desc=split)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.tmp.npz"
    np.savez(tmp, features=features, names=np.asarray(dataset.names, dtype=str))
    tmp.replace(path)
    return features


@torch.inference_mode()
def backbone_features(dataset: ImageDataset, *, size: int, batch: int = 32,
                      desc: str = "features") -> np.ndarray:
    """EfficientNet-Lite0 pooled features [N, 1280] of a dataset's images at size x size."""
    from anomaly.evaluation.reference import efficientnet

    net = efficientnet.pretrained()
    out = []
    with progress(total=len(dataset), unit="img", desc=f"features {desc}") as bar:
        for images, _labels, _names in iterate_batches(dataset, batch):
            out.append(net(efficientnet.normalise(resize_u8(images, size))).numpy())
            bar.update(len(images))
    return np.concatenate(out) if out else np.zeros((0, efficientnet.HEAD_CHANNELS), np.float32)
