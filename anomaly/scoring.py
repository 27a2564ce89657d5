"""`anostyle score` and `anostyle tsne`: run images through encoder, generator and discriminator
in batches and turn them into score sheets, residual heatmaps and a latent t-SNE.

Memory does not grow with the number of images: each batch is scored and dropped; only the
scores (and, for t-SNE, the latent codes) are kept. The izif score uses the kappa and the
discriminator feature layer the encoder was trained with, unless the user overrides them.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from anomaly.encoder_io import check_compatible, load_encoder, load_frozen_networks, resolve_device
from anomaly.reconstruct import check_feature_layer, discriminator_features, reconstruct_batch
from anomaly.scores import (METHODS, ScoreTable, izif_score, latent_distance, method_filename,
                            parse_methods, sklearn_distance, torch_euclidean)
from anomaly.sheets import config_dict, write_all_scores, write_score_sheet
from stylegan.dataset import ImageDataset, iterate_batches, read_manifest
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json
from stylegan.imageutil import from_uint8, to_uint8


@dataclass(frozen=True)
class ScoreOptions:
    """Options of `anostyle score`. Saved as score.json beside the sheets."""

    network: str
    encoder: str
    data: tuple[str, ...]
    outdir: str
    methods: str = "izif,sklearn:euclidean,sklearn:manhattan,sklearn:cosine,torch-euclidean,latent"
    kappa: float | None = None  # None: the kappa the encoder was trained with
    feature_layer: str | None = None  # None: the encoder's training feature layer
    batch: int = 64
    heatmaps: str | None = None  # folder for residual heatmaps of the most anomalous test images
    num_heatmaps: int = 8
    device: str = "auto"


@dataclass
class _Networks:
    G: torch.nn.Module
    D: torch.nn.Module | None
    E: torch.nn.Module
    kappa: float
    feature_layer: str
    device: torch.device


@dataclass(frozen=True)
class _Rows:
    """Per-file descriptions of one dataset: class name and split, from manifest.csv."""

    classes: dict[str, str]
    splits: dict[str, str]
    default_split: str


def score_datasets(opts: ScoreOptions) -> dict[str, Path]:
    """Score every image of `opts.data`; write one sheet per method + all_scores.xlsx."""
    methods = parse_methods(opts.methods)
    nets = _load(opts.network, opts.encoder, device=opts.device, need_D=_needs_features(methods),
                 kappa=opts.kappa, feature_layer=opts.feature_layer)
    datasets = [_open_dataset(path) for path in opts.data]
    table = ScoreTable(methods)
    worst = _WorstImages(opts.num_heatmaps if opts.heatmaps else 0)
    total = sum(len(ds) for ds, _rows in datasets)
    start = time.time()
    with tqdm(total=total, unit="img", desc="score", disable=None) as bar:
        for dataset, rows in datasets:
            for images, labels, names in iterate_batches(dataset, opts.batch):
                scores, extras = _score_batch(nets, images, methods)
                splits = [rows.splits.get(n, rows.default_split) for n in names]
                table.add(scores, files=names, splits=splits, labels=labels.tolist(),
                          classes=[rows.classes.get(n, str(int(lab))) for n, lab in
                                   zip(names, labels.tolist())])
                worst.offer(scores.get("izif", scores[methods[0]]), names, splits, images,
                            extras)
                bar.update(len(names))
    written = _write_outputs(opts, table, nets, time.time() - start)
    if opts.heatmaps:
        written.update(worst.save(Path(opts.heatmaps), nets))
    return written


def _needs_features(methods: list[str]) -> bool:
    return any(METHODS[m].needs_features for m in methods)


@torch.no_grad()
def _score_batch(nets: _Networks, images_u8: torch.Tensor, methods: list[str]):
    x = from_uint8(images_u8.to(nets.device))  # [N, C, H, W]
    ws, rec = reconstruct_batch(nets.G, nets.E, x)  # [N, K, D], [N, C, H, W]
    feat = feat_rec = None
    if _needs_features(methods):
        feat = discriminator_features(nets.D, x, nets.feature_layer)
        feat_rec = discriminator_features(nets.D, rec, nets.feature_layer)
    scores: dict[str, torch.Tensor | np.ndarray] = {}
    for method in methods:
        if method == "izif":
            scores[method] = izif_score(x, rec, feat, feat_rec, kappa=nets.kappa)
        elif method.startswith("sklearn:"):
            scores[method] = sklearn_distance(x.cpu(), rec.cpu(), method.split(":", 1)[1])
        elif method == "torch-euclidean":
            scores[method] = torch_euclidean(x, rec)
        elif method == "latent":
            scores[method] = latent_distance(ws, nets.G.mapping.w_avg)
        else:  # parse_methods accepted it, so a new method lacks its line here
            raise AssertionError(f"no scoring rule for {method}")
    return scores, {"x": x, "rec": rec, "feat": feat, "feat_rec": feat_rec}


def _load(network: str, encoder: str, *, device: str, need_D: bool, kappa: float | None,
          feature_layer: str | None) -> _Networks:
    dev = resolve_device(device)
    G, D = load_frozen_networks(network, device=dev, need_D=need_D)
    E, extra = load_encoder(encoder, device=dev)
    check_compatible(E, G, encoder_path=encoder, network_path=network)
    trained = extra.get("training_options", {})
    kappa = float(trained.get("kappa", 1.0)) if kappa is None else kappa
    layer = feature_layer or trained.get("feature_layer", "b8")
    if D is not None:
        check_feature_layer(D, layer)
    return _Networks(G=G, D=D, E=E, kappa=kappa, feature_layer=layer, device=dev)


def _open_dataset(path: str) -> tuple[ImageDataset, _Rows]:
    if not Path(path).exists():
        raise UserError(f"--data {path} does not exist; give a val.zip or test.zip written by "
                        f"`anostyle prepare`.")
    dataset = ImageDataset(path)
    split = Path(path).stem if Path(path).stem in ("train", "val", "test") else "test"
    try:
        manifest = [r for r in read_manifest(path) if r["split"] == split]
    except UserError:  # a dataset not made by `anostyle prepare`: labels only
        manifest = []
    return dataset, _Rows(classes={r["file"]: r["class"] for r in manifest},
                          splits={r["file"]: r["split"] for r in manifest}, default_split=split)


def _write_outputs(opts: ScoreOptions, table: ScoreTable, nets: _Networks,
                   seconds: float) -> dict[str, Path]:
    outdir = Path(opts.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    frames = table.frames()
    written = {m: write_score_sheet(df, outdir / f"{method_filename(m)}.xlsx")
               for m, df in frames.items()}
    written["all"] = write_all_scores(frames, outdir / "all_scores.xlsx")
    prepared = {str(Path(p).resolve().parent) for p in opts.data}
    atomic_write_json(outdir / "score.json", {
        "options": config_dict(opts), "kappa": nets.kappa, "feature_layer": nets.feature_layer,
        "prepared": prepared.pop() if len(prepared) == 1 else None,
        "images": len(table), "seconds": round(seconds, 2),
        "images_per_second": round(len(table) / max(seconds, 1e-9), 2)})
    written["config"] = outdir / "score.json"
    return written


@dataclass(order=True)
class _Entry:
    score: float
    name: str = field(compare=False)
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

    def offer(self, scores, names, splits, images_u8, extras) -> None:
        if self.k == 0:
            return
        values = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores)
        rgb = images_u8.permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
        rec = to_uint8(extras["rec"])
        for i, (value, name, split) in enumerate(zip(values.tolist(), names, splits)):
            if split != "test" or (len(self.heap) == self.k and value <= self.heap[0].score):
                continue
            feats = [None if extras[k] is None else extras[k][i].cpu() for k in
                     ("feat", "feat_rec")]
            entry = _Entry(value, name, rgb[i], rec[i], extras["x"][i].cpu(),
                           extras["rec"][i].cpu(), *feats)
            (heapq.heapreplace if len(self.heap) == self.k else heapq.heappush)(self.heap, entry)

    def save(self, folder: Path, nets: _Networks) -> dict[str, Path]:
        from anomaly.heatmap import residual_map, save_heatmap_panel, upsample_feature_residual

        written = {}
        for rank, e in enumerate(sorted(self.heap, reverse=True), start=1):
            stem = f"{rank:02d}_{Path(e.name).stem}"
            path = folder / f"{stem}_image_residual.png"
            save_heatmap_panel(path, _squeeze(e.image), _squeeze(e.rec),
                               residual_map(e.x, e.x_rec),
                               f"#{rank} {e.name}: score {e.score:.4g} (image residual)")
            written[path.name] = path
            if e.feat is not None and e.feat.ndim == 3:
                path = folder / f"{stem}_feature_residual.png"
                heat = upsample_feature_residual(e.feat, e.feat_rec, e.image.shape[0])
                save_heatmap_panel(path, _squeeze(e.image), _squeeze(e.rec), heat,
                                   f"#{rank} {e.name}: D features {nets.feature_layer}")
                written[path.name] = path
        return written


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


def tsne_latents(opts: TsneOptions) -> dict[str, Path]:
    """Encode every image, embed the codes with t-SNE, write tsne.png, tsne.xlsx, tsne.json."""
    from anomaly.tsne import plot_tsne, tsne_embedding, write_tsne_sheet

    nets = _load(opts.network, opts.encoder, device=opts.device, need_D=False, kappa=0.0,
                 feature_layer=None)
    codes, files, classes, splits = [], [], [], []
    for dataset, rows in (_open_dataset(p) for p in opts.data):
        for ws, labels, names in _encode_all(nets, dataset, opts.batch):
            codes.append(ws.reshape(len(ws), -1).cpu().numpy())  # [N, K*D]
            files += names
            classes += [rows.classes.get(n, str(int(lab))) for n, lab in zip(names, labels)]
            splits += [rows.splits.get(n, rows.default_split) for n in names]
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
def _encode_all(nets: _Networks, dataset: ImageDataset,
                batch: int) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    for images, labels, names in tqdm(iterate_batches(dataset, batch), desc="encode",
                                      total=-(-len(dataset) // batch), disable=None):
        yield nets.E(from_uint8(images.to(nets.device))), labels.tolist(), names


def _subsample(n: int, limit: int | None) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)
