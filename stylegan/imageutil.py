"""Image conversions shared by generation, training snapshots and reconstruction grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylegan.fileio import atomic_path


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """Network output [N, C, H, W] in about [-1, 1] -> uint8 [N, H, W, C] (official rounding)."""
    assert img.ndim == 4, f"expected [N, C, H, W], got {tuple(img.shape)}"
    out = (img.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, C]


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float32 in [-1, 1] as the networks expect."""
    return images.to(torch.float32) / 127.5 - 1


def save_image(array_hwc: np.ndarray, path: str | Path) -> None:
    """Save one uint8 [H, W, C] image (C = 1 or 3) as PNG, atomically."""
    mode_array = array_hwc[:, :, 0] if array_hwc.shape[2] == 1 else array_hwc
    with atomic_path(path) as tmp:
        Image.fromarray(mode_array).save(tmp, format="PNG")


def make_grid(images_nhwc: np.ndarray, *, cols: int | None = None) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows*H, cols*W, C] image (row-major order)."""
    n, h, w, c = images_nhwc.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = images_nhwc[i]
    return grid


def save_grid(images_nhwc: np.ndarray, path: str | Path, *, cols: int | None = None) -> None:
    """Save uint8 images [N, H, W, C] as one tiled PNG, atomically."""
    save_image(make_grid(images_nhwc, cols=cols), path)
