"""Where is an image anomalous? Residual maps between an image and its reconstruction G(E(x)).

The pixel residual is the per-pixel term of f-AnoGAN's A_R (Schlegl et al. 2019, Medical Image
Analysis 54, eq. 8), and the feature residual the per-location term of A_D (eq. 9), upsampled
to image size. Pure helpers: the caller runs the networks and passes arrays or tensors.

Shape letters: C channels, H/W image height/width, h/w feature-map height/width.
"""

from __future__ import annotations

import os

import matplotlib as mpl
import numpy as np
import torch
import torch.nn.functional as F

from anomaly.evaluation.plots import new_figure

REDUCTIONS = ("abs", "square")


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.detach().cpu().float()


def residual_map(x: torch.Tensor | np.ndarray, x_rec: torch.Tensor | np.ndarray, *,
                 reduce: str = "abs") -> np.ndarray:
    """Per-pixel residual averaged over channels: mean_c |x - x_rec| (or squared). [H, W].

    x, x_rec: one image [C, H, W] (any value range, both in the same one).
    """
    a, b = _as_tensor(x), _as_tensor(x_rec)
    assert a.ndim == 3 and a.shape == b.shape, f"expected two [C, H, W], got {a.shape}, {b.shape}"
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    diff = (a - b).abs() if reduce == "abs" else (a - b).square()
    return diff.mean(dim=0).numpy()  # [H, W]


def upsample_feature_residual(feat: torch.Tensor | np.ndarray, feat_rec: torch.Tensor | np.ndarray,
                              size: int | tuple[int, int]) -> np.ndarray:
    """Squared feature residual averaged over channels, bilinearly upsampled to `size`. [H, W].

    feat, feat_rec: one feature map [C, h, w] (e.g. a discriminator block output).
    """
    a, b = _as_tensor(feat), _as_tensor(feat_rec)
    assert a.ndim == 3 and a.shape == b.shape, f"expected two [C, h, w], got {a.shape}, {b.shape}"
    size = (size, size) if isinstance(size, int) else tuple(size)
    residual = (a - b).square().mean(dim=0)[None, None]  # [1, 1, h, w]
    return F.interpolate(residual, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _normalise(heat: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    lo = float(np.min(heat)) if vmin is None else vmin
    hi = float(np.max(heat)) if vmax is None else vmax
    if hi <= lo:  # a constant map carries no location: show it as cold
        return np.zeros_like(heat, dtype=np.float64)
    return np.clip((heat - lo) / (hi - lo), 0.0, 1.0)


def overlay(image_uint8_hwc: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5,
            cmap: str = "inferno", vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """Blend a colour-mapped heat map onto an image: (1 - alpha) image + alpha colour. uint8 HWC.

    image: uint8 [H, W, 3], [H, W, 1] or [H, W]; heat: [h, w] (resized to H x W when needed),
    scaled to [0, 1] with vmin/vmax (default: its own min and max).
    """
    image = np.asarray(image_uint8_hwc)
    assert image.dtype == np.uint8, f"image must be uint8, got {image.dtype}"
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)  # [H, W, 3]
    assert image.ndim == 3 and image.shape[2] == 3, f"expected [H, W, 3], got {image.shape}"
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    heat = np.asarray(heat, dtype=np.float64)
    assert heat.ndim == 2, f"heat must be [h, w], got {heat.shape}"
    if heat.shape != image.shape[:2]:
        heat = F.interpolate(torch.from_numpy(heat)[None, None], size=image.shape[:2],
                             mode="bilinear", align_corners=False)[0, 0].numpy()
    colour = mpl.colormaps[cmap](_normalise(heat, vmin, vmax))[:, :, :3] * 255  # [H, W, 3]
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_heatmap_panel(path: str | os.PathLike, image: np.ndarray, reconstruction: np.ndarray,
                       heat: np.ndarray, title: str, *, cmap: str = "inferno",
                       alpha: float = 0.5) -> None:
    """PNG with three panels: input | reconstruction | heat-map overlay (with a colour bar).

    image, reconstruction: uint8 [H, W, 3] (or [H, W]); heat: [h, w] residual values.
    """
    heat = np.asarray(heat, dtype=np.float64)
    lo, hi = float(heat.min()), float(heat.max())
    with new_figure(path, ncols=3, figsize=(11, 4.2)) as (fig, axes):
        gray = {"cmap": "gray"} if np.asarray(image).ndim == 2 else {}
        axes[0].imshow(image, **gray)
        axes[1].imshow(reconstruction, **gray)
        axes[2].imshow(overlay(image, heat, alpha=alpha, cmap=cmap))
        for ax, name in zip(axes, ("input", "reconstruction G(E(x))", "residual overlay")):
            ax.set_title(name)
            ax.axis("off")
        scale = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(lo, hi if hi > lo else lo + 1),
                                      cmap=cmap)
        fig.colorbar(scale, ax=axes[2], fraction=0.046, pad=0.04, label="residual")
        fig.suptitle(title, fontweight="bold")
