"""Adaptive discriminator augmentation (ADA): the 'bgc' augmentation pipeline and the p controller.

Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data", section 2.3 and
appendix B. Every image the discriminator sees (reals and fakes) passes through `AugmentPipe`;
each transform is applied to each image independently with probability p * multiplier. The
`AdaController` adjusts p so that r_t = E[sign(D(real))] stays near its target (section 3, eq. 1).

Transforms, in order, all with the official default strengths of the 'bgc' preset:
  pixel blitting   x-flip, rotation by a multiple of 90 degrees, integer translation
  geometric        isotropic scale, rotation, anisotropic scale, rotation again, fractional
                   translation (each rotation with probability 1 - sqrt(1 - p), so that at least
                   one happens with probability p)
  colour           brightness, contrast, luma flip, hue rotation, saturation
As in the official pipeline, an image chosen for x-flip or luma flip flips with probability 1/2,
and one chosen for rotate90 turns by k quarter turns, k uniform in {0, 1, 2, 3}.
All geometric transforms of one image are composed into one 3x3 homogeneous matrix (in pixel
units, origin at the image centre) and executed in ONE resampling step; the colour transforms are
composed into one 4x4 matrix acting on (R, G, B, 1) of images in [-1, 1], as the official pipeline
treats them (so 0 is mid-grey: luma flip and saturation act around it).

Deviations from the official pipeline (stylegan2-ada-pytorch `AugmentPipe`):
- Resampling is `F.grid_sample` (bicubic by default, bilinear optional) with reflection padding
  about the image edge ('symmetric': the border pixel repeats), directly at the output
  resolution. The official code pads by reflection without repeating the border pixel, upsamples
  2x with a sym6 wavelet filter, samples bilinearly and downsamples 2x, which blurs less. Measured
  on HAM10000 crops at 128 px, a fractional translation keeps 87% of the Laplacian energy with
  bicubic and 55% with bilinear; bicubic costs ~3x more on the CPU and overshoots slightly.
- The random parameters are drawn from torch's default CPU generator (then moved to the images'
  device), so a seeded run augments identically on any device and the "did any image draw a
  geometric / colour transform" checks need no device sync. Reading p once per call does sync
  when p lives on an accelerator.
- Image-space filtering, noise and cutout (presets 'bgcf', 'bgcfn', 'bgcfnc') are not provided.
- 1-channel images get brightness, contrast and luma flip (which negates a grey image); hue and
  saturation are skipped — the same as the official pipeline. Other channel counts are refused
  when a colour transform is enabled.
- The controller also clamps p at 1 (the official clamps only at 0).

Shape letters: N batch, C channels, H/W height/width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
_COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
PRESETS: dict[str, tuple[str, ...]] = {
    "blit": ("xflip", "rotate90", "xint"),
    "geom": ("scale", "rotate", "aniso", "xfrac"),
    "color": _COLOUR,
    "bg": _GEOMETRIC,
    "bgc": _GEOMETRIC + _COLOUR,
}


@dataclass(frozen=True)
class AugmentConfig:
    """Probability multipliers (0 disables a transform) and strengths; defaults = preset 'bgc'."""

    xflip: float = 1.0  # mirror x (then half of the chosen images keep their orientation)
    rotate90: float = 1.0  # rotate by 0, 90, 180 or 270 degrees
    xint: float = 1.0  # integer translation
    scale: float = 1.0  # isotropic scaling
    rotate: float = 1.0  # arbitrary rotation (applied before and after `aniso`)
    aniso: float = 1.0  # anisotropic scaling
    xfrac: float = 1.0  # fractional translation
    brightness: float = 1.0
    contrast: float = 1.0
    lumaflip: float = 1.0  # Householder reflection of the colour along the luma axis
    hue: float = 1.0  # rotation around the luma axis
    saturation: float = 1.0  # scale of the colour part orthogonal to the luma axis
    xint_max: float = 0.125  # range of integer translation, relative to the image size
    scale_std: float = 0.2  # log2 standard deviation of isotropic scaling
    rotate_max: float = 1.0  # angle drawn in [-pi, pi] * rotate_max (1 = full circle)
    aniso_std: float = 0.2  # log2 standard deviation of anisotropic scaling
    xfrac_std: float = 0.125  # standard deviation of fractional translation, relative to size
    brightness_std: float = 0.2  # standard deviation of the added brightness (images in [-1, 1])
    contrast_std: float = 0.5  # log2 standard deviation of contrast
    hue_max: float = 1.0  # hue angle drawn in [-pi, pi] * hue_max
    saturation_std: float = 1.0  # log2 standard deviation of saturation
    interpolation: str = "bicubic"  # grid_sample mode: 'bicubic' (sharper) | 'bilinear' (faster)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AugmentConfig.{field.name} must be finite and >= 0, got {value}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"AugmentConfig.interpolation must be 'bilinear' or 'bicubic', "
                             f"got {self.interpolation!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AugmentConfig":
        """The official preset `name` ('blit', 'geom', 'color', 'bg', 'bgc'): its transforms on."""
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose from {sorted(PRESETS)}")
        multipliers = {t: (1.0 if t in PRESETS[name] else 0.0) for t in _GEOMETRIC + _COLOUR}
        return cls(**{**multipliers, **overrides})

    @property
    def any_geometric(self) -> bool:
        return any(getattr(self, t) > 0 for t in _GEOMETRIC)

    @property
    def any_colour(self) -> bool:
        return any(getattr(self, t) > 0 for t in _COLOUR)


# ----------------------------------------------------------------------------------------------
# Batched homogeneous matrices, float64 on the CPU: [N, 3, 3] (2-D) and [N, 4, 4] (colour).


def _matrices(rows: list[list[torch.Tensor | float]], n: int) -> torch.Tensor:
    """Stack per-sample entries (tensors [N] or constants) into [N, R, C]."""
    full = [[torch.as_tensor(e, dtype=torch.float64).expand(n) for e in row] for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in full], dim=-2)  # [N, R, C]


def _scale2d(sx: torch.Tensor | float, sy: torch.Tensor | float, n: int) -> torch.Tensor:
    return _matrices([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], n)


def _translate2d(tx: torch.Tensor | float, ty: torch.Tensor | float, n: int) -> torch.Tensor:
    return _matrices([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], n)


def _rotate2d(cos: torch.Tensor, sin: torch.Tensor, n: int) -> torch.Tensor:
    return _matrices([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], n)


def _randint(high: int, n: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), dtype=torch.float64)  # [N] in {0, ..., high - 1}


def _log2_normal(std: float, n: int) -> torch.Tensor:
    return torch.exp2(torch.randn(n, dtype=torch.float64) * std)  # [N], log2 ~ N(0, std^2)


def _gate(values: torch.Tensor, neutral: float, prob: float) -> torch.Tensor:
    """Keep each sample's value with probability `prob`, else the neutral (identity) value."""
    keep = torch.rand(values.shape[0], dtype=torch.float64) < prob  # [N]
    keep = keep.reshape([-1] + [1] * (values.ndim - 1))
    return torch.where(keep, values, torch.full_like(values, neutral))


def _draw_geometric(cfg: AugmentConfig, p: float, n: int, height: int, width: int) -> torch.Tensor:
    """Inverse transforms G_inv [N, 3, 3]: output pixel -> input pixel (centred pixel units)."""
    g_inv = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    if cfg.xflip > 0:
        flip = _gate(_randint(2, n), 0.0, cfg.xflip * p)
        g_inv = g_inv @ _scale2d(1 - 2 * flip, 1.0, n)
    if cfg.rotate90 > 0:
        quarter = _gate(_randint(4, n), 0.0, cfg.rotate90 * p).long()
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[quarter]  # exact, no 1e-17
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[quarter]
        g_inv = g_inv @ _rotate2d(cos, sin, n)
    if cfg.xint > 0:
        shift = (torch.rand(n, 2, dtype=torch.float64) * 2 - 1) * cfg.xint_max  # [N, 2]
        shift = _gate(shift, 0.0, cfg.xint * p)
        g_inv = g_inv @ _translate2d(-torch.round(shift[:, 0] * width),
                                     -torch.round(shift[:, 1] * height), n)
    if cfg.scale > 0:
        s = _gate(_log2_normal(cfg.scale_std, n), 1.0, cfg.scale * p)
        g_inv = g_inv @ _scale2d(1 / s, 1 / s, n)
    p_rot = 1 - math.sqrt(min(max(1 - cfg.rotate * p, 0.0), 1.0))  # P(pre or post) = rotate * p
    if cfg.rotate > 0:
        g_inv = g_inv @ _draw_rotation_inv(cfg, p_rot, n)  # before the anisotropic scaling
    if cfg.aniso > 0:
        s = _gate(_log2_normal(cfg.aniso_std, n), 1.0, cfg.aniso * p)
        g_inv = g_inv @ _scale2d(1 / s, s, n)
    if cfg.rotate > 0:
        g_inv = g_inv @ _draw_rotation_inv(cfg, p_rot, n)  # after the anisotropic scaling
    if cfg.xfrac > 0:
        shift = _gate(torch.randn(n, 2, dtype=torch.float64) * cfg.xfrac_std, 0.0, cfg.xfrac * p)
        g_inv = g_inv @ _translate2d(-shift[:, 0] * width, -shift[:, 1] * height, n)
    return g_inv  # [N, 3, 3]


def _draw_rotation_inv(cfg: AugmentConfig, prob: float, n: int) -> torch.Tensor:
    theta = (torch.rand(n, dtype=torch.float64) * 2 - 1) * math.pi * cfg.rotate_max
    theta = _gate(theta, 0.0, prob)
    return _rotate2d(torch.cos(-theta), torch.sin(-theta), n)  # [N, 3, 3]


def _draw_colour(cfg: AugmentConfig, p: float, n: int, channels: int) -> torch.Tensor:
    """Colour matrices C [N, 4, 4]: C @ (r, g, b, 1) -> (r', g', b', 1), applied in order."""
    eye = torch.eye(4, dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(3)  # luma axis
    vv = torch.outer(v, v)  # [4, 4] projector onto the luma axis
    c = eye.expand(n, 4, 4)
    if cfg.brightness > 0:
        b = _gate(torch.randn(n, dtype=torch.float64) * cfg.brightness_std, 0.0, cfg.brightness * p)
        c = _matrices([[1.0, 0.0, 0.0, b], [0.0, 1.0, 0.0, b], [0.0, 0.0, 1.0, b],
                       [0.0, 0.0, 0.0, 1.0]], n) @ c
    if cfg.contrast > 0:
        k = _gate(_log2_normal(cfg.contrast_std, n), 1.0, cfg.contrast * p)
        c = _matrices([[k, 0.0, 0.0, 0.0], [0.0, k, 0.0, 0.0], [0.0, 0.0, k, 0.0],
                       [0.0, 0.0, 0.0, 1.0]], n) @ c
    if cfg.lumaflip > 0:
        flip = _gate(_randint(2, n), 0.0, cfg.lumaflip * p)
        c = (eye - 2 * vv * flip[:, None, None]) @ c  # Householder reflection
    if cfg.hue > 0 and channels > 1:
        theta = _gate((torch.rand(n, dtype=torch.float64) * 2 - 1) * math.pi * cfg.hue_max, 0.0,
                      cfg.hue * p)
        c = _rotation_about(v[:3], theta) @ c
    if cfg.saturation > 0 and channels > 1:
        s = _gate(_log2_normal(cfg.saturation_std, n), 1.0, cfg.saturation * p)
        keep = eye - vv
        keep[3, 3] = 0.0  # the homogeneous coordinate is not colour
        c = (eye - keep + keep * s[:, None, None]) @ c
    return c  # [N, 4, 4]


def _rotation_about(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rodrigues' rotation by theta [N] around the unit 3-vector `axis`, embedded in [N, 4, 4]."""
    x, y, z = (float(a) for a in axis)
    cross = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    r3 = cos * torch.eye(3, dtype=torch.float64) + sin * cross + (1 - cos) * torch.outer(axis, axis)
    r4 = torch.eye(4, dtype=torch.float64).repeat(theta.shape[0], 1, 1)
    r4[:, :3, :3] = r3
    return r4  # [N, 4, 4]


# ----------------------------------------------------------------------------------------------
# Execution on the images' device.


def _resample(images: torch.Tensor, g_inv: torch.Tensor, mode: str) -> torch.Tensor:
    """Warp every image by its G_inv in one grid_sample call (reflection padding)."""
    n, _, height, width = images.shape
    to_unit = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], dtype=torch.float64))
    from_unit = torch.diag(torch.tensor([width / 2, height / 2, 1.0], dtype=torch.float64))
    theta = to_unit @ g_inv @ from_unit  # [N, 3, 3] in grid_sample's [-1, 1] coordinates
    theta = theta[:, :2, :].to(device=images.device, dtype=images.dtype)  # [N, 2, 3]
    # The grid of F.affine_grid, built from pixel centres (2 i + 1) / size - 1 that are exact in
    # binary for power-of-two sizes: flips, quarter turns and integer shifts then hit pixel
    # centres exactly and copy values bit for bit. Element-wise on purpose: a matmul could run
    # in TF32 on recent GPUs and move every sample point by ~1e-3.
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) * 2 + 1) / height - 1
    t = theta[:, :, None, None, :]  # [N, 2, 1, 1, 3]
    grid = t[..., 0] * xs + t[..., 1] * ys[:, None] + t[..., 2]  # [N, 2, H, W]
    grid = grid.permute(0, 2, 3, 1)  # [N, H, W, 2] as (x, y)
    return F.grid_sample(images, grid, mode=mode, padding_mode="reflection", align_corners=False)


def _recolour(images: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    n, channels, height, width = images.shape
    c = c.to(device=images.device, dtype=images.dtype)
    flat = images.reshape(n, channels, height * width)  # [N, C, HW]
    if channels == 3:  # element-wise rather than a (possibly TF32) matmul
        flat = sum(c[:, :3, j : j + 1] * flat[:, j : j + 1] for j in range(3)) + c[:, :3, 3:]
    elif channels == 1:  # grey: the mean of the three colour rows acts on the grey value
        rows = c[:, :3, :].mean(dim=1, keepdim=True)  # [N, 1, 4]
        flat = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
    else:
        raise ValueError(f"colour augmentation needs 1 or 3 channels, got {channels}; "
                         f"disable the colour transforms in AugmentConfig")
    return flat.reshape(n, channels, height, width)


class AugmentPipe(nn.Module):
    """Differentiable ADA augmentation of a batch of images in [-1, 1], layout [N, C, H, W].

    The buffer `p` (a 0-d float tensor, state-dict name 'p') is the augmentation probability;
    the training loop sets it (e.g. `pipe.p.fill_(controller.p)`). With p == 0 the input is
    returned as it is. Geometric resampling is skipped when no image drew a geometric transform,
    the colour step likewise.
    """

    def __init__(self, config: AugmentConfig | None = None, *, p: float = 0.0) -> None:
        super().__init__()
        self.config = config if config is not None else AugmentConfig()
        self.register_buffer("p", torch.tensor(float(p), dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, config={self.config}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.ndim == 4 and images.is_floating_point(), "expected float images [N, C, H, W]"
        p = float(self.p)
        if p <= 0:
            return images
        cfg = self.config
        n, channels, height, width = images.shape
        if cfg.any_geometric:
            g_inv = _draw_geometric(cfg, p, n, height, width)
            if not torch.equal(g_inv, torch.eye(3, dtype=torch.float64).expand(n, 3, 3)):
                images = _resample(images, g_inv, cfg.interpolation)
        if cfg.any_colour:
            c = _draw_colour(cfg, p, n, channels)
            if not torch.equal(c, torch.eye(4, dtype=torch.float64).expand(n, 4, 4)):
                images = _recolour(images, c)
        return images


# ----------------------------------------------------------------------------------------------
# Adaptive p (ADA paper, section 3).


def ada_adjustment(r_t: float, target: float, *, batch_size: int, interval: int,
                   kimg: float) -> float:
    """Signed change of p after `interval` minibatches: 0 -> 1 takes `kimg` thousand images."""
    direction = (r_t > target) - (r_t < target)  # sign(r_t - target)
    return direction * (batch_size * interval) / (kimg * 1000)


class AdaController:
    """Tracks r_t = mean(sign(D(real logits))) and moves p toward keeping r_t at `target`.

    Call `update` with the real logits of every discriminator main step (in multi-process runs:
    the logits gathered from all ranks, so every rank keeps the same p). Once batch_size *
    interval logits have been seen, r_t is their mean sign and p moves by ada_adjustment(...),
    then is clamped to [0, 1]. `state_dict()` holds plain floats for checkpoints.
    """

    def __init__(self, batch_size: int, *, target: float = 0.6, interval: int = 4,
                 kimg: float = 500.0, p: float = 0.0) -> None:
        if batch_size < 1 or interval < 1 or kimg <= 0:
            raise ValueError("AdaController needs batch_size >= 1, interval >= 1 and kimg > 0")
        self.batch_size, self.target, self.interval, self.kimg = batch_size, target, interval, kimg
        self.p = p
        self.r_t: float | None = None  # None until the first adjustment
        self._sign_sum: torch.Tensor | float = 0.0  # stays on the logits' device between steps
        self._num = 0

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = min(max(float(value), 0.0), 1.0)

    @property
    def step(self) -> float:
        """|change of p| at each adjustment."""
        return ada_adjustment(1.0, 0.0, batch_size=self.batch_size, interval=self.interval,
                              kimg=self.kimg)

    def update(self, real_logits: torch.Tensor) -> None:
        self._sign_sum = self._sign_sum + real_logits.detach().sign().sum()
        self._num += real_logits.numel()
        if self._num < self.batch_size * self.interval:
            return
        self.r_t = float(self._sign_sum) / self._num  # the only device sync, once per interval
        self.p = self.p + ada_adjustment(self.r_t, self.target, batch_size=self.batch_size,
                                         interval=self.interval, kimg=self.kimg)
        self._sign_sum, self._num = 0.0, 0

    def state_dict(self) -> dict[str, float | None]:
        return {"p": self.p, "r_t": self.r_t, "sign_sum": float(self._sign_sum),
                "num": float(self._num)}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.p = float(state["p"])
        self.r_t = None if state.get("r_t") is None else float(state["r_t"])
        self._sign_sum = float(state.get("sign_sum", 0.0))
        self._num = int(state.get("num", 0))
