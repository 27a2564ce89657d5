"""Turn `anostyle train-gan` flags into one resolved `TrainOptions`: preset, then explicit flags,
then the architecture of a `--resume` file (adopted and reported, or refused with
`--strict-resume`)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.networks import DiscriminatorConfig, GeneratorConfig
from stylegan.presets import preset
from stylegan.train import TrainOptions, find_latest_snapshot


@dataclass(frozen=True)
class TrainFlags:
    """The flags as typed by the user; None means "take the preset's value"."""

    outdir: str
    data: str
    cfg: str = "auto"
    gpus: int = 1
    batch: int | None = None
    batch_gpu: int | None = None
    gamma: float | None = None
    map_depth: int | None = None
    glr: float | None = None
    dlr: float | None = None
    cbase: int | None = None
    cmax: int | None = None
    kimg: float = 25000
    tick: float = 4
    snap: int = 50
    workers: int = 3
    resume: str | None = None
    strict_resume: bool = False
    mirror: bool = False
    rot90: bool = False
    aug: str = "ada"
    p: float = 0.2
    target: float = 0.6
    freezed: int = 0
    mbstd_group: int | None = None
    seed: int = 0
    fp32: bool = False
    device: str = "auto"
    max_minutes: float | None = None  # stop with a final snapshot after this wall time


@dataclass(frozen=True)
class Resolved:
    """Resolved options plus what a resume file overrode (for the user to read)."""

    options: TrainOptions
    overridden: tuple[str, ...]
    resume_networks: dict[str, Any] | None
    warnings: tuple[str, ...] = ()  # e.g. too few images to learn a distribution


def resolve(flags: TrainFlags) -> Resolved:
    """Apply preset, flags and resume file; validate everything a run needs before it starts."""
    _check_ranges(flags)
    flags = _under_torchrun(flags)
    dataset = ImageDataset(flags.data)
    res, channels = dataset.resolution, dataset.num_channels
    pre = preset(flags.cfg, resolution=res, gpus=flags.gpus)
    batch = _pick(flags.batch, pre.batch)
    batch_gpu = _pick(flags.batch_gpu, batch // flags.gpus)
    fp32 = flags.fp32
    G_cfg = GeneratorConfig(
        z_dim=pre.z_dim, w_dim=pre.w_dim, img_resolution=res, img_channels=channels,
        mapping_layers=_pick(flags.map_depth, pre.map_depth), channel_base=_pick(flags.cbase, pre.cbase),
        channel_max=_pick(flags.cmax, pre.cmax), num_fp16_res=0 if fp32 else pre.num_fp16_res,
        conv_clamp=None if fp32 else pre.conv_clamp)
    D_cfg = DiscriminatorConfig(
        img_resolution=res, img_channels=channels, channel_base=G_cfg.channel_base,
        channel_max=G_cfg.channel_max, num_fp16_res=G_cfg.num_fp16_res,
        conv_clamp=G_cfg.conv_clamp, mbstd_group_size=_pick(flags.mbstd_group, pre.mbstd_group))
    resume = _resolve_resume_path(flags)
    overridden: tuple[str, ...] = ()
    networks = None
    if resume is not None:
        networks, G_cfg, D_cfg, overridden = _adopt_resume_architecture(
            resume, G_cfg, D_cfg, strict=flags.strict_resume)
    _check_batch(batch, batch_gpu, flags.gpus, D_cfg.mbstd_group_size)
    opts = TrainOptions(
        outdir=flags.outdir, data=flags.data, cfg=flags.cfg, gpus=flags.gpus, batch=batch,
        batch_gpu=batch_gpu, gamma=_pick(flags.gamma, pre.gamma), glr=_pick(flags.glr, pre.glr),
        dlr=_pick(flags.dlr, pre.dlr), kimg=flags.kimg, tick=flags.tick, snap=flags.snap,
        workers=flags.workers, mirror=flags.mirror, rot90=flags.rot90, aug=flags.aug, p=flags.p, target=flags.target,
        freezed=flags.freezed, seed=flags.seed, fp32=fp32, ema_kimg=batch * 10 / 32
        if flags.cfg in ("auto", "stylegan2") else pre.ema_kimg, ema_rampup=pre.ema_rampup,
        pl_weight=pre.pl_weight, style_mixing=pre.style_mixing,
        resume=None if resume is None else str(resume), strict_resume=flags.strict_resume,
        device=flags.device, generator=G_cfg, discriminator=D_cfg,
        ada_kimg=100.0 if resume is not None else 500.0,  # official: react faster when resuming
        preprocessing=recorded_preprocessing(flags.data), max_minutes=flags.max_minutes)
    return Resolved(options=opts, overridden=overridden, resume_networks=networks,
                    warnings=few_images_warning(len(dataset), flags.data))


def recorded_preprocessing(data: str) -> dict | None:
    """The `preprocessing` object of prepare.json beside a prepared zip/folder, as an opaque dict
    (the data package owns its meaning); None when there is none."""
    path = Path(data)
    info = (path.parent if path.suffix.lower() == ".zip" or path.is_file() else path) / \
        "prepare.json"
    try:
        body = json.loads(info.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{info} is not readable JSON ({exc}); prepare the data again.") from None
    policy = body.get("preprocessing") if isinstance(body, dict) else None
    return policy if isinstance(policy, dict) else None


def _under_torchrun(flags: TrainFlags) -> TrainFlags:
    """Under torchrun the processes already exist: their number replaces --gpus."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return flags
    if flags.gpus not in (1, world):
        raise UserError(f"--gpus {flags.gpus} disagrees with torchrun's {world} processes; "
                        f"leave --gpus out under torchrun")
    return dataclasses.replace(flags, gpus=world)


def _pick(value, default):
    return default if value is None else value


def _check_ranges(flags: TrainFlags) -> None:
    if flags.gpus < 1:
        raise UserError("--gpus must be at least 1")
    if flags.kimg <= 0 or flags.tick <= 0:
        raise UserError("--kimg and --tick must be positive")
    if flags.freezed < 0 or flags.snap < 0 or flags.workers < 0:
        raise UserError("--freezed, --snap and --workers cannot be negative")
    if not 0 <= flags.p <= 1 or not 0 < flags.target < 1:
        raise UserError("--p must lie in [0, 1] and --target in (0, 1)")
    if flags.aug not in ("ada", "fixed", "noaug"):
        raise UserError("--aug must be one of ada, fixed, noaug")


def _check_batch(batch: int, batch_gpu: int, gpus: int, mbstd_group: int | None) -> None:
    if batch < 1 or batch_gpu < 1 or batch % (batch_gpu * gpus) != 0:
        raise UserError(f"--batch {batch} must be a multiple of --batch-gpu {batch_gpu} times "
                        f"--gpus {gpus}")
    if mbstd_group is not None and batch_gpu % min(mbstd_group, batch_gpu) != 0:
        raise UserError(f"--batch-gpu {batch_gpu} must be a multiple of --mbstd-group "
                        f"{mbstd_group}")


def _resolve_resume_path(flags: TrainFlags) -> Path | None:
    if flags.resume is None:
        return None
    if flags.resume == "latest":
        return find_latest_snapshot(flags.outdir)
    path = Path(flags.resume)
    if not path.is_file():
        raise UserError(f"--resume {path} does not exist; give a snapshot file, an official "
                        f".pkl or 'latest'")
    return path


# Fields a resume file decides; the data decides resolution and channels, which must agree.
_ADOPTED_G = ("z_dim", "w_dim", "mapping_layers", "mapping_lr_multiplier", "mapping_layer_features",
              "embed_features", "channel_base", "channel_max", "architecture", "use_noise",
              "resample_filter")
_ADOPTED_D = ("architecture", "channel_base", "channel_max", "cmap_dim", "mbstd_num_channels",
              "resample_filter", "mapping_layers")
_FLAG_OF = {"mapping_layers": "--map-depth", "channel_base": "--cbase", "channel_max": "--cmax"}


def _adopt_resume_architecture(path: Path, G_cfg: GeneratorConfig, D_cfg: DiscriminatorConfig, *,
                               strict: bool):
    from stylegan.checkpoint import load_network  # heavy: only when resuming

    networks = load_network(path)
    file_G = (networks.get("G") or networks.get("G_ema")).cfg
    file_D = networks["D"].cfg if networks.get("D") is not None else None
    for name, want, have in (("resolution", G_cfg.img_resolution, file_G.img_resolution),
                             ("channels", G_cfg.img_channels, file_G.img_channels),
                             ("class labels", G_cfg.c_dim, file_G.c_dim)):
        if want != have:
            raise UserError(f"{path} was trained with {name} {have} but the data has {want}; "
                            f"prepare the data at {have} or train from scratch")
    if file_D is None:
        raise UserError(f"{path} holds no discriminator; training needs one (use a full "
                        f"snapshot, not a generator-only file)")
    notes = [f"G.{k}: {getattr(G_cfg, k)} -> {getattr(file_G, k)}" + _flag_hint(k)
             for k in _ADOPTED_G if getattr(G_cfg, k) != getattr(file_G, k)]
    notes += [f"D.{k}: {getattr(D_cfg, k)} -> {getattr(file_D, k)}" + _flag_hint(k)
              for k in _ADOPTED_D if getattr(D_cfg, k) != getattr(file_D, k)]
    if notes and strict:
        raise UserError(f"--strict-resume: {path} differs from the flags ({'; '.join(notes)}); "
                        f"change the flags to match or drop --strict-resume")
    G_new = dataclasses.replace(G_cfg, **{k: getattr(file_G, k) for k in _ADOPTED_G})
    D_new = dataclasses.replace(D_cfg, **{k: getattr(file_D, k) for k in _ADOPTED_D})
    return networks, G_new, D_new, tuple(notes)


FEW_IMAGES = 100  # below this a GAN can only memorise its data (ADA's smallest sets are ~1k)


def few_images_warning(count: int, data: str) -> tuple[str, ...]:
    """A warning when a dataset is too small to learn a distribution from."""
    if count >= FEW_IMAGES:
        return ()
    return (f"warning: {data} holds only {count} image{'s' * (count != 1)}; a GAN needs "
            f"hundreds to thousands (ADA's smallest sets have ~1000) and will memorise these, "
            f"so its scores will not generalise",)


def _flag_hint(field: str) -> str:
    return f" (overrides {_FLAG_OF[field]})" if field in _FLAG_OF else ""


def run_from_flags(flags: TrainFlags, *, dry_run: bool = False, echo=print) -> Path | None:
    """Resolve the flags, print them, and train (unless `dry_run`). Returns the run folder."""
    import json

    from stylegan.train import train

    resolved = resolve(flags)
    for note in resolved.overridden:
        echo(f"resume file decides the architecture: {note}")
    if dry_run:
        echo(json.dumps(resolved.options.to_json(), indent=2))  # JSON only: scripts read it
        return None
    for warning in resolved.warnings:
        echo(warning)
    return train(resolved.options, resume_networks=resolved.resume_networks)
