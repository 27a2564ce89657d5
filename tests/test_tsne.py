"""t-SNE helpers: separation of obvious clusters, perplexity clipping, plot and sheet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomaly.evaluation import tsne
from stylegan.errors import UserError


def _clusters(n: int = 20, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.1, size=(n, d))
    b = rng.normal(5.0, 0.1, size=(n, d))
    return np.concatenate([a, b]), ["nv"] * n + ["mel"] * n


def test_embedding_separates_two_clusters_and_is_seeded():
    x, classes = _clusters()
    coords = tsne.tsne_embedding(x, perplexity=5, seed=0)
    assert coords.shape == (40, 2)
    ca, cb = coords[:20], coords[20:]
    gap = np.linalg.norm(ca.mean(0) - cb.mean(0))
    spread = max(np.linalg.norm(ca - ca.mean(0), axis=1).max(),
                 np.linalg.norm(cb - cb.mean(0), axis=1).max())
    assert gap > 2 * spread  # the two groups do not mix
    assert np.allclose(coords, tsne.tsne_embedding(x, perplexity=5, seed=0))


def test_wplus_latents_are_flattened():
    x, _ = _clusters(n=6, d=4)
    assert tsne.tsne_embedding(x.reshape(12, 2, 2), perplexity=3).shape == (12, 2)


def test_perplexity_clipped_with_warning_and_tiny_sets_refused():
    x, _ = _clusters(n=5)  # 10 points -> limit (10 - 1) / 3 = 3
    with pytest.warns(UserWarning, match="using 3"):
        assert tsne.tsne_embedding(x, perplexity=30).shape == (10, 2)
    with pytest.raises(UserError, match="at least 5"):
        tsne.tsne_embedding(x[:4])
    with pytest.raises(UserError, match="perplexity"):
        tsne.tsne_embedding(x, perplexity=0)


def test_plot_and_sheet(tmp_path):
    x, classes = _clusters(n=10)
    coords = tsne.tsne_embedding(x, perplexity=5)
    png = tmp_path / "tsne.png"
    tsne.plot_tsne(coords, classes, png, "t-SNE of W codes", normal="nv")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 300
        lo, hi = img.convert("L").getextrema()
        assert lo < hi
    files = [f"f{i}.png" for i in range(20)]
    splits = ["test"] * 20
    sheet = tsne.write_tsne_sheet(coords, files, classes, splits, tmp_path / "tsne.xlsx")
    df = pd.read_excel(sheet)
    assert list(df.columns) == ["file", "class", "split", "tsne_x", "tsne_y"]
    assert np.allclose(df[["tsne_x", "tsne_y"]].to_numpy(), coords)
    assert df["class"].tolist() == classes
    with pytest.raises(ValueError):
        tsne.write_tsne_sheet(coords, files[:3], classes, splits, tmp_path / "bad.xlsx")
