"""`anostyle score` and `anostyle tsne`: run images through encoder, generator and discriminator
in batches (anomaly.model.ano_model.AnoModel) and turn them into score sheets, residual heatmaps and
a latent t-SNE. Sheets carry each image's original name (`image`), lesion (`group`) and the
manifest's metadata columns.

Memory does not grow with the number of images: each batch is scored and dropped; only the
scores (and, for t-SNE, the latent codes) are kept. The izif score uses the kappa and the
discriminator feature layer the user gives, else the detector's (detector.json), else those the
encoder was trained with.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from anodata.prepared import PreparedDataset, split_of_zip
from anomaly.model.ano_model import DEFAULT_METHODS, AnoModel, Forward
from anomaly.methods import registry
from anomaly.methods.scores import ScoreTable, method_filename
from anomaly.evaluation.sheets import config_dict, write_all_scores, write_score_sheet
from stylegan.dataset import ImageDataset, iterate_batches
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json
from stylegan.imageutil import from_uint8, to_uint8
from stylegan.progress import progress


@dataclass(frozen=True)
class ScoreOptions:
    """Options of `anostyle score`. Saved as score.json beside the sheets."""

    network: str
    encoder: str
    data: tuple[str, ...]
    outdir: str
    methods: str = DEFAULT_METHODS
    kappa: float | None = None  # None: the detector's, else the encoder's training kappa
    feature_layer: str | None = None  # None: the detector's, else the encoder's training one
    batch: int = 64
    heatmaps: str | None = None  # folder for residual heatmaps of the most anomalous test images
    num_heatmaps: int = 8
    device: str = "auto"
    allow_mismatch: bool = False  # accept an encoder trained for another network (noted)
    detector: str | None = None  # detector.json from `anostyle tune`: adds detector.xlsx
    tta: bool = False  # average every method over the 8 rotations/flips (sheets '<m>@tta')
    train: str | None = None  # train.zip: bank for density/dfeat-res methods without --detector


@dataclass(frozen=True)
class _Rows:
    """Per-file descriptions of one dataset from manifest.csv: class name, split and the
    descriptive columns of the sheets (image = original file stem, group, metadata columns)."""

    classes: dict[str, str]
    splits: dict[str, str]
    default_split: str
    meta: dict[str, dict[str, str]] = field(default_factory=dict)

    def describe(self, names: list[str], labels: list[int]) -> tuple[list, list, list]:
        """(classes, splits, meta dicts) of a batch's files."""
        return ([self.classes.get(n, str(int(lab))) for n, lab in zip(names, labels)],
                [self.splits.get(n, self.default_split) for n in names],
                [self.meta.get(n, {}) for n in names])


def score_datasets(opts: ScoreOptions) -> dict[str, Path]:
    """Score every image of `opts.data`; write one sheet per method + all_scores.xlsx.

    Every method comes from ONE forward pass of E, G (and D when a method needs features) per
    batch; only the scores (and the k worst images for heatmaps) are kept.
    """
    from anomaly.methods import detector as det

    specs = registry.parse_list(opts.methods)
    methods = [s.name for s in specs]
    model = AnoModel.open(network=opts.network, encoder=opts.encoder, detector=opts.detector,
                          device=opts.device, kappa=opts.kappa,
                          allow_mismatch=opts.allow_mismatch,
                          feature_layer=opts.feature_layer,
                          require_D=any(s.system == "classic" and s.needs_features
                                        for s in specs))
    for path in opts.data:
        det.check_data_policy(model, path)
    detector = model.detector  # kappa and layer: the options', else detector.json's
    scorer = det.sheet_scorer(model, methods, tta=opts.tta, detector=detector, train=opts.train)
    names = [det.config_name(m, opts.tta) for m in methods]
    datasets = [_open_dataset(path) for path in opts.data]
    table = ScoreTable(names + ([det.DETECTOR_SHEET] if detector else []))
    worst = _WorstImages(opts.num_heatmaps if opts.heatmaps else 0)
    total = sum(len(ds) for ds, _rows in datasets)
    start = time.time()
    with progress(total=total, unit="img", desc="score") as bar:
        for dataset, rows in datasets:
            for images, labels, files in iterate_batches(dataset, opts.batch):
                per = scorer.score_batch(images)
                scores = {n: per[n] for n in names}
                if detector is not None:
                    scores[det.DETECTOR_SHEET] = detector.combine(per)
                classes, splits, meta = rows.describe(files, labels.tolist())
                table.add(scores, files=files, splits=splits, labels=labels.tolist(),
                          classes=classes, meta=meta)
                if scorer.last_forward is not None:
                    first = scores.get(det.config_name("izif", opts.tta), next(iter(scores.values())))
                    worst.offer(first, files, splits, images, scorer.last_forward,
                                titles=[m.get("image") or n for m, n in zip(meta, files)])
                bar.update(len(files))
    written = _write_outputs(opts, table, model, time.time() - start,
                             detector=None if detector is None else detector.detector.method)
    if opts.heatmaps:
        written.update(worst.save(Path(opts.heatmaps), model))
    return written


def _open_dataset(path: str) -> tuple[ImageDataset, _Rows]:
    if not Path(path).exists():
        raise UserError(f"--data {path} does not exist; give a val.zip or test.zip written by "
                        f"`anostyle prepare`.")
    dataset = ImageDataset(path)
    split = split_of_zip(path)
    prepared = PreparedDataset.find(path)  # None: a dataset not made by `anostyle prepare`
    if prepared is None:
        return dataset, _Rows(classes={}, splits={}, default_split=split)
    rows = prepared.rows(split)
    return dataset, _Rows(classes=dict(zip(rows["file"], rows["class"])),
                          splits=dict(zip(rows["file"], rows["split"])), default_split=split,
                          meta=prepared.descriptions(split))


def _write_outputs(opts: ScoreOptions, table: ScoreTable, model: AnoModel,
                   seconds: float, *, detector: str | None = None) -> dict[str, Path]:
    """The sheets, all_scores.xlsx and score.json; none of them when a score is not finite."""
    from anomaly.methods.detector_scores import refuse_non_finite

    frames = table.frames()
    refuse_non_finite({m: df["score"].to_numpy() for m, df in frames.items()},
                      command="score", outputs="sheet")
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = {m: write_score_sheet(df, outdir / f"{method_filename(m)}.xlsx")
               for m, df in frames.items()}
    written["all"] = write_all_scores(frames, outdir / "all_scores.xlsx")
    prepared = {str(Path(p).resolve().parent) for p in opts.data}
    atomic_write_json(outdir / "score.json", {
        "options": config_dict(opts), "kappa": model.kappa, "feature_layer": model.feature_layer,
        "prepared": prepared.pop() if len(prepared) == 1 else None,
        "tta": opts.tta, "detector": None if detector is None else
        {"file": opts.detector, "method": detector, "sheet": "detector.xlsx"},
        "images": len(table), "seconds": round(seconds, 2),
        "images_per_second": round(len(table) / max(seconds, 1e-9), 2)})
    written["config"] = outdir / "score.json"
    return written


@dataclass(order=True)
class _Entry:
    score: float
    name: str = field(compare=False)  # the original image name where known (else the file)
    image: np.ndarray = field(compare=False)  # uint8 [H, W, C]
    rec: np.ndarray = field(compare=False)  # uint8 [H, W, C]
    x: torch.Tensor = field(compare=False)  # [C, H, W] in [-1, 1]
    x_rec: torch.Tensor = field(compare=False)
    feat: torch.Tensor | None = field(compare=False)
    feat_rec: torch.Tensor | None = field(compare=False)


class _WorstImages:
    """Keeps the `k` highest-scoring test images of the stream (a min-heap; O(k) memory)."""

    def __init__(self, k: int):
        self.k, self.heap = k, []

    def offer(self, scores, names, splits, images_u8, out: Forward, *, titles) -> None:
        if self.k == 0:
            return
        values = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores)
        rgb = images_u8.permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
        rec = to_uint8(out.rec)
        for i, (value, title, split) in enumerate(zip(values.tolist(), titles, splits)):
            if split != "test" or (len(self.heap) == self.k and value <= self.heap[0].score):
                continue
            feats = [None if f is None else f[i].cpu() for f in (out.feat, out.feat_rec)]
            entry = _Entry(value, title, rgb[i], rec[i], out.x[i].cpu(), out.rec[i].cpu(),
                           *feats)
            (heapq.heapreplace if len(self.heap) == self.k else heapq.heappush)(self.heap, entry)

    def save(self, folder: Path, model: AnoModel) -> dict[str, Path]:
        from anomaly.methods.heatmap import (residual_map, save_heatmap_panel,
                                             upsample_feature_residual)

        written = {}
        for rank, e in enumerate(sorted(self.heap, reverse=True), start=1):
            stem = f"{rank:02d}_{_safe_stem(e.name)}"
            path = folder / f"{stem}_image_residual.png"
            save_heatmap_panel(path, _squeeze(e.image), _squeeze(e.rec),
                               residual_map(e.x, e.x_rec),
                               f"#{rank} {e.name}: score {e.score:.4g} (image residual)")
            written[path.name] = path
            if e.feat is not None and e.feat.ndim == 3:
                path = folder / f"{stem}_feature_residual.png"
                heat = upsample_feature_residual(e.feat, e.feat_rec, e.image.shape[0])
                save_heatmap_panel(path, _squeeze(e.image), _squeeze(e.rec), heat,
                                   f"#{rank} {e.name}: D features {model.feature_layer}")
                written[path.name] = path
        return written


def _safe_stem(name: str) -> str:
    """A file-name-safe stem of an image name (its last path part, odd characters as '_')."""
    stem = PurePosixPath(name.replace("\\", "/")).stem or "image"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def _squeeze(image_hwc: np.ndarray) -> np.ndarray:
    return image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc


# ----------------------------------------------------------------------------------------------
# `anostyle tsne`


@dataclass(frozen=True)
class TsneOptions:
    """Options of `anostyle tsne`. Saved as tsne.json beside the plot."""

    network: str
    encoder: str
    data: tuple[str, ...]
    outdir: str
    perplexity: float = 30.0
    seed: int = 0
    batch: int = 64
    max_images: int | None = None  # subsample (evenly) above this many images
    device: str = "auto"
    allow_mismatch: bool = False  # accept an encoder trained for another network (noted)


def tsne_latents(opts: TsneOptions) -> dict[str, Path]:
    """Encode every image, embed the codes with t-SNE, write tsne.png, tsne.xlsx, tsne.json."""
    from anomaly.evaluation.tsne import plot_tsne, tsne_embedding, write_tsne_sheet

    model = AnoModel.load(opts.network, opts.encoder, device=opts.device, require_D=False,
                          allow_mismatch=opts.allow_mismatch)
    codes, files, classes, splits = [], [], [], []
    for dataset, rows in (_open_dataset(p) for p in opts.data):
        for ws, labels, names in _encode_all(model, dataset, opts.batch):
            codes.append(ws.reshape(len(ws), -1).cpu().numpy())  # [N, K*D]
            files += names
            batch_classes, batch_splits, _meta = rows.describe(names, labels)
            classes += batch_classes
            splits += batch_splits
    latents = np.concatenate(codes)
    keep = _subsample(len(latents), opts.max_images)
    coords = tsne_embedding(latents[keep], perplexity=opts.perplexity, seed=opts.seed)
    pick = [int(i) for i in keep]
    outdir = Path(opts.outdir)
    png = outdir / "tsne.png"
    plot_tsne(coords, [classes[i] for i in pick], png,
              f"t-SNE of encoder latents ({len(pick)} images, perplexity {opts.perplexity:g})")
    sheet = write_tsne_sheet(coords, [files[i] for i in pick], [classes[i] for i in pick],
                             [splits[i] for i in pick], outdir / "tsne.xlsx")
    atomic_write_json(outdir / "tsne.json", config_dict(opts))
    return {"plot": png, "sheet": sheet, "config": outdir / "tsne.json"}


@torch.no_grad()
def _encode_all(model: AnoModel, dataset: ImageDataset,
                batch: int) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    for images, labels, names in progress(iterate_batches(dataset, batch), desc="encode",
                                      total=-(-len(dataset) // batch)):
        yield model.encode(from_uint8(images.to(model.device))), labels.tolist(), names


def _subsample(n: int, limit: int | None) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)
