"""Pure score functions of the tuned detector (anomaly/methods/detector.py): residual aggregations,
normalised multi-layer feature residuals, density in learned spaces, test-time augmentation
over the dihedral group and rank averaging. Tensors/arrays in, tensors/arrays out; no I/O.

- Residual aggregations of the per-pixel squared residual r(p) = 1/C sum_c (x - G(E(x)))^2:
  its mean (= the izif pixel term A_R), its 99th percentile, and the maximum of r smoothed by
  a Gaussian of `sigma` pixels ("where the residual is, not just how big on average").
- Residual normalised by lesion extent, with M the lesion mask of the input image (anodata.lesion
  on the uint8 fitted image; with TTA each view gets the mask's view) and the same r(p):
  lesion:mean  = sum_p M(p) r(p) / sum_p M(p)              (residual per lesion pixel)
  lesion:edge  = mean of r over B = dilate(M, w) & ~erode(M, w), the lesion's border zone: w =
                 max(1, round(3 H / 64)) pixels (3 at 64 px), square structuring element of side
                 2w + 1, pixels beyond the image neither add to nor cut the mask
  lesion:ratio = (mean of r inside M) / max(mean of r outside M, 1e-12)
  An image where no lesion is found (M empty) falls back to the whole image: lesion:mean and
  lesion:edge become residual:mean, lesion:ratio becomes 1 (as when M covers every pixel);
  lesion:edge also falls back when its zone B is empty.
- izif taken off the lesion's area: with a(x) = sum_p M(p) / (H W), the share of the fitted
  image's pixels in its lesion mask, and z(x) = log max(izif_kappa(x), 1e-12):
  izif-areafree:KAPPA[:LAYER] = z(x) - b log a(x), where b is the least-squares slope of z on
  log a over the bank's training naevi with a lesion found (no label is used). An image
  without a lesion found takes the bank naevi's median log a. A bank with fewer than 3 naevi
  with a lesion, or all of one area, has no trend: b = 0 (with a warning), and the score ranks
  as izif:KAPPA. A score that grows with the
  lesion's size among naevi keeps its rank within one size and loses the size itself.
- Normalised feature residual over D layers l: sum_l mean_{c,h,w} ((f_l(x) - f_l(G(E(x))))_c
  / sd_{l,c})^2, with sd_{l,c} the spread of channel c of layer l over the training naevi
  (images and positions), so that layers of different scale add up.
- Density in a learned space (E's codes, or D features pooled over positions): the embedding is
  standardised by the bank's mean and s.d. per dimension, projected on the bank's first d
  principal components (fitted on training naevi), and scored by the mean Euclidean distance to
  its k nearest bank points (k-NN), or by its Mahalanobis distance to the bank's Gaussian in
  that d-dimensional space (sum of squared projections over the eigenvalues; Rippel et al.
  2020, "Modeling the distribution of normal data in pre-trained deep features").
- TTA: the 8 symmetries of the square (rot90^k, k = 0..3, each with and without a left-right
  mirror). Scores are averaged over the 8 views; for the density scores the EMBEDDING is
  averaged over the views (and the bank holds view-averaged training embeddings), so either
  way a rotated or mirrored image gets the same score as the original.
- Rank average: each score becomes its percentile among validation normals (linear
  interpolation between sorted scores at plotting positions (i + 0.5) / M, clipped to [0, 100]),
  so a single image can be scored; the combination is the mean of those percentiles.
- One image's answer (`decide`, `weak_percentile`): the one rule of every entry point (the
  Python API's `judge`, serve): a score that is not a finite number gets no percentile and no
  decision; NonFiniteScore is raised, naming the cause.

Shape letters: N images, C channels, H/W height/width, F feature dims, M bank points, d PCA dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stylegan.errors import UserError

N_VIEWS = 8


# ------------------------------------------------------------------------------ TTA


def dihedral_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View `view` (0..7) of images [N, C, H, W]: rot90^(view % 4), mirrored when view >= 4.
    View 0 is the identity."""
    assert 0 <= view < N_VIEWS and x.ndim == 4 and x.shape[2] == x.shape[3], (view, x.shape)
    y = torch.flip(x, dims=(3,)) if view >= 4 else x
    return torch.rot90(y, view % 4, dims=(2, 3)) if view % 4 else y


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """All 8 views stacked along the batch: [N, C, H, W] -> [8 * N, C, H, W] (view-major)."""
    return torch.cat([dihedral_view(x, v) for v in range(N_VIEWS)])


def view_mean(values: torch.Tensor, n_views: int) -> torch.Tensor:
    """Mean over views of a view-major batch: [V * N, ...] -> [N, ...]."""
    return values.reshape(n_views, -1, *values.shape[1:]).mean(dim=0)


# ------------------------------------------------------------------------------ residuals


def residual_map(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared residual averaged over channels: [N, C, H, W] x2 -> [N, H, W]."""
    assert x.shape == x_rec.shape and x.ndim == 4, (x.shape, x_rec.shape)
    return (x.float() - x_rec.float()).square().mean(dim=1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of s.d. `sigma` pixels, radius ceil(3 sigma): [2r + 1]."""
    assert sigma > 0, sigma
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of maps [N, H, W] with reflected borders -> [N, H, W]."""
    k = gaussian_kernel(sigma).to(maps.device)
    r = (len(k) - 1) // 2
    y = maps[:, None].float()  # [N, 1, H, W]
    mode = "reflect" if r < min(maps.shape[1:]) else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return y[:, 0]


def aggregate_residual(maps: torch.Tensor, how: str, sigma: float = 2.0) -> torch.Tensor:
    """Residual maps [N, H, W] -> [N]: 'mean', 'p99' (99th percentile, linear interpolation)
    or 'smax' (maximum of the map smoothed with a Gaussian of `sigma` pixels)."""
    flat = maps.flatten(1).float()  # [N, H*W]
    if how == "mean":
        return flat.mean(dim=1)
    if how == "p99":
        return torch.quantile(flat, 0.99, dim=1)
    if how == "smax":
        return gaussian_smooth(maps, sigma).flatten(1).amax(dim=1)
    raise ValueError(f"unknown residual aggregation {how!r}")


def border_zone(masks: torch.Tensor, width: int) -> torch.Tensor:
    """dilate(M, width) & ~erode(M, width) with a square of side 2 width + 1; pixels beyond the
    image are ignored (neither mask nor background): bool [N, H, W] -> bool [N, H, W]."""
    assert masks.ndim == 3 and width >= 1, (masks.shape, width)
    m = masks[:, None].float()  # [N, 1, H, W]
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width) > 0.5
    eroded = F.max_pool2d(1 - m, k, stride=1, padding=width) < 0.5
    return (dilated & ~eroded)[:, 0]


def lesion_residual(maps: torch.Tensor, masks: torch.Tensor, how: str) -> torch.Tensor:
    """Residual maps [N, H, W] and lesion masks bool [N, H, W] -> [N]: 'mean', 'edge' or
    'ratio' (module docstring; an empty mask falls back to the whole image)."""
    assert maps.shape == masks.shape and maps.ndim == 3, (maps.shape, masks.shape)
    r = maps.double()
    found = masks.flatten(1).any(dim=1)  # [N]
    m = torch.where(found[:, None, None], masks, torch.ones_like(masks)).double()

    def masked_mean(weights: torch.Tensor) -> torch.Tensor:
        return (r * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1)

    if how == "mean":
        return masked_mean(m)
    if how == "edge":
        zone = border_zone(m > 0.5, max(1, round(3 * maps.shape[1] / 64))).double()
        empty = zone.flatten(1).sum(1) == 0
        return torch.where(empty, r.flatten(1).mean(1), masked_mean(zone))
    if how == "ratio":
        inside, outside = masked_mean(m), masked_mean(1 - m)
        whole = (1 - m).flatten(1).sum(1) == 0  # no lesion found, or it covers every pixel
        return torch.where(whole, torch.ones_like(inside), inside / outside.clamp_min(1e-12))
    raise ValueError(f"unknown lesion aggregation {how!r}")


def lesion_area(masks: torch.Tensor) -> torch.Tensor:
    """Share of each image's pixels in its lesion mask: bool [N, H, W] -> float64 [N]."""
    return masks.flatten(1).double().mean(dim=1)


AREA_SCORE_FLOOR = 1e-12  # log of a perfect reconstruction's score (0): the most normal


@dataclass(frozen=True)
class AreaTrend:
    """A least-squares line of log score on the log of the lesion's size (its area for
    izif-areafree): its slope, and the median log size an image without a lesion found takes."""

    slope: float
    median_log_area: float


def log_score(scores: np.ndarray) -> np.ndarray:
    """log max(score, AREA_SCORE_FLOOR): [N] -> float64 [N] (NaN stays NaN)."""
    return np.log(np.maximum(np.asarray(scores, np.float64), AREA_SCORE_FLOOR))


def _present(x: np.ndarray) -> np.ndarray:
    """bool [N]: the sizes x [N] that were measured (> 0; 0 or NaN: no lesion found)."""
    return np.nan_to_num(np.asarray(x, np.float64), nan=0.0) > 0


def fit_log_trend(z: np.ndarray, x: np.ndarray, *,
                  fix: str = "give a larger train.zip or --bank-size") -> AreaTrend:
    """The least-squares slope of z [M] on log x [M] over the training naevi whose size x was
    measured (x > 0) and whose z is finite, and their median log x; fewer than 3 of them or a
    single size ends in one sentence that ends with `fix`."""
    z = np.asarray(z, np.float64)
    ok = _present(x) & np.isfinite(z)
    log_x = np.log(np.asarray(x, np.float64)[ok])
    if ok.sum() < 3 or np.ptp(log_x) == 0:
        raise UserError(f"Only {int(ok.sum())} training naevi have a lesion of their own size; "
                        f"a size trend needs more ({fix}).")
    slope = np.polyfit(log_x, z[ok], 1)[0]
    return AreaTrend(float(slope), float(np.median(log_x)))


def detrend(z: np.ndarray, x: np.ndarray, trend: AreaTrend) -> np.ndarray:
    """z - slope * log x, with the trend's median log x where x was not measured: [N] x2 ->
    float64 [N]."""
    here = _present(x)
    log_x = np.where(here, np.log(np.where(here, np.asarray(x, np.float64), 1.0)),
                     trend.median_log_area)
    return np.asarray(z, np.float64) - trend.slope * log_x


def fit_area_trend(scores: np.ndarray, areas: np.ndarray) -> AreaTrend:
    """The AreaTrend of training naevi's scores [M] and lesion areas [M] (area 0: no lesion
    found, not in the fit): fit_log_trend of log_score."""
    return fit_log_trend(log_score(scores), areas)


def area_free(scores: np.ndarray, areas: np.ndarray, trend: AreaTrend) -> np.ndarray:
    """izif-areafree from scores [N] and lesion areas [N]: detrend of log_score."""
    return detrend(log_score(scores), areas, trend)


def channel_residual(feat: torch.Tensor, feat_rec: torch.Tensor) -> torch.Tensor:
    """Squared feature residual per channel, averaged over positions: [N, c, h, w] -> [N, c]."""
    assert feat.shape == feat_rec.shape and feat.ndim == 4, (feat.shape, feat_rec.shape)
    return (feat.float() - feat_rec.float()).square().mean(dim=(2, 3))


def normalised_feature_residual(channel_res: list[torch.Tensor],
                                spreads: list[torch.Tensor]) -> torch.Tensor:
    """sum over layers of mean_c channel_res[l][:, c] / sd[l][c]^2: ([N, c_l], [c_l]) -> [N]."""
    assert len(channel_res) == len(spreads) and channel_res
    total = torch.zeros(channel_res[0].shape[0], dtype=torch.float64)
    for res, sd in zip(channel_res, spreads):
        assert res.shape[1:] == sd.shape, (res.shape, sd.shape)
        total += (res.double().cpu() / sd.double().cpu().clamp_min(1e-8).square()).mean(dim=1)
    return total


def pooled_features(feat: torch.Tensor) -> torch.Tensor:
    """Features pooled over positions: [N, c, h, w] -> [N, c] (mean)."""
    return feat.float().mean(dim=(2, 3))


# ------------------------------------------------------------------------------ density


@dataclass(frozen=True)
class Space:
    """A learned space fitted on training naevi: standardisation, PCA and the bank points."""

    mean: torch.Tensor  # [F]
    sd: torch.Tensor  # [F]
    components: torch.Tensor  # [d, F] principal axes (rows), of the standardised embedding
    eigenvalues: torch.Tensor  # [d] variances along the axes
    bank: torch.Tensor  # [M, d] projected training embeddings (float16 when stored)

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, F] -> [N, d]."""
        assert emb.ndim == 2 and emb.shape[1] == self.mean.shape[0], (emb.shape, self.mean.shape)
        z = (emb.float() - self.mean) / self.sd
        return z @ self.components.T


def fit_space(train_emb: torch.Tensor, *, dims: int, bank_size: int, seed: int) -> Space:
    """Standardise, fit PCA (d = min(dims, F, M - 1)) on all training embeddings [M, F], and
    keep a seeded subset of at most `bank_size` projected points as the bank."""
    emb = train_emb.double()
    mean, sd = emb.mean(dim=0), emb.std(dim=0).clamp_min(1e-6)
    z = (emb - mean) / sd  # [M, F]
    d = max(1, min(dims, z.shape[1], z.shape[0] - 1))
    _u, s, vh = torch.linalg.svd(z - z.mean(dim=0), full_matrices=False)
    components = _fixed_signs(vh[:d])  # [d, F]
    eigenvalues = (s[:d] ** 2 / max(1, z.shape[0] - 1)).clamp_min(1e-12)
    keep = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:bank_size]
    bank = (z[keep.sort().values] @ components.T).float()
    return Space(mean.float(), sd.float(), components.float(), eigenvalues.float(), bank)


def _fixed_signs(vh: torch.Tensor) -> torch.Tensor:
    """Principal axes with a deterministic sign (largest |entry| positive)."""
    idx = vh.abs().argmax(dim=1)
    signs = torch.sign(vh[torch.arange(len(vh)), idx])
    return vh * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each query [N, d] to its k nearest bank points [M, d]: [N]."""
    assert 1 <= k <= bank.shape[0], (k, bank.shape)
    dist = torch.cdist(queries.double(), bank.double())  # [N, M]
    return dist.topk(k, dim=1, largest=False).values.mean(dim=1)


def mahalanobis(projected: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance in the PCA space: sqrt(sum_j p_j^2 / lambda_j): [N, d] -> [N]."""
    return (projected.double().square() / eigenvalues.double()).sum(dim=1).sqrt()


# ------------------------------------------------------------------------------ percentiles


def percentile_among(scores: np.ndarray, reference_sorted: np.ndarray) -> np.ndarray:
    """Percentile (0..100) of each score among sorted reference scores [M]: linear interpolation
    between the order statistics at plotting positions (i + 0.5) / M, clipped at the ends."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    assert ref.ndim == 1 and len(ref) > 0 and np.all(np.diff(ref) >= 0), "reference must be sorted"
    positions = 100.0 * (np.arange(len(ref)) + 0.5) / len(ref)
    # np.interp needs increasing x: ties get the mean position of their run
    unique, inverse = np.unique(ref, return_inverse=True)
    mean_pos = np.bincount(inverse, weights=positions) / np.bincount(inverse)
    if len(unique) == 1:
        return np.where(np.asarray(scores) < unique[0], 0.0,
                        np.where(np.asarray(scores) > unique[0], 100.0, 50.0))
    return np.interp(np.asarray(scores, dtype=np.float64), unique, mean_pos, left=0.0, right=100.0)


def rank_average(scores: list[np.ndarray], references: list[np.ndarray]) -> np.ndarray:
    """Mean over components of each score's percentile among its validation normals: [N]."""
    assert len(scores) == len(references) and scores
    return np.mean([percentile_among(s, r) for s, r in zip(scores, references)], axis=0)


class NonFiniteScore(UserError):
    """A score that is not a finite number (NaN or infinity): no percentile, no decision."""


def check_finite_score(score: float, *, image: str = "the image") -> float:
    """`score` as a float when it is finite; NonFiniteScore (one sentence) otherwise. NaN would
    compare as 'normal' with any threshold and +inf would rank at the 100th percentile: a model
    that cannot score must never answer either."""
    value = float(score)
    if not math.isfinite(value):
        raise NonFiniteScore(f"The model gave a non-finite score ({value}) for {image}, so it "
                             f"gives no percentile and no decision; its network or encoder "
                             f"weights overflow or are damaged: check or replace those files.")
    return value


def refuse_non_finite(scores: dict[str, np.ndarray], *, command: str, outputs: str) -> None:
    """The batch commands' form of the rule: NonFiniteScore (one sentence: how many images,
    from which methods) when any image has a non-finite score in {method: [N]}; the command
    then writes none of its `outputs`."""
    bad = {name: ~np.isfinite(np.asarray(v, dtype=np.float64).reshape(-1))
           for name, v in scores.items()}
    rows = np.any(np.stack(list(bad.values())), axis=0)  # [N]
    if not rows.any():
        return
    names = [name for name, b in bad.items() if b.any()]
    which = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise NonFiniteScore(f"{int(rows.sum())} of {len(rows)} images got a non-finite score (NaN "
                         f"or infinity) from {which}, so {command} wrote no {outputs}; the "
                         f"network or encoder weights overflow or are damaged (or the method "
                         f"is undefined for these images): check those files, or leave the "
                         f"method out.")


def decide(score: float, threshold: float, *, image: str = "the image") -> str:
    """'anomalous' when score >= threshold, else 'normal'; NonFiniteScore for a non-finite
    score."""
    return "anomalous" if check_finite_score(score, image=image) >= threshold else "normal"


def weak_percentile(score: float, reference_sorted: np.ndarray, *,
                    image: str = "the image") -> float:
    """100 * (number of reference scores <= score) / M (serve's percentile of rank);
    NonFiniteScore for a non-finite score."""
    score = check_finite_score(score, image=image)
    ref = np.asarray(reference_sorted, dtype=np.float64)
    return float(100.0 * np.searchsorted(ref, score, side="right") / len(ref))
