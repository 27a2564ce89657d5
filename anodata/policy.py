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

from anodata.border import fill_fov_border
from anodata.lesion import find_lesion
from stylegan.errors import UserError
from stylegan.fileio import UntrustedJSONError, loads_untrusted
from stylegan.imageio import check_source_image, decode

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
# By default (lesion_max_side 1) the square is at most the short side: a lesion whose square
# would be larger is framed as much as the photo allows, so its scale still follows the photo's.
# With lesion_max_side S > 1 the square may reach S short sides, and the part of it past the
# image is the image reflected at its edges (the skin goes on without a seam, as in the zoom-out
# shift of anodata.shifts); a lesion cut by the frame is then mirrored into that margin.
LESION_MARGIN = 0.25
LESION_MIN_SIDE = 0.25
LESION_MAX_SIDE = 4.0  # the largest lesion_max_side a policy may ask for
FLOAT_FIELDS = ("colour_p", "intensity_target", "lesion_max_side")  # JSON may hold them as ints
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
    # framing 'lesion': the most the lesion's square may measure, in short sides of the image;
    # above 1 it reaches past the image, filled by reflection (LESION_MARGIN's comment)
    lesion_max_side: float = 1.0

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
                  (1 <= self.lesion_max_side <= LESION_MAX_SIDE,
                   f"lesion_max_side {self.lesion_max_side} is not in [1, {LESION_MAX_SIDE:g}]"),
                  (self.framing == "lesion" or self.lesion_max_side == 1,
                   f"lesion_max_side {self.lesion_max_side:g} needs framing 'lesion' (with "
                   f"framing {self.framing!r} no square is cut around the lesion)"),
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
            return cls(**{k: (float(v) if k in FLOAT_FIELDS else v)
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


def lesion_square(mask: np.ndarray, *, margin: float = LESION_MARGIN,
                  min_side: float = LESION_MIN_SIDE,
                  max_side: float = Preprocessing.lesion_max_side) -> tuple[int, int, int]:
    """(left, top, side) of the square crop around a lesion mask (bool [H, W], not empty).

    The square is centred on the mask's bounding box, its side max(box width, box height) *
    (1 + 2 * margin), at least min_side and at most max_side of the short side. Along an axis
    the image covers, it is shifted inside the image where it would cross an edge; along an
    axis longer than the image (max_side > 1), it is shifted to cover the whole image. Either
    way it stays as near the lesion's centre as the image allows; left and top are negative,
    and left + side or top + side past the image, where the square reaches past it.
    """
    h, w = mask.shape
    assert max_side >= 1, max_side
    x0, x1, y0, y1 = box = lesion_box(mask)
    short = min(h, w)
    side = wanted_side(mask, margin=margin, box=box) * short
    side = int(round(min(max(side, min_side * short), max_side * short)))

    def place(lo: int, hi: int, length: int) -> int:
        start = (lo + hi - side) / 2
        low, high = (0, length - side) if side <= length else (length - side, 0)
        return int(round(min(max(start, low), high)))

    return place(x0, x1, w), place(y0, y1, h), side


def lesion_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1), the bounding box of a mask (bool [H, W], not empty), ends exclusive."""
    ys, xs = np.nonzero(mask)
    assert len(xs), "an empty mask has no square"
    return int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1


def wanted_side(mask: np.ndarray, *, margin: float = LESION_MARGIN,
                box: tuple[int, int, int, int] | None = None) -> float:
    """The side, in short sides of the mask (bool [H, W], not empty), that the square around
    its lesion asks for: the bounding box's long side x (1 + 2 * margin). Above a policy's
    lesion_max_side, lesion_square cuts it down and the lesion's scale follows the photo's.
    `box`: the mask's lesion_box when the caller has it."""
    x0, x1, y0, y1 = lesion_box(mask) if box is None else box
    return float(max(x1 - x0, y1 - y0) * (1 + 2 * margin) / min(mask.shape))


def crop_square(img: Image.Image, left: int, top: int, side: int) -> Image.Image:
    """The square (left, top, side) of img; where it reaches past the image, the image
    reflected at its edges (numpy 'reflect' padding, as the zoom-out shift pads)."""
    w, h = img.size
    pad_x = (max(0, -left), max(0, left + side - w))
    pad_y = (max(0, -top), max(0, top + side - h))
    if not any(pad_x + pad_y):
        return img.crop((left, top, left + side, top + side))
    a = np.asarray(img)
    a = np.pad(a, [pad_y, pad_x] + [(0, 0)] * (a.ndim - 2), mode="reflect")
    x, y = left + pad_x[0], top + pad_y[0]
    return Image.fromarray(np.ascontiguousarray(a[y:y + side, x:x + side]), mode=img.mode)


def framing_lesion(img: Image.Image, *, border: str = "keep") -> tuple[np.ndarray | None, str]:
    """The lesion that lesion framing crops around: anodata.lesion.find_lesion of img, looked
    for after fill_fov_border with border 'fill' (a dark border is ignored either way)."""
    return find_lesion(np.asarray(fill_fov_border(img) if border == "fill" else img))


def crop_to_lesion(img: Image.Image, *, border: str = "keep",
                   max_side: float = Preprocessing.lesion_max_side) -> tuple[Image.Image, str]:
    """(the square crop of img around its lesion (framing_lesion, lesion_square up to max_side
    short sides, crop_square), '') or, when no lesion is found, (img itself, the reason)."""
    mask, reason = framing_lesion(img, border=border)
    if mask is None:
        return img, reason
    return crop_square(img, *lesion_square(mask, max_side=max_side)), ""


def fit_image_framed(img: Image.Image, policy: Preprocessing) -> tuple[Image.Image, str]:
    """A decoded 8-bit image -> (the fitted image, '' or why the lesion framing was not
    applied): cropped around the lesion (policy.framing), square at the policy's resolution,
    border filled (policy.border), colour normalised (policy.colour), intensity normalised
    (policy.intensity); prepare's very steps. An image too small, too elongated or flat to
    be a photo of a lesion is refused first (stylegan.imageio.check_source_image)."""
    check_source_image(img)
    note = ""
    if policy.framing == "lesion":
        img, note = crop_to_lesion(img, border=policy.border, max_side=policy.lesion_max_side)
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

    Raises stylegan.imageio.ImageRejected for a file that is not a usable image.
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

    Raises stylegan.imageio.ImageRejected for a file that is not a usable image.
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
