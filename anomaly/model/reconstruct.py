"""`anostyle reconstruct`: a folder or zip -> reconstructed PNGs G(E(x)), same names (Schlegl et
al. 2019, f-AnoGAN, Sec. 2.2: the izif mapping whose residual is the anomaly evidence; the pass
itself is anomaly.model.ano_model.reconstruct_batch), their residual pictures and the safe output
names.

Inputs may be a prepared zip/folder or a plain folder (or zip) of images of any size: every
image is read by anodata.reader and fitted by the model's recorded preprocessing policy, the way
`anostyle prepare` fitted the training data. Reconstructions of a prepared split zip are named
after their original images (manifest.csv), e.g. ISIC_0024307.png.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors, D w_dim.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from anodata.reader import SourceImages, iterate_source, list_source
from anomaly.model.ano_model import AnoModel
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_bytes
from stylegan.imageutil import from_uint8, save_image, to_uint8
from stylegan.progress import progress


# ----------------------------------------------------------------------------------------------
# Output names

def output_name(name: str) -> PurePosixPath:
    """Relative output name for source file `name`: same folders and stem, `.png`.

    Parts that could leave the output folder ('..', '.', empty, drive letters) are dropped, so a
    crafted zip entry like '../../x.jpg' is written as 'x.png' inside the output folder.
    """
    parts = [p for p in name.replace("\\", "/").split("/")
             if p not in ("", ".", "..") and not p.endswith(":")]
    if not parts:
        raise UserError(f"source file name {name!r} has no usable file name; rename it.")
    return PurePosixPath(*parts).with_suffix(".png")


def output_paths(outdir: Path, names: tuple[str, ...], *,
                 renamed: dict[str, str] | None = None) -> dict[str, Path]:
    """Source name -> output path inside `outdir` (`renamed[name]` where given, else the source's
    own name as PNG); two sources writing one file is a UserError."""
    root = outdir.resolve()
    paths: dict[str, Path] = {}
    taken: dict[Path, str] = {}
    for name in names:
        path = (root / output_name((renamed or {}).get(name, name))).resolve()
        if root not in path.parents:
            raise UserError(f"source file {name!r} would be written outside {outdir}; rename it.")
        if path in taken:
            raise UserError(f"source files {taken[path]!r} and {name!r} would both be written as "
                            f"{path.relative_to(root)}; rename one of them.")
        taken[path] = name
        paths[name] = path
    return paths


RESIDUAL_VMAX = 0.5  # mean |x - G(E(x))| (in [-1, 1] units) shown at the top of the colour map


def residual_images(x: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Heat-coloured residual maps mean_c |x - rec|: uint8 [N, H, W, 3] ('inferno').

    Fixed scale, so that images stay comparable: 0 -> black, RESIDUAL_VMAX or more -> the
    colour map's top (pale yellow).
    """
    from anomaly.methods.heatmap import overlay, residual_map  # matplotlib: only when asked for

    blank = np.zeros((x.shape[2], x.shape[3], 3), dtype=np.uint8)
    return np.stack([overlay(blank, residual_map(x[i], rec[i]), alpha=1.0, vmin=0.0,
                             vmax=RESIDUAL_VMAX) for i in range(len(x))])  # [N, H, W, 3]


# ----------------------------------------------------------------------------------------------
# `anostyle reconstruct`


@dataclass(frozen=True)
class ReconstructOptions:
    """Options of `anostyle reconstruct`."""

    network: str
    encoder: str
    source: str
    outdir: str
    residual: bool = False  # also write <name>_residual.png (see residual_images)
    batch: int = 16
    device: str = "auto"
    allow_mismatch: bool = False  # accept an encoder trained for another network (noted)


@dataclass(frozen=True)
class ReconstructSummary:
    """What `reconstruct_folder` wrote."""

    outdir: Path
    written: int
    skipped: tuple[tuple[str, str], ...]  # (source name, reason)
    mean_mse: float  # mean over images of the pixel MSE in [-1, 1] units
    csv: Path


def reconstruct_folder(opts: ReconstructOptions) -> ReconstructSummary:
    """Write G(E(x)) for every image of `opts.source` as PNG in outdir: under its original name
    when the source is a prepared zip (manifest.csv beside it), else under its own name."""
    assert opts.batch >= 1, opts.batch
    source = list_source(opts.source)
    model = AnoModel.load(opts.network, opts.encoder, device=opts.device, require_D=False,
                          allow_mismatch=opts.allow_mismatch)
    outdir = Path(opts.outdir)
    paths = output_paths(outdir, source.names, renamed=original_names(source))
    skipped: list[tuple[str, str]] = []
    rows, non_finite = [], 0
    batches = iterate_source(source, policy=model.policy, batch=opts.batch, skipped=skipped)
    with progress(total=len(source.names), desc="reconstruct", unit="img") as bar:
        for images, names in batches:
            x = from_uint8(images.to(model.device))  # [N, C, H, W]
            with torch.no_grad():
                _ws, rec = model.reconstruct(x)
            finite = torch.isfinite(rec.flatten(1)).all(dim=1).tolist()  # [N]
            non_finite += finite.count(False)
            keep = [i for i, ok in enumerate(finite) if ok]  # no picture of what overflowed
            mse = (x - rec).square().flatten(1).mean(dim=1).tolist()  # [N]
            if keep:
                _write_batch(rec[keep], x[keep], [paths[names[i]] for i in keep],
                             residual=opts.residual)
            rows += [(n, paths[n].relative_to(outdir.resolve()).as_posix(), m)
                     for n, m in zip(names, mse)]
            bar.update(len(names))
    if not rows:
        raise UserError(f"--source {opts.source} holds no readable image "
                        f"({skipped[0][0]}: {skipped[0][1]}); check the files.")
    if non_finite:
        raise UserError(f"{non_finite} of {len(rows)} images got a non-finite reconstruction "
                        f"(NaN or infinity), so reconstruct wrote no reconstruction.csv and no "
                        f"picture of them; the network or encoder weights overflow or are "
                        f"damaged: check or replace those files.")
    csv_path = write_csv(outdir / "reconstruction.csv", ["file", "output", "mse"], rows)
    return ReconstructSummary(outdir, len(rows), tuple(skipped),
                              float(np.mean([r[2] for r in rows])), csv_path)


def original_names(source: SourceImages) -> dict[str, str]:
    """For a prepared split zip (`<dest>/{train,val,test}.zip` with manifest.csv beside it):
    zip name -> '<original stem>.png' (e.g. ISIC_0024307.png). Two sources with one stem get
    '_2', '_3', ... in the zip's (sorted) order. Empty for any other source."""
    from anodata.prepared import PreparedDataset, original_name

    split = source.path.stem
    if not source.is_zip or split not in ("train", "val", "test"):
        return {}
    try:
        prepared = PreparedDataset.find(source.path)
    except UserError:
        return {}
    if prepared is None:
        return {}
    rows = prepared.rows(split)
    sources = dict(zip(rows["file"], rows["source"])) if "source" in rows else {}
    out: dict[str, str] = {}
    taken: set[str] = set()  # lower case: one file on case-insensitive file systems too
    for name in source.names:
        stem = original_name(sources[name]) if name in sources else ""
        if not stem:
            continue
        candidate, k = f"{stem}.png", 1
        while candidate.lower() in taken:
            k += 1
            candidate = f"{stem}_{k}.png"
        taken.add(candidate.lower())
        out[name] = candidate
    return out


def _write_batch(rec: torch.Tensor, x: torch.Tensor, paths: list[Path], *,
                 residual: bool) -> None:
    rec_u8 = to_uint8(rec)  # [N, H, W, C]
    heat = residual_images(x, rec) if residual else None  # [N, H, W, 3]
    for i, path in enumerate(paths):
        save_image(rec_u8[i], path)
        if heat is not None:
            save_image(heat[i], path.with_name(f"{path.stem}_residual.png"))


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    """Write a small CSV atomically; text cells starting with = + - @ get a leading ' so that
    spreadsheets show them as text, never as formulas."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_safe_cell(v) for v in row])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def _safe_cell(value):
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
