"""izif encoder training (Schlegl et al. 2019, "f-AnoGAN: Fast unsupervised anomaly detection with
generative adversarial networks", Medical Image Analysis 54, Sec. 2.2.3, eq. 7):

    L_izif(x) = 1/n   * ||x - G(E(x))||^2  +  kappa * 1/n_d * ||f(x) - f(G(E(x)))||^2
              (+ w_reg * ||E(x) - w_avg||^2 / (n_w * s^2), an optional pull towards W; s^2 is
                the mean squared spread of mapped latents around w_avg)

G (G_ema when the file has it) and D stay frozen; only the encoder E learns, with Adam, on the
normal training images only. f is D's activation at `feature_layer`. Snapshots are a pair
`encoder-<iter>.state.pt` (written first) + `encoder-<iter>.safetensors`, both atomic, so a crash
never leaves a newest checkpoint without its state; `--resume` continues the iteration count.

With `--val val.zip`, every checkpoint is also scored on a fixed, seeded subset of at most
`val_images` NORMAL images of the validation split (label 0; anomalies are never looked at):
the same izif loss, without gradients. validation.json keeps that loss per checkpoint and names
the best (lowest; the earliest on ties): the checkpoint to use is chosen on held-out naevi, not
by the training loss, which keeps falling as the encoder learns its training images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from anodata.policy import POLICY_KEY, Preprocessing, read_prepared_policy
from anomaly.model.encoder import LATENTS, Encoder, EncoderConfig
from anomaly.model.encoder_io import (ENCODER_PREFIX, VALIDATION_FILE, check_compatible,
                                      encoder_checkpoints, find_latest_encoder, load_encoder,
                                      save_encoder, state_path)
from anomaly.model.ano_model import AnoModel, discriminator_features, reconstruct_batch
from anomaly.methods.scores import izif_combine, izif_terms
from stylegan.augment import AugmentConfig, AugmentPipe
from stylegan.checkpoint import (load_training_state, restore_rng_state, rng_state,
                                 save_training_state)
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.fileio import atomic_path, atomic_write_json, path_from
from stylegan.imageutil import from_uint8, save_grid, to_uint8
from stylegan.progress import progress
from stylegan.runtime import EndlessSampler, RunLog, cuda_backend_settings

DEFAULT_KIMG = 200.0


@dataclass(frozen=True)
class FitOptions:
    """Options of one encoder training run (`anostyle train-encoder`). Saved as
    encoder_options.json."""

    network: str
    data: str
    outdir: str
    kimg: float | None = None  # training length in thousands of images (default DEFAULT_KIMG)
    iters: int | None = None  # or in iterations; give at most one of kimg / iters
    batch: int = 16
    lr: float = 1e-3  # equalized-lr layers: StyleGAN-like rates (G/D use 2.5e-3)
    kappa: float = 1.0  # weight of the discriminator-feature term
    latent: str | None = None  # 'wplus' | 'w'; None: 'wplus', or the resumed encoder's
    feature_layer: str = "b8"
    w_reg: float = 0.0  # weight of the pull towards the W distribution
    # iterations between checkpoints (and reconstruction grids); 0: end only; None: a sixth of
    # the run (at most 1000), so that even a short run leaves checkpoints for --val to choose from
    snap: int | None = None
    tick: int = 100  # iterations between lines in stats.jsonl / log.txt
    resume: str | None = None  # 'latest' or an encoder .safetensors
    # an encoder .safetensors whose weights start a NEW run (warm start: iteration 0, fresh
    # optimizer); e.g. a parent model's encoder adapted to a new collection
    init: str | None = None
    max_minutes: float | None = None  # stop (with a final checkpoint) after this wall time
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    cbase: int | None = None  # encoder capacity; None: the discriminator's (or the resumed one's)
    cmax: int | None = None
    grid_size: int = 8  # training images shown in rec<iter>.png
    mirror: bool = False  # train on x-flipped copies too
    rot90: bool = False  # and on copies rotated by 90/180/270 degrees
    # probability that a training image is rescaled about its centre by 2^N(0, 0.2^2) (ADA's
    # isotropic scale op, reflection at the edges): an encoder for images framed more tightly or
    # loosely than its training data; 0: off
    scale_aug: float = 0.0
    val: str | None = None  # val.zip: the checkpoint is chosen on its normals' izif loss
    val_images: int = 256  # seeded subset of the validation normals scored per checkpoint

    def snap_iters(self) -> int:
        """Iterations between checkpoints (`snap`, or a sixth of the run, at most 1000)."""
        if self.snap is not None:
            return self.snap
        return max(1, min(1000, self.total_iters() // 6))

    def total_iters(self) -> int:
        """The iteration at which training stops."""
        if self.iters is not None:
            return self.iters
        kimg = DEFAULT_KIMG if self.kimg is None else self.kimg
        return max(math.ceil(kimg * 1000 / self.batch), 1)


@dataclass
class _Run:
    """Everything the loop reads and changes."""

    opts: FitOptions
    device: torch.device
    G: torch.nn.Module
    D: torch.nn.Module | None
    E: Encoder
    opt: torch.optim.Adam
    dataset: ImageDataset
    w_spread: float  # mean squared distance of mapped latents from w_avg (per element)
    network_info: dict[str, Any]
    log: "_Log"
    iteration: int = 0
    policy: dict | None = None  # preprocessing of the training data, recorded in checkpoints
    val_images: torch.Tensor | None = None  # uint8 [M, C, H, W] validation normals (--val)
    val_history: list[dict] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions)


def izif_loss(x: torch.Tensor, rec: torch.Tensor, feat: torch.Tensor | None,
              feat_rec: torch.Tensor | None, *, kappa: float) -> dict[str, torch.Tensor]:
    """Batch izif loss: {'image': mean (x - rec)^2, 'feature': mean (f - f_rec)^2, 'loss': sum}.

    The mean over the batch of anomaly.methods.scores.izif_terms (its terms, per image).
    """
    image, feature = izif_terms(x, rec, None if kappa == 0 else feat,
                                None if kappa == 0 else feat_rec)  # [N] each
    image, feature = image.mean(), feature.mean()
    return {"loss": izif_combine(image, feature, kappa), "image": image, "feature": feature}


def w_reg_loss(ws: torch.Tensor, w_avg: torch.Tensor, w_spread: float) -> torch.Tensor:
    """mean (ws - w_avg)^2 / w_spread: about 1 for codes as far from w_avg as mapped latents."""
    assert ws.ndim == 3 and ws.shape[2] == w_avg.shape[0], (ws.shape, w_avg.shape)
    return (ws - w_avg).square().mean() / w_spread


@torch.no_grad()
def estimate_w_spread(G: torch.nn.Module, *, n: int = 1000, seed: int = 0) -> float:
    """Mean over elements of (mapping(z) - w_avg)^2 for n latents z (one-hot random classes
    for conditional networks)."""
    device = G.mapping.w_avg.device
    rng = np.random.RandomState(seed)
    z = torch.from_numpy(rng.randn(n, G.z_dim).astype(np.float32)).to(device)  # [n, z_dim]
    c = None
    if G.c_dim > 0:
        c = torch.nn.functional.one_hot(torch.from_numpy(rng.randint(G.c_dim, size=n)),
                                        G.c_dim).float().to(device)  # [n, c_dim]
    ws = G.mapping(z, c)  # [n, K, D]
    return max(float((ws[:, 0] - G.mapping.w_avg).square().mean()), 1e-8)


# ----------------------------------------------------------------------------------------------
# Entry point


def fit_encoder(opts: FitOptions, *, echo: Callable[[str], None] | None = None) -> Path:
    """Train an encoder by izif; returns the last checkpoint written."""
    _validate(opts)
    run = _setup(opts, echo=echo)
    total = opts.total_iters()
    if run.val_images is not None:
        _validate_earlier_checkpoints(run)
    if run.iteration >= total:
        run.log(f"already at iteration {run.iteration} >= {total}; nothing to train")
        return _latest_written(run)
    _loop(run, total)
    return _latest_written(run)


def _validate(opts: FitOptions) -> None:
    if opts.kimg is not None and opts.iters is not None:
        raise UserError("give either --kimg or --iters, not both.")
    if opts.latent is not None and opts.latent not in LATENTS:
        raise UserError(f"--latent {opts.latent!r} is unknown; use one of {', '.join(LATENTS)}.")
    checks = [(opts.batch >= 1, "--batch must be at least 1"),
              (opts.lr > 0, "--lr must be positive"),
              (opts.kappa >= 0, "--kappa must not be negative"),
              (opts.w_reg >= 0, "--w-reg must not be negative"),
              (opts.total_iters() >= 1, "--kimg/--iters must give at least one iteration"),
              (opts.val_images >= 1, "--val-images must be at least 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")


def _setup(opts: FitOptions, *, echo) -> _Run:
    outdir = Path(opts.outdir)
    resume = _resume_path(opts, outdir)
    torch.manual_seed(opts.seed)
    model = AnoModel.load(opts.network, None, device=opts.device, kappa=opts.kappa,
                          feature_layer=opts.feature_layer, require_D=opts.kappa > 0)
    G, D, device = model.G, model.D, model.device
    cuda_backend_settings(device)  # as train-gan: cuDNN autotuning, no TF32
    dataset = ImageDataset(opts.data, use_labels=False, xflip=opts.mirror, rot90=opts.rot90)
    if (dataset.resolution, dataset.num_channels) != (G.img_resolution, G.img_channels):
        raise UserError(f"--data {opts.data} has {dataset.resolution} px images with "
                        f"{dataset.num_channels} channels but --network {opts.network} makes "
                        f"{G.img_resolution} px with {G.img_channels}; prepare the data at the "
                        f"network's resolution.")
    E, saved = _build_encoder(opts, G, D, resume, device)
    opt = torch.optim.Adam(E.parameters(), lr=opts.lr, betas=(0.9, 0.999))
    # The path relative to the encoder's folder; the sha256 pairs the encoder with its network.
    network_info = {"path": path_from(opts.outdir, opts.network), "sha256": model.network_sha256,
                    "generator": _plain(dataclasses.asdict(G.cfg)) if hasattr(G, "cfg") else None}
    policy = training_policy(opts.data, model)
    log = _Log(outdir, echo)
    run = _Run(opts, device, G, D, E, opt, dataset, estimate_w_spread(G, seed=opts.seed),
               network_info, log, policy=None if policy is None else policy.to_dict())
    if saved is not None:
        _restore(run, resume, saved)
    if opts.val is not None:
        run.val_images = validation_images(opts, dataset, policy)
        run.val_history = _read_history(outdir, opts.val, up_to=run.iteration)
    _write_options(run, resume)
    log(f"network {opts.network}: {G.img_resolution} px, num_ws {G.num_ws}, w_dim {G.w_dim}; "
        f"data {opts.data}: {len(dataset)} images; encoder {_count(E)} parameters "
        f"({E.cfg.latent}); starting at iteration {run.iteration}")
    return run


def training_policy(data: str, model: AnoModel) -> Preprocessing | None:
    """The preprocessing of the training data (its prepare.json), else the network's recorded
    one, else None (a dataset made elsewhere, for an official pickle)."""
    policy = read_prepared_policy(data)
    if policy is None:
        return model.recorded_policy
    return policy.at(model.resolution, model.channels)


def _resume_path(opts: FitOptions, outdir: Path) -> Path | None:
    if opts.init is not None and opts.resume is not None:
        raise UserError("give either --init (a new run from an encoder's weights) or --resume "
                        "(continue a run), not both.")
    if opts.resume is None:
        if encoder_checkpoints(outdir):
            raise UserError(f"--outdir {outdir} already holds encoder checkpoints; pass "
                            f"--resume latest to continue them or choose another --outdir.")
        return None
    if opts.resume == "latest":
        return find_latest_encoder(outdir)
    path = Path(opts.resume)
    if not path.is_file():
        raise UserError(f"--resume {path} does not exist; give an encoder-<iter>.safetensors "
                        f"file or 'latest'.")
    return path


def _build_encoder(opts: FitOptions, G: torch.nn.Module, D: torch.nn.Module | None,
                   resume: Path | None, device: torch.device) -> tuple[Encoder, dict | None]:
    """A new encoder (head at zero: it starts at G's w_avg), or the resumed one and its meta."""
    if resume is None and opts.init is not None:
        return _warm_start(opts, G, device), None
    if resume is None:
        cfg = EncoderConfig(img_resolution=G.img_resolution, img_channels=G.img_channels,
                            num_ws=G.num_ws, w_dim=G.w_dim, latent=opts.latent or "wplus",
                            **_capacity(opts, G, D))
        E = Encoder(cfg, w_avg=G.mapping.w_avg)
        return E.to(device).train().requires_grad_(True), None
    E, meta = load_encoder(resume, device=device)
    check_compatible(E, G, encoder_path=resume, network_path=opts.network)
    wanted = {"latent": opts.latent, "channel_base": opts.cbase, "channel_max": opts.cmax}
    for field, value in wanted.items():
        if value is not None and value != getattr(E.cfg, field):
            raise UserError(f"--resume {resume} was trained with {field} "
                            f"{getattr(E.cfg, field)!r}, not {value!r}; drop the flag or start "
                            f"a new run in another --outdir.")
    return E.train().requires_grad_(True), meta


def _warm_start(opts: FitOptions, G: torch.nn.Module, device: torch.device) -> Encoder:
    """The --init encoder's weights, for a new run against --network (iteration 0)."""
    path = Path(opts.init)
    if not path.is_file():
        raise UserError(f"--init {path} does not exist; give an encoder .safetensors file (e.g. "
                        f"a model folder's encoder.safetensors).")
    E, _meta = load_encoder(path, device=device)
    check_compatible(E, G, encoder_path=path, network_path=opts.network)
    if opts.latent is not None and opts.latent != E.cfg.latent:
        raise UserError(f"--init {path} predicts {E.cfg.latent!r}, not --latent {opts.latent}; "
                        f"drop --latent.")
    return E.train().requires_grad_(True)


def _capacity(opts: FitOptions, G: torch.nn.Module, D: torch.nn.Module | None
              ) -> dict[str, int]:
    """Encoder channels: the flags, else as wide as the discriminator (same block layout), else
    as the generator, else EncoderConfig's defaults."""
    like = D if D is not None else G
    cfg = getattr(like, "cfg", None)
    out = {}
    for field, flag in (("channel_base", opts.cbase), ("channel_max", opts.cmax)):
        value = flag if flag is not None else getattr(cfg, field, None)
        if value is not None:
            out[field] = int(value)
    return out


def _restore(run: _Run, resume: Path, meta: dict) -> None:
    state_file = state_path(resume)
    run.iteration = int(meta.get("iter", 0))
    if meta.get("network", {}).get("sha256") not in (None, run.network_info["sha256"]):
        run.log(f"note: {resume} was trained against another network file "
                f"({meta['network'].get('path')}); continuing against {run.opts.network}")
    if not state_file.is_file():
        run.log(f"note: {state_file.name} is missing; optimizer starts afresh at iteration "
                f"{run.iteration}")
        return
    state = load_training_state(state_file)
    run.opt.load_state_dict(state["optimizer"])
    run.iteration = int(state["iter"])
    restore_rng_state(state["rng"])
    run.log(f"resumed {resume.name} with its optimizer state at iteration {run.iteration}")


# Options that name files: recorded relative to the encoder's folder.
_PATH_OPTIONS = ("network", "data", "val", "init", "resume")


def _write_options(run: _Run, resume: Path | None) -> None:
    outdir = Path(run.opts.outdir)
    options = dataclasses.asdict(run.opts)
    for key in _PATH_OPTIONS:
        if options.get(key) and options[key] != "latest":
            options[key] = path_from(outdir, options[key])
    options["outdir"] = "."
    info = {"options": options, "total_iters": run.opts.total_iters(),
            "encoder": dataclasses.asdict(run.E.cfg), "network": run.network_info,
            "w_spread": run.w_spread,
            "resumed_from": None if resume is None else path_from(outdir, resume),
            "start_iter": run.iteration}
    atomic_write_json(Path(run.opts.outdir) / "encoder_options.json", info)
    run.log.drop_stats_after(run.iteration)


# ----------------------------------------------------------------------------------------------
# The loop


def _loop(run: _Run, total: int) -> None:
    opts = run.opts
    batches = _batches(run)
    grid = _grid_images(run)
    sums: dict[str, float] = {}
    count, tick_start = 0, time.time()
    deadline = None if opts.max_minutes is None else time.time() + 60 * opts.max_minutes
    snap = opts.snap_iters()
    with progress(total=total, initial=run.iteration, desc="train-encoder", unit="it") as bar, \
            contextlib.closing(batches):  # closing: stops the workers
        while run.iteration < total:
            losses = _step(run, next(batches))
            run.iteration += 1
            count += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.4g}", refresh=False)
            out_of_time = deadline is not None and time.time() >= deadline
            done = run.iteration == total or out_of_time
            if run.iteration % max(opts.tick, 1) == 0 or done:
                # sec/iter counts everything since the last record, checkpoints and validation
                # included: it is what the run really costs per iteration
                run.log.stats(_record(run, sums, count, time.time() - tick_start))
                sums, count, tick_start = {}, 0, time.time()
            if (snap and run.iteration % snap == 0) or done:
                _snapshot(run, grid)
            if out_of_time:
                run.log(f"--max-minutes {opts.max_minutes:g} reached at iteration "
                        f"{run.iteration} of {total}; stopped with a checkpoint")
                break


def _izif_losses(run: _Run, E: Encoder, x: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(codes [N, K, D], izif_loss of E on x [N, C, H, W]); gradients flow to E through the
    reconstruction unless the caller disables them (D's features of x never need any)."""
    opts = run.opts
    ws, rec = reconstruct_batch(run.G, E, x)  # [N, K, D], [N, C, H, W]
    feat = feat_rec = None
    if opts.kappa > 0:
        with torch.no_grad():
            feat = discriminator_features(run.D, x, opts.feature_layer)
        feat_rec = discriminator_features(run.D, rec, opts.feature_layer)
    return ws, izif_loss(x, rec, feat, feat_rec, kappa=opts.kappa)


def _step(run: _Run, x: torch.Tensor) -> dict[str, float]:
    """One Adam step on the izif loss for a batch x [N, C, H, W] in [-1, 1]."""
    opts, G = run.opts, run.G
    ws, losses = _izif_losses(run, run.E, x)
    total = losses["loss"]
    if opts.w_reg > 0:
        losses["w_reg"] = w_reg_loss(ws, G.mapping.w_avg, run.w_spread)
        total = total + opts.w_reg * losses["w_reg"]
        losses["loss"] = total
    if not torch.isfinite(total):
        message = (f"the encoder loss became {float(total.detach())} at iteration {run.iteration + 1}; "
                   f"lower --lr (now {opts.lr:g}) or check --network and --data (the last "
                   f"checkpoint in {opts.outdir} is kept).")
        run.log(message)
        raise UserError(message)
    run.opt.zero_grad(set_to_none=True)
    total.backward()
    run.opt.step()
    return {key: float(value.detach()) for key, value in losses.items()}


def _record(run: _Run, sums: dict[str, float], count: int, seconds: float) -> dict[str, Any]:
    record: dict[str, Any] = {"iter": run.iteration,
                              "kimg": round(run.iteration * run.opts.batch / 1000, 3)}
    names = {"loss": "loss", "image": "image_loss", "feature": "feature_loss", "w_reg": "w_reg"}
    for key, label in names.items():
        if key in sums:
            record[label] = sums[key] / count
    record["sec_per_iter"] = round(seconds / max(count, 1), 4)
    record["timestamp"] = time.time()
    return record


def _batches(run: _Run) -> Iterator[torch.Tensor]:
    """Endless shuffled batches [batch, C, H, W] in [-1, 1], continuing at run.iteration."""
    sampler = EndlessSampler(len(run.dataset), seed=run.opts.seed,
                             start=run.iteration * run.opts.batch, seed_stride=1_000_003)
    loader = torch.utils.data.DataLoader(run.dataset, batch_size=run.opts.batch, sampler=sampler,
                                         num_workers=run.opts.workers,
                                         pin_memory=run.device.type == "cuda")
    rescale = scale_augmentation(run.opts.scale_aug)
    for images, _labels in loader:
        yield rescale(from_uint8(torch.as_tensor(images).to(run.device, non_blocking=True)))


def scale_augmentation(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [N, C, H, W] in [-1, 1] -> x with each image rescaled about its centre with probability
    `p` by a factor 2^N(0, 0.2^2) (ADA's `scale` transform alone); p = 0: the identity."""
    if p <= 0:
        return lambda x: x
    pipe = AugmentPipe(AugmentConfig.preset("geom", rotate=0.0, aniso=0.0, xfrac=0.0,
                                            interpolation="bilinear"), p=p)
    return pipe


# ----------------------------------------------------------------------------------------------
# Snapshots


def _grid_images(run: _Run) -> torch.Tensor:
    """A fixed set of training images, spread over the dataset: uint8 [n, C, H, W]."""
    n = min(run.opts.grid_size, len(run.dataset))
    index = np.unique(np.linspace(0, len(run.dataset) - 1, n).round().astype(int))
    return torch.from_numpy(np.stack([run.dataset[int(i)][0] for i in index]))


def _snapshot(run: _Run, grid: torch.Tensor) -> None:
    outdir, it = Path(run.opts.outdir), run.iteration
    stem = f"{ENCODER_PREFIX}{it:06d}"
    state = {"optimizer": run.opt.state_dict(), "iter": it, "rng": rng_state()}
    # The state goes first: an encoder file without its state is never the newest complete pair.
    save_training_state(outdir / f"{stem}.state.pt", state)
    extra = {"iter": it, "kimg": it * run.opts.batch / 1000, "network": run.network_info,
             "training_options": dataclasses.asdict(run.opts), "w_spread": run.w_spread,
             POLICY_KEY: run.policy}
    record = None
    if run.val_images is not None:
        record = {"checkpoint": f"{stem}.safetensors", "iter": it,
                  "kimg": it * run.opts.batch / 1000, **validation_loss(run)}
        extra["validation"] = record
    save_encoder(outdir / f"{stem}.safetensors", run.E, extra=extra)
    with torch.no_grad():
        _ws, rec = reconstruct_batch(run.G, run.E, from_uint8(grid.to(run.device)))
    reals = grid.permute(0, 2, 3, 1).numpy()  # [n, H, W, C]
    save_grid(np.concatenate([reals, to_uint8(rec)]), outdir / f"rec{it:06d}.png",
              cols=len(grid))
    if record is None:
        run.log(f"checkpoint {stem}.safetensors")
        return
    run.val_history = [r for r in run.val_history if r["iter"] != it] + [record]
    best = _write_history(run)
    run.log(f"checkpoint {stem}.safetensors | val_loss {record['loss']:.5g} | best "
            f"{best['checkpoint']} ({best['loss']:.5g})")


def _latest_written(run: _Run) -> Path:
    return encoder_checkpoints(run.opts.outdir)[-1]


# ----------------------------------------------------------------------------------------------
# Checkpoint choice on validation normals


def validation_images(opts: FitOptions, train: ImageDataset,
                      policy: Preprocessing | None) -> torch.Tensor:
    """The normals (label 0) of --val, a seeded subset of at most `val_images`: uint8 [M, C, H, W].
    Refuses, in one sentence, the training data itself, other image sizes, another recorded
    preprocessing, and a split without normals."""
    path = Path(opts.val)
    if not path.exists():
        raise UserError(f"--val {path} does not exist; give the val.zip of `anostyle prepare`.")
    if path.resolve() == Path(opts.data).resolve():
        raise UserError(f"--val {path} is the training data; give the validation split "
                        f"(val.zip), whose naevi the encoder never sees.")
    val = ImageDataset(path)
    if (val.resolution, val.num_channels) != (train.resolution, train.num_channels):
        raise UserError(f"--val {path} has {val.resolution} px images with {val.num_channels} "
                        f"channels, unlike --data ({train.resolution} px, "
                        f"{train.num_channels}); prepare both in one `anostyle prepare` run.")
    prepared = read_prepared_policy(path)
    if policy is not None and prepared is not None \
            and prepared.at(train.resolution, train.num_channels) != policy:
        raise UserError(f"--val {path} was prepared with another preprocessing than --data; "
                        f"prepare both in one `anostyle prepare` run.")
    normals = np.flatnonzero(val.labels == 0)  # every image when the zip has no labels
    if len(normals) == 0:
        raise UserError(f"--val {path} holds no normal images (label 0); give the val.zip of "
                        f"`anostyle prepare`, whose naevi are labelled 0.")
    if len(normals) > opts.val_images:
        pick = np.random.RandomState(opts.seed).choice(len(normals), opts.val_images,
                                                       replace=False)
        normals = normals[np.sort(pick)]
    return torch.from_numpy(np.stack([val[int(i)][0] for i in normals]))


@torch.no_grad()
def validation_loss(run: _Run, E: Encoder | None = None) -> dict[str, float]:
    """The izif loss of the validation normals for E (default: the encoder in training), the
    training loss without gradients, averaged over images: {'loss', 'image_loss',
    'feature_loss'}."""
    opts, sums, count = run.opts, {"loss": 0.0, "image": 0.0, "feature": 0.0}, 0
    for chunk in run.val_images.split(opts.batch):  # the training batch size: b4.* features
        x = from_uint8(chunk.to(run.device))  # mix a batch as in training
        _ws, losses = _izif_losses(run, E if E is not None else run.E, x)
        for key in sums:
            sums[key] += float(losses[key]) * len(x)
        count += len(x)
    return {"loss": sums["loss"] / count, "image_loss": sums["image"] / count,
            "feature_loss": sums["feature"] / count}


def _validate_earlier_checkpoints(run: _Run) -> None:
    """Scores the checkpoints already in --outdir (up to the resumed one) that validation.json
    does not list yet, e.g. a run trained before --val was given."""
    done = {r["iter"] for r in run.val_history}
    todo = [p for p in encoder_checkpoints(run.opts.outdir)
            if int(p.stem.removeprefix(ENCODER_PREFIX)) <= run.iteration
            and int(p.stem.removeprefix(ENCODER_PREFIX)) not in done]
    for path in progress(todo, desc="validate checkpoints"):
        E, meta = load_encoder(path, device=run.device)
        it = int(meta.get("iter", path.stem.removeprefix(ENCODER_PREFIX)))
        run.val_history.append({"checkpoint": path.name, "iter": it,
                                "kimg": it * run.opts.batch / 1000, **validation_loss(run, E)})
    if todo:
        best = _write_history(run)
        run.log(f"validated {len(todo)} earlier checkpoint(s); best {best['checkpoint']} "
                f"({best['loss']:.5g})")


def best_record(history: list[dict]) -> dict:
    """The checkpoint with the lowest validation loss (the earliest on ties)."""
    return min(sorted(history, key=lambda r: r["iter"]), key=lambda r: r["loss"])


def _read_history(outdir: Path, val: str, *, up_to: int) -> list[dict]:
    """validation.json's records up to the resumed iteration (for the same --val data)."""
    path = outdir / VALIDATION_FILE
    if not path.is_file():
        return []
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        records = [r for r in body["checkpoints"] if int(r["iter"]) <= up_to]
        same = (outdir / body["data"]).resolve() == Path(val).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return records if same else []


def _write_history(run: _Run) -> dict:
    history = sorted(run.val_history, key=lambda r: r["iter"])
    best = best_record(history)
    atomic_write_json(Path(run.opts.outdir) / VALIDATION_FILE, {
        "data": path_from(run.opts.outdir, run.opts.val), "images": int(len(run.val_images)),
        "rule": "lowest izif loss of the validation normals (earliest on ties)",
        "best": best, "checkpoints": history})
    return best






# ----------------------------------------------------------------------------------------------
# Small helpers


class _Log(RunLog):
    """The shared run log; on resume it forgets stats written after the resumed checkpoint."""

    def drop_stats_after(self, iteration: int) -> None:
        """On resume: forget records written after the checkpoint we continue from."""
        path = self.outdir / "stats.jsonl"
        if not path.is_file():
            return
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("iter", 0) <= iteration]
        if len(kept) != len(lines):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so JSON round trips compare equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
