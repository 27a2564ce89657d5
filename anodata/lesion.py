"""Where the lesion is in a dermoscopy image, without labels.

A rough segmentation in the spirit of the classic dermoscopy pipelines (Celebi et al. 2009,
"Lesion border detection in dermoscopy images", Comput. Med. Imaging Graph. 33(2)): Otsu's
threshold (Otsu 1979) on the luminance of the colour-constant image (shades-of-gray,
anodata.policy), with a dark dermatoscope border set aside, a morphological opening against
hair, the one dark component that is large and central, its holes filled.

Steps of `find_lesion`, on a copy reduced to at most WORK_SIDE pixels on its long side (the mask
is then scaled back to the image's size, so the result hardly depends on the image size):
  1. shades-of-gray, luminance (BT.601), a Gaussian blur of BLUR_SIGMA of the short side;
  2. the border: very dark pixels (luminance < anodata.border.DARK) connected to an image corner
     and the outside of a field-of-view circle (anodata.border.fov_circle), widened by
     BORDER_MARGIN of the short side, are neither skin nor lesion;
  3. Otsu's threshold over the other pixels; darker pixels are lesion candidates;
  4. an opening with a disc of radius OPENING of the short side removes thin dark lines (hair);
  5. each connected component gets the score
         area / (1 + (d / (CENTRE_SCALE * R))^2) * (1 - e)^2,
     with d the mean distance of its pixels from the image centre, R half the short side, and e
     the share of the usable region's outline (image edges, border edge) it lies on: a component
     in a corner needs about seven times the area of a central one to win; a vignette's shading
     (a ring or arcs along the edges) has a large mean distance and a large outline share, even
     where its centroid is central, while a lesion cut by one edge keeps most of its weight;
  6. the best component, its holes filled, is the lesion when it covers at least MIN_AREA of the
     usable pixels, at most MAX_AREA of them, and is at least MIN_CONTRAST darker (relative
     luminance, medians) than the other usable pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from anodata.border import DARK, find_fov

WORK_SIDE = 128  # long side (px) the mask is computed at
BLUR_SIGMA = 0.01  # Gaussian blur, fraction of the short side (at least 0.5 px)
BORDER_MARGIN = 0.03  # the dark border is widened by this fraction of the short side
OPENING = 0.02  # radius of the opening disc, fraction of the short side (at least 1 px)
CENTRE_SCALE = 0.35  # mean distance (in half short sides) at which a component's weight halves
MIN_AREA = 0.005  # smallest lesion, fraction of the usable (non-border) pixels
MAX_AREA = 0.85  # a larger dark region is the lesion filling the image (no framing to gain)
MIN_CONTRAST = 0.10  # (skin - lesion) / skin luminance below this: no lesion told from skin


def find_lesion(image: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(bool mask [H, W], '') of the lesion in a uint8 RGB [H, W, 3] or grey [H, W] image, or
    (None, a short reason) when no lesion can be told from the skin."""
    image = np.asarray(image)
    assert image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and
                                                            image.shape[2] == 3)), \
        (image.dtype, image.shape)
    h, w = image.shape[:2]
    small = _reduce(image)
    lum = _luminance(small)  # [h', w'] float32
    side = min(lum.shape)
    border = _border(lum, side)  # [h', w'] bool
    usable = ~border
    if usable.mean() < 0.1:
        return None, "the image is dark"
    lum = ndimage.gaussian_filter(lum, max(0.5, BLUR_SIGMA * side))
    values = lum[usable]
    threshold = otsu_threshold(values)
    dark = (lum <= threshold) & usable
    radius = max(1, round(OPENING * side))
    dark = ndimage.binary_opening(dark, structure=_disc(radius))
    component = _best_component(dark, usable, side)
    if component is None:
        return None, "no dark region"
    component = ndimage.binary_fill_holes(component)
    share = component.sum() / usable.sum()
    if share < MIN_AREA:
        return None, "no dark region"
    skin = usable & ~component
    if share > MAX_AREA or skin.sum() < MIN_AREA * usable.sum():
        return None, "lesion fills the image"
    lesion_lum, skin_lum = np.median(lum[component]), np.median(lum[skin])
    if skin_lum <= 0 or (skin_lum - lesion_lum) / skin_lum < MIN_CONTRAST:
        return None, "no dark region"
    if component.shape != (h, w):
        component = np.asarray(Image.fromarray(component).resize((w, h), Image.Resampling.NEAREST))
    return component.astype(bool), ""


def lesion_mask(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the lesion of a uint8 RGB [H, W, 3] or grey [H, W] image (find_lesion), all
    False when no lesion can be told from the skin."""
    mask, _reason = find_lesion(image)
    return mask if mask is not None else np.zeros(np.asarray(image).shape[:2], bool)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in 0..255: the t maximising the between-class variance of
    {v <= t} and {v > t}, on a 256-bin histogram (t is a bin's upper edge)."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.int64).ravel(), minlength=256)
    p = hist / max(1, hist.sum())  # [256]
    omega = np.cumsum(p)  # weight of the lower class
    mu = np.cumsum(p * np.arange(256))  # its first moment
    total = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * omega - mu) ** 2 / (omega * (1 - omega))
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between)) + 0.999


def _reduce(image: np.ndarray) -> np.ndarray:
    """The image with its long side reduced to WORK_SIDE (box filter); smaller ones as they are."""
    h, w = image.shape[:2]
    scale = WORK_SIDE / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _luminance(image: np.ndarray) -> np.ndarray:
    """BT.601 luminance of the shades-of-gray corrected RGB image (anodata.policy.shades_of_gray
    with p = 6, without its rounding), or the grey image itself: float32 [H, W]."""
    if image.ndim == 2:
        return image.astype(np.float32)
    rgb = image.astype(np.float32)  # [H, W, 3]
    squared = rgb * rgb
    e = np.mean((squared * squared * squared).reshape(-1, 3), axis=0, dtype=np.float64)
    e = np.power(e, 1 / 6)  # [3] Minkowski-6 illuminant
    gain = np.linalg.norm(e) / (np.sqrt(3.0) * e) if np.all(e > 0) else np.ones(3)
    weights = np.array([0.299, 0.587, 0.114]) * gain
    return rgb @ weights.astype(np.float32)


def _border(lum: np.ndarray, side: int) -> np.ndarray:
    """Very dark pixels connected to an image corner (a dermatoscope border or a black pad) and
    the outside of a field-of-view circle (anodata.border.fov_circle: also a grey or partial
    one), widened by BORDER_MARGIN of the short side."""
    labels, _count = ndimage.label(lum < DARK)
    h, w = lum.shape
    corner_labels = {labels[0, 0], labels[0, w - 1], labels[h - 1, 0], labels[h - 1, w - 1]}
    corner_labels.discard(0)
    border = np.isin(labels, list(corner_labels))
    found = find_fov(lum)
    if found is not None:
        _cx, _cy, radius, dist, _level = found
        border |= dist > radius
    if not border.any():
        return border
    margin = max(1, round(BORDER_MARGIN * side))
    return ndimage.binary_dilation(border, structure=_disc(margin))


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius + radius  # a round disc, not a diamond


def _best_component(dark: np.ndarray, usable: np.ndarray, side: int) -> np.ndarray | None:
    """The connected component of `dark` with the best area-against-centrality score."""
    labels, count = ndimage.label(dark)
    if count == 0:
        return None
    h, w = dark.shape
    outline = usable & ~ndimage.binary_erosion(usable, border_value=0)  # [h, w] bool
    dist = np.hypot(np.arange(h)[:, None] - (h - 1) / 2,
                    np.arange(w)[None, :] - (w - 1) / 2).ravel() / (side / 2)  # [h * w]
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:].astype(np.float64)  # [count]
    mean_dist = np.bincount(flat, weights=dist, minlength=count + 1)[1:] / area
    on_outline = np.bincount(flat, weights=outline.ravel(), minlength=count + 1)[1:]
    edge_share = on_outline / max(1, outline.sum())
    score = area / (1 + (mean_dist / CENTRE_SCALE) ** 2) * (1 - edge_share) ** 2
    return labels == (int(np.argmax(score)) + 1)
