"""Anomaly scores: one pure function per method, plus a streaming table that collects them.

izif (Schlegl et al. 2019, "f-AnoGAN: Fast unsupervised anomaly detection with generative
adversarial networks", Medical Image Analysis 54, eq. 8-9):
    A(x) = A_R(x) + kappa * A_D(x),
    A_R(x) = 1/n   * ||x - G(E(x))||^2              (n pixels x channels)
    A_D(x) = 1/n_d * ||f(x) - f(G(E(x)))||^2        (f: discriminator features, n_d elements)
Plain image distances (scikit-learn metrics, torch Euclidean) and the distance of the encoded
latent from the generator's average latent `w_avg` are offered beside it. Method names are
parsed by anomaly.methods.registry.

Convention for every score: higher means more anomalous.
Shape letters: N images, C channels, H/W height/width, K number of style vectors, D w_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import pairwise

from stylegan.errors import UserError

# Metrics that compare two real-valued images without any data-set-level parameter.
SKLEARN_METRICS: tuple[str, ...] = (
    "braycurtis", "canberra", "chebyshev", "cityblock", "correlation", "cosine", "euclidean",
    "hamming", "l1", "l2", "manhattan", "minkowski", "nan_euclidean", "sqeuclidean",
)
# Metrics scikit-learn knows but that make no sense between one image and its reconstruction.
_REFUSED_METRICS: dict[str, str] = {
    **dict.fromkeys(
        ("dice", "jaccard", "matching", "rogerstanimoto", "russellrao", "sokalsneath", "yule"),
        "it is a boolean metric and would cast pixel values to True/False",
    ),
    "haversine": "it is defined for 2-D coordinates only",
    "mahalanobis": "it needs a covariance estimated over a whole data set, not one image pair",
    "seuclidean": "it needs variances estimated over a whole data set, not one image pair",
    "precomputed": "it expects a distance matrix, not images",
}


@dataclass
class Forward:
    """One forward pass of a batch: everything any score method needs."""

    x: torch.Tensor  # [N, C, H, W] in [-1, 1]
    ws: torch.Tensor | None  # [N, K, D] (None without encoder)
    rec: torch.Tensor | None  # [N, C, H, W] G(E(x))
    feat: torch.Tensor | None  # D features of x (None when no method needs them)
    feat_rec: torch.Tensor | None  # D features of G(E(x))


def _check_pair(x: torch.Tensor, x_rec: torch.Tensor, what: str) -> None:
    if x.shape != x_rec.shape:
        raise ValueError(f"{what} shapes differ: {tuple(x.shape)} vs {tuple(x_rec.shape)}")
    if x.ndim < 2:
        raise ValueError(f"{what} need a batch axis, got shape {tuple(x.shape)}")


def izif_terms(x: torch.Tensor, x_rec: torch.Tensor, feat: torch.Tensor | None,
               feat_rec: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """izif's two terms per image, (A_R [N], A_D [N]): the mean squared residual over pixels
    and over feature elements. x, x_rec: [N, C, H, W]; feat, feat_rec: [N, ...] (any feature
    shape), or None for a zero feature term. Gradients flow (training minimises their mean)."""
    _check_pair(x, x_rec, "images")
    residual = (x - x_rec).float().square().flatten(1).mean(dim=1)  # [N]
    if feat is None:
        return residual, torch.zeros_like(residual)
    _check_pair(feat, feat_rec, "features")
    assert x.shape[0] == feat.shape[0], "images and features hold a different number of rows"
    return residual, (feat - feat_rec).float().square().flatten(1).mean(dim=1)  # [N]


def izif_combine(residual: torch.Tensor, discrimination: torch.Tensor, kappa: float
                 ) -> torch.Tensor:
    """izif (eq. 8-9) from its terms: A_R + kappa * A_D (the one place izif adds them)."""
    return residual + kappa * discrimination


def izif_score(
    x: torch.Tensor, x_rec: torch.Tensor, feat: torch.Tensor | None,
    feat_rec: torch.Tensor | None, *, kappa: float = 1.0,
) -> torch.Tensor:
    """f-AnoGAN izif score per image: MSE over pixels + kappa * MSE over feature elements.

    x, x_rec: [N, C, H, W]; feat, feat_rec: [N, ...] (any feature shape; None: no feature
    term). Returns [N].
    """
    return izif_combine(*izif_terms(x, x_rec, feat, feat_rec), kappa)


# izif's kappa: 0.1-10 in practice; beyond 1e6 the pixel term vanishes in float32 rounding.
MAX_KAPPA = 1e6


def check_kappa(kappa: float, *, where: str = "kappa") -> float:
    """`kappa` as a float when it is finite and in [0, MAX_KAPPA]; one sentence otherwise."""
    value = float(kappa)
    if not 0 <= value <= MAX_KAPPA:  # also refuses NaN
        raise UserError(f"{where} {kappa} must be a number in [0, {MAX_KAPPA:g}] (the weight of "
                        f"the feature term of izif).")
    return value


def check_sklearn_metric(metric: str) -> str:
    """Return `metric` if it can compare an image with its reconstruction, else a UserError."""
    if metric in SKLEARN_METRICS:
        return metric
    if metric in _REFUSED_METRICS:
        raise UserError(
            f"The scikit-learn metric '{metric}' cannot score an image pair because "
            f"{_REFUSED_METRICS[metric]}; use one of: {', '.join(SKLEARN_METRICS)}.")
    raise UserError(
        f"Unknown scikit-learn metric '{metric}'; use one of: {', '.join(SKLEARN_METRICS)}.")


def _flat_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)  # [N, C*H*W]


def sklearn_distance(
    x: torch.Tensor | np.ndarray, x_rec: torch.Tensor | np.ndarray, metric: str,
) -> np.ndarray:
    """Distance between each flattened image and its reconstruction with a scikit-learn metric.

    x, x_rec: [N, ...]. Returns float64 [N]. Uses `paired_distances` where scikit-learn has a
    paired form and otherwise `pairwise_distances` one pair at a time (its diagonal, without
    building the N x N matrix).
    """
    check_sklearn_metric(metric)
    a, b = _flat_numpy(x), _flat_numpy(x_rec)  # [N, C*H*W] each
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if metric in pairwise.PAIRED_DISTANCES:
        return pairwise.paired_distances(a, b, metric=metric)
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(a.shape[0]):
        out[i] = pairwise.pairwise_distances(a[i:i + 1], b[i:i + 1], metric=metric)[0, 0]
    return out


def _fast_pixel_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor | None:
    """The scikit-learn metric `metric` between rows of a and b (float64 [N, M]), vectorised;
    None for a metric without a fast form here. Same definitions as scikit-learn/scipy."""
    d = a - b  # [N, M]
    if metric in ("euclidean", "l2", "minkowski"):  # minkowski: scikit-learn's default p = 2
        return d.square().sum(dim=1).sqrt()
    if metric in ("manhattan", "cityblock", "l1"):
        return d.abs().sum(dim=1)
    if metric == "sqeuclidean":
        return d.square().sum(dim=1)
    if metric == "chebyshev":
        return d.abs().amax(dim=1)
    if metric == "cosine":  # paired_cosine_distances: 0.5 ||a/|a| - b/|b|||^2, zero rows stay 0
        def unit(v: torch.Tensor) -> torch.Tensor:
            norm = v.norm(dim=1, keepdim=True)
            return v / torch.where(norm == 0, torch.ones_like(norm), norm)
        return 0.5 * (unit(a) - unit(b)).square().sum(dim=1)
    return None


def pixel_distance(x: torch.Tensor, x_rec: torch.Tensor, metric: str) -> np.ndarray:
    """`sklearn_distance` computed in float64 torch on the images' device where a vectorised
    form exists (the common metrics; checked against scikit-learn in the tests), else by
    scikit-learn itself. Returns float64 [N]."""
    check_sklearn_metric(metric)
    _check_pair(x, x_rec, "images")
    a, b = x.detach().flatten(1).double(), x_rec.detach().flatten(1).double()  # [N, M]
    fast = _fast_pixel_distance(a, b, metric)
    if fast is None:
        return sklearn_distance(a.cpu(), b.cpu(), metric)
    return fast.cpu().numpy()


def torch_euclidean(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between each flattened image and its reconstruction. Returns [N].

    `eps=0` so that the value equals the plain Euclidean distance (the default eps only protects
    gradients at zero distance, and scores need none).
    """
    _check_pair(x, x_rec, "images")
    return F.pairwise_distance(x.flatten(1).float(), x_rec.flatten(1).float(), p=2.0, eps=0.0)


def latent_distance(w: torch.Tensor, w_avg: torch.Tensor) -> torch.Tensor:
    """Distance of each encoded latent from the average latent `w_avg`. Returns [N].

    w: [N, D] (W space) or [N, K, D] (W+ space); w_avg: [D].
    For W+ the K per-style distances are combined as a root mean square,
    sqrt(1/K * sum_k ||w_k - w_avg||^2), so a W+ code whose K rows are all equal to one w scores
    exactly like that w in W space and scores of W and W+ encoders are on one scale.
    """
    if w.ndim == 2:
        w = w.unsqueeze(1)  # [N, 1, D]
    assert w.ndim == 3, f"expected w of shape [N, D] or [N, K, D], got {tuple(w.shape)}"
    assert w_avg.shape == (w.shape[2],), f"w_avg {tuple(w_avg.shape)} vs w {tuple(w.shape)}"
    per_style = (w.float() - w_avg.float()).square().sum(dim=2)  # [N, K]
    return per_style.mean(dim=1).sqrt()


def method_filename(method: str) -> str:
    """File-system-safe stem of a method's score sheet: 'sklearn:cosine' -> 'sklearn-cosine'."""
    return method.replace(":", "-")


class ScoreTable:
    """Collects per-batch scores and row descriptions (never images); one DataFrame per method.

    Rows are described by `file`, `class` (original class name), `split` and the prepared
    dataset's integer `label` (0 normal, >0 other classes); the sheets store the binary
    anomaly label `int(label != 0)`.
    """

    def __init__(self, methods: Sequence[str]):
        self.methods = tuple(methods)
        self._scores: dict[str, list[np.ndarray]] = {m: [] for m in self.methods}
        self._rows: dict[str, list] = {"file": [], "class": [], "split": [], "label": []}
        self._meta: dict[str, dict[int, str]] = {}  # column -> row index -> value (in order seen)

    def __len__(self) -> int:
        return len(self._rows["file"])

    def add(
        self, scores: dict[str, torch.Tensor | np.ndarray], *, files: Sequence[str],
        classes: Sequence[str], splits: Sequence[str], labels: Sequence[int],
        meta: Sequence[dict[str, str]] | None = None,
    ) -> None:
        """Append one batch: `scores[method]` is [B] for every method of the table; `meta[i]`
        holds row i's descriptive columns (e.g. image, group, metadata), strings."""
        n = len(files)
        meta = [{} for _ in range(n)] if meta is None else list(meta)
        if len(meta) != n:
            raise ValueError("meta must have one dict per file")
        if not (len(classes) == len(splits) == len(labels) == n):
            raise ValueError("files, classes, splits and labels must have the same length")
        if set(scores) != set(self.methods):
            raise ValueError(f"expected scores for {self.methods}, got {tuple(scores)}")
        for method, values in scores.items():
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            values = np.asarray(values, dtype=np.float64).reshape(-1)  # [B]
            if values.shape[0] != n:
                raise ValueError(f"{method}: {values.shape[0]} scores for {n} files")
            self._scores[method].append(values)
        self._rows["file"].extend(str(f) for f in files)
        self._rows["class"].extend(str(c) for c in classes)
        self._rows["split"].extend(str(s) for s in splits)
        self._rows["label"].extend(int(label != 0) for label in labels)
        start = len(self._rows["file"]) - n
        for i, row in enumerate(meta):
            for key, value in row.items():
                if key in self._rows or key == "score":
                    raise ValueError(f"meta column {key!r} clashes with a standard column")
                self._meta.setdefault(key, {})[start + i] = str(value)

    def frame(self, method: str) -> pd.DataFrame:
        """Columns score, label (0 normal, 1 anomaly), file, class, split, then the meta
        columns in the order first seen (empty where a row has none)."""
        parts = self._scores[method]
        score = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
        meta = {k: [v.get(i, "") for i in range(len(self))] for k, v in self._meta.items()}
        return pd.DataFrame({"score": score, **{k: list(v) for k, v in self._rows.items()},
                             **meta},
                            columns=["score", "label", "file", "class", "split", *meta]).astype(
            {"label": "int64"})

    def frames(self) -> dict[str, pd.DataFrame]:
        """One DataFrame per method, in the order the methods were given."""
        return {m: self.frame(m) for m in self.methods}
