"""The dark circular field-of-view border of a dermatoscope: found in an image (`fov_circle`)
and filled with the skin colour just inside it (`fill_fov_border`, the policy's border 'fill').

Used by the preprocessing policy (anodata.policy) and by the lesion finder (anodata.lesion),
which sets the border aside before it looks for the lesion.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

DARK = 40.0  # luminance (0-255) below which a pixel counts as part of a dark border
# A grey border (a vignette shading into grey rather than black, as in PH2) is looked for with
# the dark level FOV_DARK_SHARE x the skin's luminance when no black one is found.
FOV_DARK_SHARE = 0.55
# One dark corner is enough (an off-centre field of view often darkens one corner only): the
# circle fit then tells a border (dark outside a bright disc) from a dark lesion in a corner
# (dark inside its own round edge).
FOV_CORNERS = 1
FOV_MIN_OUTSIDE = 0.002  # smallest share of the image outside the circle (the corners' wedges)
FOV_TOLERANCE = 0.03  # boundary points within this share of the short side lie on the circle
FOV_INLIERS = 0.7  # share of the boundary points that must lie on the fitted circle


def _luminance(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> float32 luminance [H, W] (ITU-R BT.601 weights)."""
    a = image.astype(np.float32)
    return a @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if a.ndim == 3 else a


def find_fov(lum: np.ndarray, *, purity: float = 0.9
         ) -> tuple[float, float, float, np.ndarray, float] | None:
    """(centre x, centre y, radius, distance of every pixel from the centre [H, W], dark level)
    of a dark circular field-of-view border in a luminance image, or None (see fov_circle):
    looked for with the dark level DARK (a black border), then with dark_level (a grey one)."""
    found = _fov_at(lum, DARK, purity=purity)
    level = dark_level(lum)
    if found is None and level > DARK:
        found = _fov_at(lum, level, purity=purity)
    return found


def _fov_at(lum: np.ndarray, level: float, *, purity: float
            ) -> tuple[float, float, float, np.ndarray, float] | None:
    """find_fov with pixels darker than `level` as the dark ones."""
    isdark = lum < level  # [H, W]
    h, w = isdark.shape
    if isdark.all() or not isdark.any():
        return None
    k = max(2, min(h, w) // 20)  # corner patch
    corners = (isdark[:k, :k], isdark[:k, -k:], isdark[-k:, :k], isdark[-k:, -k:])
    if sum(c.mean() >= 0.5 for c in corners) < FOV_CORNERS:  # mostly dark corner patches
        return None
    labels, _count = ndimage.label(isdark)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outer = np.isin(labels, np.unique(edge[edge > 0]))  # dark regions that reach an edge
    # the boundary: bright pixels 4-adjacent to that outer dark region
    cross = ndimage.generate_binary_structure(2, 1)
    points = ~isdark & ndimage.binary_dilation(outer, structure=cross)
    circle = _fit_circle(*np.nonzero(points), tolerance=max(1.5, FOV_TOLERANCE * min(h, w)))
    if circle is None:
        return None
    cy, cx, radius = circle
    if not (0 <= cx < w and 0 <= cy < h and min(h, w) / 4 < radius <= max(h, w)):
        return None
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx)
    outside = dist > radius
    beyond = dist > radius + 1  # past the pixel of shading at the border's edge
    if outside.mean() < FOV_MIN_OUTSIDE or not beyond.any() or isdark[beyond].mean() < purity \
            or isdark[~outside].mean() > 0.5:
        return None
    return float(cx), float(cy), radius, dist, level


def dark_level(lum: np.ndarray) -> float:
    """The luminance below which a pixel belongs to a grey field-of-view border: DARK, or
    FOV_DARK_SHARE of the skin's luminance (the 75th percentile) where that is higher."""
    return max(DARK, FOV_DARK_SHARE * float(np.percentile(lum, 75)))


def _fit_circle(ys: np.ndarray, xs: np.ndarray, *, tolerance: float
                ) -> tuple[float, float, float] | None:
    """(centre y, centre x, radius) of the circle through most of the points, or None.

    The algebraic least-squares fit of x^2 + y^2 + a x + b y + c = 0 (Kasa 1976), refitted
    twice to the points within `tolerance` of the circle (a lesion's edge or hair that touches
    the border is left out); None when fewer than FOV_INLIERS of the points end on the circle.
    """
    if len(xs) < 8:
        return None
    x, y = xs.astype(np.float64), ys.astype(np.float64)
    keep = np.ones(len(x), bool)
    for _ in range(3):
        if keep.sum() < 8:
            return None
        design = np.stack([x[keep], y[keep], np.ones(keep.sum())], axis=1)  # [n, 3]
        (a, b, c), *_ = np.linalg.lstsq(design, -(x[keep] ** 2 + y[keep] ** 2), rcond=None)
        cx, cy = -a / 2, -b / 2
        r2 = cx * cx + cy * cy - c
        if r2 <= 0:
            return None
        radius = float(np.sqrt(r2))
        keep = np.abs(np.hypot(x - cx, y - cy) - radius) <= tolerance
    if keep.mean() < FOV_INLIERS:
        return None
    return float(cy), float(cx), radius + 0.5  # the bright boundary pixels lie half a pixel in


def fov_circle(image: np.ndarray) -> tuple[float, float, float] | None:
    """(centre x, centre y, radius) of a dark circular field-of-view border, or None.

    uint8 [H, W] or [H, W, C]. Dark means luminance below DARK or, when no border is found so,
    below dark_level (a grey vignette). The border may be a whole ring, a circle larger than
    the frame (cut by the image edges) or off-centre: the circle is fitted (_fit_circle) to the
    bright pixels next to the dark regions that reach an image edge. It counts only when at
    least FOV_CORNERS corner patch is mostly dark, FOV_INLIERS of the boundary points lie on
    the circle, its centre is inside the image and its radius between a quarter of the short
    side and the long side, at least FOV_MIN_OUTSIDE of the image lies outside it, at least 90%
    of that outside (one pixel past the circle) is dark and at most half of the inside; so a
    dark lesion that reaches one edge (dark inside its round edge), black padding bars (straight
    edges) and an all-dark image are left alone.
    """
    found = find_fov(_luminance(image))
    return None if found is None else found[:3]


def fill_fov_border(img: Image.Image, *, margin: float = 0.03) -> Image.Image:
    """The image with its dark circular field-of-view border (fov_circle), from `margin` of
    the side inside the circle outwards, filled with the median colour of the non-dark pixels
    in the ring two margins wide just inside that; unchanged when there is no such border."""
    a = np.array(img)  # [H, W] or [H, W, C], a copy
    lum = _luminance(a)
    found = find_fov(lum)
    if found is None:
        return img
    _cx, _cy, radius, dist, level = found
    m = max(1.0, margin * min(a.shape[:2]))
    ring = (dist > radius - 3 * m) & (dist <= radius - m) & (lum >= level)
    if not ring.any():
        return img
    a[dist > radius - m] = np.median(a[ring], axis=0).round().astype(np.uint8)
    return Image.fromarray(a, mode=img.mode)
