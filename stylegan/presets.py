"""`--cfg` presets for `anostyle train-gan`.

Values follow the official StyleGAN2-ADA configurations (Karras et al. 2020, "Training Generative
Adversarial Networks with Limited Data", appendix; NVlabs stylegan2-ada-pytorch `--cfg`
`stylegan2`, `paper256`, `auto`), plus `cpu`: a small 64 px network that makes visible progress
on two CPU cores within minutes (used by the demo and the tests). Explicit flags override a preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from stylegan.errors import UserError


@dataclass(frozen=True)
class Preset:
    """Training hyper-parameters that a `--cfg` name stands for."""

    batch: int
    gamma: float  # R1 weight
    glr: float
    dlr: float
    map_depth: int
    cbase: int
    cmax: int
    ema_kimg: float  # half-life of the generator EMA
    ema_rampup: float | None
    mbstd_group: int
    num_fp16_res: int
    conv_clamp: float | None
    z_dim: int = 512
    w_dim: int = 512
    pl_weight: float = 2.0
    style_mixing: float = 0.9


PRESET_NAMES = ("stylegan2", "paper256", "auto", "cpu")


def _auto(resolution: int, gpus: int) -> Preset:
    # The official 'auto' rule: sizes from the resolution and the number of GPUs.
    batch = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
    return Preset(
        batch=batch,
        gamma=0.0002 * resolution**2 / batch,
        glr=0.002 if resolution >= 1024 else 0.0025,
        dlr=0.002 if resolution >= 1024 else 0.0025,
        map_depth=2,
        cbase=32768 if resolution >= 512 else 16384,
        cmax=512,
        ema_kimg=batch * 10 / 32,
        ema_rampup=0.05,
        mbstd_group=min(batch // gpus, 4),
        num_fp16_res=4,
        conv_clamp=256,
    )


def preset(name: str, *, resolution: int, gpus: int) -> Preset:
    """The hyper-parameters of preset `name` for a dataset at `resolution` trained on `gpus`."""
    if name == "stylegan2":
        return Preset(batch=32, gamma=10.0, glr=0.002, dlr=0.002, map_depth=8, cbase=32768,
                      cmax=512, ema_kimg=10.0, ema_rampup=None, mbstd_group=4, num_fp16_res=4,
                      conv_clamp=256)
    if name == "paper256":
        return Preset(batch=64, gamma=1.0, glr=0.0025, dlr=0.0025, map_depth=8, cbase=16384,
                      cmax=512, ema_kimg=20.0, ema_rampup=None, mbstd_group=8, num_fp16_res=4,
                      conv_clamp=256)
    if name == "auto":
        return _auto(resolution, gpus)
    if name == "cpu":
        batch = 16
        return Preset(batch=batch, gamma=0.0002 * resolution**2 / batch, glr=0.0025, dlr=0.0025,
                      map_depth=2, cbase=2048, cmax=128, ema_kimg=batch * 10 / 32, ema_rampup=0.05,
                      mbstd_group=4, num_fp16_res=0, conv_clamp=None, z_dim=128, w_dim=128)
    raise UserError(f"unknown --cfg {name!r}; choose one of {', '.join(PRESET_NAMES)}")
