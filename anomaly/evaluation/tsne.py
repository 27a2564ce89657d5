"""Latent-space t-SNE (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE", JMLR 9).

The encoder's codes E(x) of normal and anomalous images are embedded in 2-D with scikit-learn's
Barnes-Hut t-SNE (PCA initialisation, automatic learning rate) and drawn coloured by class.
Computing the codes needs the networks and is done by the caller (the `tsne` command); this
module takes plain arrays.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from stylegan.errors import UserError

from anomaly.evaluation import sheets
from anomaly.evaluation.plots import class_palette, new_figure

MIN_POINTS = 5
SMALL_PROBLEM = 1000  # below this many points t-SNE runs single-threaded


def tsne_embedding(latents: np.ndarray, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates of latents [N, D] (W+ codes [N, K, D] are flattened). -> [N, 2].

    The perplexity must stay below the number of points; following the original implementation's
    limit (N - 1 >= 3 * perplexity) it is lowered to (N - 1) / 3 with a warning when needed.
    """
    x = np.asarray(latents, dtype=np.float64)
    x = x.reshape(x.shape[0], -1) if x.ndim > 2 else x  # [N, D] or [N, K * D]
    assert x.ndim == 2, f"expected latents [N, D], got {x.shape}"
    n = x.shape[0]
    if n < MIN_POINTS:
        raise UserError(f"t-SNE needs at least {MIN_POINTS} images, got {n}; encode more images.")
    if perplexity <= 0:
        raise UserError(f"--perplexity {perplexity} must be positive (typical: 5 to 50).")
    limit = (n - 1) / 3
    if perplexity > limit:
        warnings.warn(f"perplexity {perplexity:g} is too large for {n} points; using {limit:g}",
                      stacklevel=2)
        perplexity = limit
    model = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                 random_state=seed)
    # Small problems: OpenMP start-up per gradient step costs more than it saves, and on a busy
    # machine it costs seconds (measured 0.3 s single-threaded vs 5 s with 2 threads, N=40).
    with threadpool_limits(limits=1 if n < SMALL_PROBLEM else None, user_api="openmp"):
        return model.fit_transform(x).astype(np.float64)  # [N, 2]


def plot_tsne(coords: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str, *,
              normal: str | None = None) -> None:
    """Scatter plot of t-SNE coordinates coloured by class (normal first, then by size)."""
    coords = np.asarray(coords)
    assert coords.ndim == 2 and coords.shape[1] == 2, f"expected [N, 2], got {coords.shape}"
    assert len(classes) == len(coords), "one class per point"
    df = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "class": [str(c) for c in classes]})
    counts = df["class"].value_counts()
    order = sorted(counts.index, key=lambda c: (c != normal, -counts[c], c))
    labels = {c: f"{c} (n={counts[c]})" for c in order}
    palette = class_palette(order, normal)
    with new_figure(path, figsize=(7.8, 6.2)) as (fig, ax):
        for cls in order:  # the largest class first, so that small ones stay visible on top
            part = df[df["class"] == cls]
            sns.scatterplot(data=part, x="x", y="y", color=palette[cls], label=labels[cls],
                            s=18 if len(df) > 500 else 32, alpha=0.75, edgecolor="none", ax=ax)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  markerscale=1.5)
        ax.set_title(title)


def write_tsne_sheet(coords: np.ndarray, files: Sequence[str], classes: Sequence[str],
                     splits: Sequence[str], path: str | os.PathLike) -> Path:
    """The embedding as an Excel sheet: file, class, split, tsne_x, tsne_y."""
    coords = np.asarray(coords, dtype=np.float64)
    assert coords.ndim == 2 and coords.shape[1] == 2, f"expected [N, 2], got {coords.shape}"
    if not len(files) == len(classes) == len(splits) == len(coords):
        raise ValueError("coords, files, classes and splits must have the same length")
    df = pd.DataFrame({"file": list(files), "class": list(classes), "split": list(splits),
                       "tsne_x": coords[:, 0], "tsne_y": coords[:, 1]})
    return sheets.write_frames({"tsne": df}, path)
