"""Iterative latent projection (Schlegl et al. 2017, "Unsupervised Anomaly Detection with Generative
Adversarial Networks to Guide Marker Discovery" (AnoGAN), Sec. 2.2, eq. 3-5; here in StyleGAN2's
W+ space): for each image x, minimise over ws

    L(ws) = 1/n * ||x - G(ws)||^2 + kappa * 1/n_d * ||f(x) - f(G(ws))||^2

with Adam for a fixed number of steps, starting from the encoder's code E(x) (when given) or from
the generator's w_avg. Much slower than the encoder (one optimisation per image) but a sharper
reference. `anostyle project` writes the projected images under their source names plus
`projection.csv` with the loss of each image before and after.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors, D w_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from anodata.reader import iterate_source, list_source
from anomaly.model.ano_model import AnoModel, discriminator_features, encode
from anomaly.model.reconstruct import output_paths, write_csv
from anomaly.methods.scores import izif_combine, izif_terms
from stylegan.errors import UserError
from stylegan.imageutil import from_uint8, save_image, to_uint8
from stylegan.progress import progress


@dataclass(frozen=True)
class ProjectOptions:
    """Options of `anostyle project`."""

    network: str
    source: str
    outdir: str
    steps: int = 300
    encoder: str | None = None  # start from E(x); None: start from w_avg
    lr: float = 0.01
    kappa: float = 1.0
    feature_layer: str = "b8"
    batch: int = 16
    device: str = "auto"
    allow_mismatch: bool = False  # accept an encoder trained for another network (noted)


@dataclass(frozen=True)
class ProjectSummary:
    """What `project_folder` wrote."""

    outdir: Path
    written: int
    skipped: tuple[tuple[str, str], ...]  # (source name, reason)
    mean_loss: float  # mean final loss over images
    mean_initial_loss: float  # mean loss at the starting codes
    csv: Path


def projection_losses(G: torch.nn.Module, D: torch.nn.Module | None, ws: torch.Tensor,
                      x: torch.Tensor, feat: torch.Tensor | None, *, kappa: float,
                      feature_layer: str) -> dict[str, torch.Tensor]:
    """Per-image losses [N] of codes ws [N, K, D] against images x [N, C, H, W] (feat = f(x))."""
    rec = G.synthesis(ws, noise_mode="const")  # [N, C, H, W]
    feat_rec = discriminator_features(D, rec, feature_layer) if kappa > 0 else None
    image, feature = izif_terms(x, rec, feat if kappa > 0 else None, feat_rec)  # [N] each
    return {"loss": izif_combine(image, feature, kappa), "image": image, "feature": feature,
            "rec": rec}


def project_batch(G: torch.nn.Module, D: torch.nn.Module | None, x: torch.Tensor,
                  ws_init: torch.Tensor, *, steps: int, lr: float = 0.01, kappa: float = 1.0,
                  feature_layer: str = "b8", progress: tqdm | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Optimise ws (from ws_init [N, K, D]) for images x [N, C, H, W] in [-1, 1] with Adam.

    Returns the final ws [N, K, D] and the final per-image losses {'loss', 'image', 'feature'}
    [N] plus 'rec' [N, C, H, W]. Each image's loss only depends on its own code (with a 'b{res}'
    feature layer), so the images of a batch do not influence each other.
    """
    assert x.ndim == 4 and ws_init.ndim == 3 and ws_init.shape[0] == x.shape[0], \
        (x.shape, ws_init.shape)
    assert kappa == 0 or D is not None, "the feature term needs a discriminator"
    feat = None
    if kappa > 0:
        with torch.no_grad():
            feat = discriminator_features(D, x, feature_layer)
    ws = ws_init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([ws], lr=lr, betas=(0.9, 0.999))
    for step in range(steps):
        losses = projection_losses(G, D, ws, x, feat, kappa=kappa, feature_layer=feature_layer)
        opt.zero_grad(set_to_none=True)
        losses["loss"].sum().backward()  # sum: each image's gradient is its own loss's
        opt.step()
        if progress is not None and step % 10 == 0:
            progress.set_postfix(step=step, loss=f"{float(losses['loss'].detach().mean()):.4g}")
    with torch.no_grad():
        final = projection_losses(G, D, ws, x, feat, kappa=kappa, feature_layer=feature_layer)
    return ws.detach(), final


def project_folder(opts: ProjectOptions) -> ProjectSummary:
    """Project every image of `opts.source`; write the images (as PNG) and projection.csv."""
    _validate(opts)
    source = list_source(opts.source)
    model = AnoModel.load(opts.network, opts.encoder, device=opts.device, kappa=opts.kappa,
                          allow_mismatch=opts.allow_mismatch,
                          feature_layer=opts.feature_layer, require_D=opts.kappa > 0)
    G, D, E = model.G, model.D, model.E
    outdir = Path(opts.outdir)
    paths = output_paths(outdir, source.names)
    skipped: list[tuple[str, str]] = []
    rows = []
    batches = iterate_source(source, policy=model.policy, batch=opts.batch, skipped=skipped)
    with progress(total=len(source.names), desc="project", unit="img") as bar:
        for images, names in batches:
            rows += _project_and_write(opts, G, D, E, images.to(model.device), names, paths, outdir,
                                      bar)
            bar.update(len(names))
    if not rows:
        raise UserError(f"--source {opts.source} holds no readable image "
                        f"({skipped[0][0]}: {skipped[0][1]}); check the files.")
    header = ["file", "output", "loss", "image_loss", "feature_loss", "initial_loss"]
    csv_path = write_csv(outdir / "projection.csv", header, rows)
    return ProjectSummary(outdir, len(rows), tuple(skipped),
                          sum(r[2] for r in rows) / len(rows), sum(r[5] for r in rows) / len(rows),
                          csv_path)


def _validate(opts: ProjectOptions) -> None:
    checks = [(opts.steps >= 0, "--steps must not be negative"),
              (opts.lr > 0, "--lr must be positive"),
              (opts.kappa >= 0, "--kappa must not be negative"),
              (opts.batch >= 1, "--batch must be at least 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")


def _project_and_write(opts: ProjectOptions, G, D, E, images: torch.Tensor, names: list[str],
                       paths: dict[str, Path], outdir: Path, bar: tqdm) -> list[tuple]:
    x = from_uint8(images)  # [N, C, H, W]
    with torch.no_grad():
        if E is not None:
            ws_init = encode(E, x)  # [N, K, D]
        else:
            ws_init = G.mapping.w_avg.expand(len(x), G.num_ws, -1)  # [N, K, D]
        feat = discriminator_features(D, x, opts.feature_layer) if opts.kappa > 0 else None
        initial = projection_losses(G, D, ws_init, x, feat, kappa=opts.kappa,
                                    feature_layer=opts.feature_layer)["loss"]
    _ws, final = project_batch(G, D, x, ws_init, steps=opts.steps, lr=opts.lr, kappa=opts.kappa,
                               feature_layer=opts.feature_layer, progress=bar)
    rec_u8 = to_uint8(final["rec"])  # [N, H, W, C]
    rows = []
    for i, name in enumerate(names):
        save_image(rec_u8[i], paths[name])
        rows.append((name, paths[name].relative_to(outdir.resolve()).as_posix(),
                     float(final["loss"][i]), float(final["image"][i]),
                     float(final["feature"][i]), float(initial[i])))
    return rows
