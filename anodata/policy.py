"""The preprocessing policy: how a raw image becomes a square training image.

`anostyle prepare` records it in prepare.json (key `preprocessing`); `train-gan` carries it into
every network snapshot (as an opaque dict, stylegan never imports this module) and
`train-encoder` into every encoder checkpoint. Whatever fits a raw image later (reconstruct,
score of raw folders, serve, the Python API) applies exactly the policy its model recorded, with
`fit_raw` (or `fit_image` for a decoded image), the very code prepare runs on each file
(`fit_raw_framed`, which also tells why lesion framing left an image as framed).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from anodata.imageio import check_source_image, decode
from stylegan.errors import UserError
from stylegan.fileio import UntrustedJSONError, loads_untrusted

TRANSFORMS = ("center-crop", "resize", "pad")
RESIZE_FILTERS = {"box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
COLOUR_NORMS = ("none", "shades-of-gray")
BORDERS = ("keep", "fill")
INTENSITIES = ("keep", "normalise")
FRAMINGS = ("frame", "lesion")
# Lesion framing (crop_to_lesion): the square around the lesion's bounding box leaves a margin
# of LESION_MARGIN of the box's long side on each side, so the lesion's box fills 1 / (1 + 2 *
# 0.25) = 2/3 of the fitted image: its border and a ring of the skin around it stay in view (the
# contrast between the two is part of what is scored, and a rough mask tends to stop short of a
# faint rim), while the share of the image the lesion fills no longer depends on how the photo
# was framed. The square is at least LESION_MIN_SIDE of the short side (a speck is not blown up
# beyond 4x), and box-filtered JPEGs are decoded with at least resolution / LESION_MIN_SIDE
# pixels, so that even the smallest crop is resized down, never up, when the file is that large.
LESION_MARGIN = 0.25
LESION_MIN_SIDE = 0.25
POLICY_KEY = "preprocessing"  # key in prepare.json and in checkpoint metadata


@dataclass(frozen=True)
class Preprocessing:
    """What was done to every image of a dataset (and must be done to any raw image later)."""

    resolution: int = 256
    channels: int = 3
    transform: str = "center-crop"  # 'center-crop' | 'resize' (stretch) | 'pad' (black)
    resize_filter: str = "box"  # 'box' (fast, JPEG DCT draft) | 'lanczos'
    colour: str = "none"  # 'none' | 'shades-of-gray' (colour constancy after fitting)
    colour_p: float = 6.0  # Minkowski norm of shades-of-gray (Barata et al. 2015: 6)
    # 'keep' | 'fill': a dark circular field-of-view border (a dermatoscope's vignette) is
    # filled with the skin colour just inside it (fill_fov_border), before colour constancy
    border: str = "keep"
    # 'keep' | 'normalise': every image is scaled so that the magnitude of its Minkowski-p
    # illuminant estimate (the skin's brightness) is `intensity_target` (an exposure change
    # then changes nothing); after colour constancy. 172: the median of HAM10000's training
    # naevi after shades-of-gray at 64 px.
    intensity: str = "keep"
    intensity_target: float = 172.0
    # 'frame' | 'lesion': the decoded image is first cropped to a square around the lesion
    # (crop_to_lesion); an image where no lesion is found is fitted as with 'frame'
    framing: str = "frame"

    def __post_init__(self):
        checks = [(self.transform in TRANSFORMS, f"transform {self.transform!r} is not one of "
                                                 f"{', '.join(TRANSFORMS)}"),
                  (self.resize_filter in RESIZE_FILTERS,
                   f"resize_filter {self.resize_filter!r} is not one of "
                   f"{', '.join(RESIZE_FILTERS)}"),
                  (self.colour in COLOUR_NORMS, f"colour {self.colour!r} is not one of "
                                                f"{', '.join(COLOUR_NORMS)}"),
                  (self.border in BORDERS, f"border {self.border!r} is not one of "
                                           f"{', '.join(BORDERS)}"),
                  (self.intensity in INTENSITIES, f"intensity {self.intensity!r} is not one "
                                                   f"of {', '.join(INTENSITIES)}"),
                  (self.framing in FRAMINGS, f"framing {self.framing!r} is not one of "
                                             f"{', '.join(FRAMINGS)}"),
                  (0 < self.intensity_target <= 255,
                   f"intensity_target {self.intensity_target} is not in (0, 255]"),
                  (self.channels in (1, 3), f"channels {self.channels} is not 1 or 3"),
                  (self.resolution >= 1, f"resolution {self.resolution} is not positive"),
                  (self.colour_p >= 1, f"colour_p {self.colour_p} is below 1")]
        for ok, message in checks:
            if not ok:
                raise UserError(f"The preprocessing policy is invalid: {message}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, *, source: str) -> "Preprocessing":
        """A policy from its recorded dict; unknown or mistyped fields are a UserError."""
        if not isinstance(values, dict):
            raise UserError(f"{source} records a preprocessing policy that is not a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{source} records unknown preprocessing fields {unknown}; it was "
                            f"written by a newer AnoStyle.")
        try:
            return cls(**{k: (float(v) if k in ("colour_p", "intensity_target") else v)
                          for k, v in values.items()})
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source} records an unreadable preprocessing policy ({exc}).") \
                from None

    def at(self, resolution: int, channels: int) -> "Preprocessing":
        """This policy at another resolution/channel count (a network's, when they differ)."""
        return dataclasses.replace(self, resolution=resolution, channels=channels)


def fit_square(img: Image.Image, resolution: int, *, transform: str = "center-crop",
               resize_filter: str = "box") -> Image.Image:
    """Make an image square (center-crop, stretch or pad with black) at resolution x resolution."""
    resample = RESIZE_FILTERS[resize_filter]
    width, height = img.size
    if transform == "center-crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return img.resize((resolution, resolution), resample,
                          box=(left, top, left + side, top + side))
    if transform == "pad":
        side = max(width, height)
        canvas = Image.new(img.mode, (side, side), 0)
        canvas.paste(img, ((side - width) // 2, (side - height) // 2))
        img = canvas
    elif transform != "resize":
        raise ValueError(f"unknown transform {transform!r}")
    return img.resize((resolution, resolution), resample)


def shades_of_gray(rgb: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004; p = 6 for dermoscopy as in
    Barata et al. 2015, IEEE JBHI 19(3)): estimate the illuminant of each channel as the
    Minkowski p-mean of its values, e_c = (mean I_c^p)^(1/p), and scale channel c by
    |e| / (sqrt(3) e_c) so that the estimated illuminant becomes grey. uint8 [H, W, 3] ->
    uint8 [H, W, 3]; black padding leaves the result unchanged (it scales every e_c alike).
    """
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, (rgb.dtype, rgb.shape)
    x = rgb.astype(np.float64)  # [H, W, 3]
    e = illuminant(rgb, p)  # [3]
    if not np.all(e > 0):  # a channel that is black everywhere: nothing to estimate
        return rgb.copy()
    gain = np.linalg.norm(e) / (np.sqrt(3.0) * e)  # [3]
    return np.clip(np.rint(x * gain), 0, 255).astype(np.uint8)


def illuminant(pixels: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Minkowski-p illuminant estimate per channel, (mean I_c^p)^(1/p): [H, W, C] -> [C]."""
    x = pixels.astype(np.float64).reshape(-1, pixels.shape[-1] if pixels.ndim == 3 else 1)
    return np.power(np.mean(np.power(x, p), axis=0), 1.0 / p)


def normalise_intensity(img: Image.Image, target: float, p: float = 6.0) -> Image.Image:
    """Scale an 8-bit image so that |e| / sqrt(C) of its illuminant estimate e (`illuminant`)
    is `target` (rounded, clipped to 0..255); a black image is returned as it is."""
    a = np.asarray(img)
    magnitude = np.linalg.norm(illuminant(a, p)) / np.sqrt(a.shape[2] if a.ndim == 3 else 1)
    if magnitude <= 0:
        return img
    out = np.clip(np.rint(a.astype(np.float64) * (target / magnitude)), 0, 255)
    return Image.fromarray(out.astype(np.uint8), mode=img.mode)


def normalise_colour(img: Image.Image, colour: str, p: float) -> Image.Image:
    """Apply the colour normalisation `colour` (COLOUR_NORMS) to an RGB or L image."""
    if colour == "none" or img.mode != "RGB":  # grey images carry no colour cast
        return img
    if colour == "shades-of-gray":
        return Image.fromarray(shades_of_gray(np.asarray(img), p), mode="RGB")
    raise ValueError(f"unknown colour normalisation {colour!r}")


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


def _fov(lum: np.ndarray, *, purity: float = 0.9
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
    """_fov with pixels darker than `level` as the dark ones."""
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
    found = _fov(_luminance(image))
    return None if found is None else found[:3]


def fill_fov_border(img: Image.Image, *, margin: float = 0.03) -> Image.Image:
    """The image with its dark circular field-of-view border (fov_circle), from `margin` of
    the side inside the circle outwards, filled with the median colour of the non-dark pixels
    in the ring two margins wide just inside that; unchanged when there is no such border."""
    a = np.array(img)  # [H, W] or [H, W, C], a copy
    lum = _luminance(a)
    found = _fov(lum)
    if found is None:
        return img
    _cx, _cy, radius, dist, level = found
    m = max(1.0, margin * min(a.shape[:2]))
    ring = (dist > radius - 3 * m) & (dist <= radius - m) & (lum >= level)
    if not ring.any():
        return img
    a[dist > radius - m] = np.median(a[ring], axis=0).round().astype(np.uint8)
    return Image.fromarray(a, mode=img.mode)


def lesion_square(mask: np.ndarray, *, margin: float = LESION_MARGIN,
                  min_side: float = LESION_MIN_SIDE) -> tuple[int, int, int]:
    """(left, top, side) of the square crop around a lesion mask (bool [H, W], not empty).

    The square is centred on the mask's bounding box, its side max(box width, box height) *
    (1 + 2 * margin), at least min_side of the short side and at most the short side; it is
    shifted inside the image where it would cross an edge (so it stays as near the lesion's
    centre as the image allows).
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    assert len(xs), "an empty mask has no square"
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = int(round(min(max(side, min_side * min(h, w)), min(h, w))))
    left = int(round(min(max((x0 + x1 - side) / 2, 0), w - side)))
    top = int(round(min(max((y0 + y1 - side) / 2, 0), h - side)))
    return left, top, side


def crop_to_lesion(img: Image.Image, *, border: str = "keep") -> tuple[Image.Image, str]:
    """(the square crop around the lesion (anodata.lesion.find_lesion, lesion_square), '') or,
    when no lesion is found, (img itself, the reason). With border 'fill' the lesion is looked
    for after fill_fov_border (the crop is still taken from img); a dark border is ignored
    either way."""
    from anodata.lesion import find_lesion  # anodata.lesion imports this module

    seen = fill_fov_border(img) if border == "fill" else img
    mask, reason = find_lesion(np.asarray(seen))
    if mask is None:
        return img, reason
    left, top, side = lesion_square(mask)
    return img.crop((left, top, left + side, top + side)), ""


def fit_image_framed(img: Image.Image, policy: Preprocessing) -> tuple[Image.Image, str]:
    """A decoded 8-bit image -> (the fitted image, '' or why the lesion framing was not
    applied): cropped around the lesion (policy.framing), square at the policy's resolution,
    border filled (policy.border), colour normalised (policy.colour), intensity normalised
    (policy.intensity); prepare's very steps. An image too small, too elongated or flat to
    be a photo of a lesion is refused first (anodata.imageio.check_source_image)."""
    check_source_image(img)
    note = ""
    if policy.framing == "lesion":
        img, note = crop_to_lesion(img, border=policy.border)
    img = fit_square(img, policy.resolution, transform=policy.transform,
                     resize_filter=policy.resize_filter)
    if policy.border == "fill":
        img = fill_fov_border(img)
    img = normalise_colour(img, policy.colour, policy.colour_p)
    if policy.intensity == "normalise":
        img = normalise_intensity(img, policy.intensity_target, policy.colour_p)
    return img, note


def fit_image(img: Image.Image, policy: Preprocessing) -> Image.Image:
    """A decoded 8-bit image -> the fitted image (fit_image_framed without its note)."""
    return fit_image_framed(img, policy)[0]


def fit_raw_framed(data: bytes, suffix: str, policy: Preprocessing) -> tuple[Image.Image, str]:
    """Encoded bytes of a raw file -> (the fitted 8-bit PIL image, framing note), exactly as
    prepare makes it (fit_image_framed after decoding).

    Raises anodata.imageio.ImageRejected for a file that is not a usable image.
    """
    draft = policy.resolution if policy.resize_filter == "box" else None
    if draft is not None and policy.framing == "lesion":
        img = decode(data, suffix=suffix, channels=policy.channels,
                     draft_size=int(np.ceil(policy.resolution / LESION_MIN_SIDE)))
        fitted, note = fit_image_framed(img, policy)
        if not note:
            return fitted, note
        # no lesion: decoded again as framing 'frame' decodes, so the image is the same
        policy = dataclasses.replace(policy, framing="frame")
        return fit_image_framed(decode(data, suffix=suffix, channels=policy.channels,
                                       draft_size=draft), policy)[0], note
    img = decode(data, suffix=suffix, channels=policy.channels, draft_size=draft)
    return fit_image_framed(img, policy)


def fit_raw(data: bytes, suffix: str, policy: Preprocessing) -> Image.Image:
    """Encoded bytes of a raw file -> the fitted 8-bit PIL image, exactly as prepare makes it.

    Raises anodata.imageio.ImageRejected for a file that is not a usable image.
    """
    return fit_raw_framed(data, suffix, policy)[0]


def fit_array(data: bytes, suffix: str, policy: Preprocessing) -> np.ndarray:
    """`fit_raw` as uint8 [C, H, W] (what a prepared zip's lossless PNG holds)."""
    array = np.array(fit_raw(data, suffix, policy), dtype=np.uint8)  # [H, W] or [H, W, C]
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # [C, H, W]


def read_prepared_policy(dataset: str | os.PathLike) -> Preprocessing | None:
    """The policy recorded in prepare.json beside a prepared zip/folder (None when absent or
    written before policies were recorded: then its options are read, as prepare used them)."""
    info = read_prepare_json(dataset)
    if info is None:
        return None
    source = str(_prepare_json_path(dataset))
    if POLICY_KEY in info:
        return Preprocessing.from_dict(info[POLICY_KEY], source=source)
    options = info.get("options")
    if not isinstance(options, dict):
        return None
    names = {f.name for f in dataclasses.fields(Preprocessing)}
    return Preprocessing.from_dict({k: v for k, v in options.items() if k in names},
                                   source=source)


def read_prepare_json(dataset: str | os.PathLike) -> dict | None:
    """prepare.json beside `dataset` (a zip or folder) as a dict, or None when there is none."""
    path = _prepare_json_path(dataset)
    if not path.is_file():
        return None
    try:
        body = loads_untrusted(path.read_bytes())
    except UntrustedJSONError as exc:
        raise UserError(f"{path} cannot be read: {exc}; prepare the data again.") from None
    return body if isinstance(body, dict) else None


def _prepare_json_path(dataset: str | os.PathLike) -> Path:
    path = Path(dataset)
    folder = path.parent if path.is_file() or path.suffix == ".zip" else path
    return folder / "prepare.json"
