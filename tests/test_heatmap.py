"""Residual heat maps: hand-computed residuals, upsampling, blending and the panel figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.methods import heatmap


def test_residual_map_by_hand():
    x = torch.zeros(3, 2, 2)
    x_rec = torch.zeros(3, 2, 2)
    x_rec[:, 0, 1] = torch.tensor([1.0, -2.0, 3.0])
    abs_map = heatmap.residual_map(x, x_rec)
    assert abs_map.shape == (2, 2)
    assert abs_map[0, 1] == pytest.approx(2.0) and abs_map.sum() == pytest.approx(2.0)
    sq_map = heatmap.residual_map(x.numpy(), x_rec.numpy(), reduce="square")
    assert sq_map[0, 1] == pytest.approx(14 / 3)
    with pytest.raises(ValueError):
        heatmap.residual_map(x, x_rec, reduce="cube")


def test_feature_residual_upsampled():
    feat = torch.zeros(2, 2, 2)
    feat_rec = torch.zeros(2, 2, 2)
    feat_rec[:, 1, 1] = 2.0  # squared residual 4 in the bottom-right cell
    up = heatmap.upsample_feature_residual(feat, feat_rec, 8)
    assert up.shape == (8, 8)
    assert up[7, 7] == pytest.approx(4.0) and up[0, 0] == pytest.approx(0.0)
    assert up[6:, 6:].mean() > up[:2, :2].mean()
    constant = heatmap.upsample_feature_residual(feat, feat + 1.0, (4, 6))
    assert constant.shape == (4, 6) and np.allclose(constant, 1.0)


def test_overlay_blends_colour_map():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    heat = np.zeros((2, 2))
    heat[0, 0] = 1.0
    out = heatmap.overlay(image, heat, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3) and (out == 100).all()
    full = heatmap.overlay(image, np.array([[0.0, 1.0]]), alpha=1.0, cmap="gray")
    assert full.shape == (4, 4, 3)
    assert (full[:, 0] < full[:, 3]).all()  # left cold (dark), right hot (bright)
    assert full[0, 0, 0] == 0 and full[0, 3, 0] == 255
    half = heatmap.overlay(image[:, :, 0], np.ones((4, 4)), alpha=0.5, cmap="gray")
    assert (half == 50).all()  # constant map -> cold (0) -> 0.5 * 100 + 0.5 * 0


def test_panel_png(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    rec = np.clip(image.astype(int) + 20, 0, 255).astype(np.uint8)
    heat = heatmap.residual_map(image.transpose(2, 0, 1) / 255.0, rec.transpose(2, 0, 1) / 255.0)
    path = tmp_path / "heatmaps" / "ISIC_1.png"
    heatmap.save_heatmap_panel(path, image, rec, heat, "ISIC_1 (mel): score 0.12")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > img.height > 100
