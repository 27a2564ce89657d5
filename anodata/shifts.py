"""Simulated acquisition shifts: what differs between dermoscopes and collections, applied to a
raw (decoded, not yet fitted) PIL image, and the seeded choice of which images are shifted.

- `border:R`: a dermatoscope's dark circular field-of-view border: black (8, 6, 6) outside a
  centred circle of R x half the side of the centre square, its edge blurred by 1% of the side.
- `exposure:F`: the brightness times F (PIL ImageEnhance.Brightness: every channel x F).
- `zoom:F`, F > 1 (zoom in): the centred crop of 1/F of the width and height, resized back to
  the image's size (Lanczos). F < 1 (zoom out): the image shrunk to F of its size (Lanczos) and
  centred on a canvas of the original size filled by REFLECT padding: the added margin is the
  image's own skin mirrored at its edges, so its texture, colour and illumination gradient
  continue without a seam. A flat fill (e.g. the median colour of the outer ring) would add a
  uniform frame with a sharp edge that no dermoscope produces, and a detector would be measured
  on that artefact rather than on scale; the price of reflection is that a lesion cut by the
  frame is mirrored into the margin.

A shift is applied before the model's policy fits the image (centre crop, border fill, colour
and intensity normalisation), exactly where a different device would act. `shifted_halves`
picks a seeded `share` of the normals and, independently, of the anomalies, so that a shift
cannot change the AUC through the class balance of the shifted images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

KINDS = ("border", "exposure", "zoom")
BORDER_COLOUR = (8, 6, 6)
DEFAULT_SHIFTS = "border:1,exposure:0.7,zoom:0.75,zoom:1.33"


@dataclass(frozen=True)
class Shift:
    """One simulated shift: its kind and parameter (border radius, or a factor)."""

    kind: str  # border | exposure | zoom
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown shift {self.kind!r}")
        if not (self.value > 0 and np.isfinite(self.value)):
            raise ValueError(f"shift {self.kind}: {self.value} is not a positive number")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, img: Image.Image) -> Image.Image:
        """The shifted image (same size and mode as `img`)."""
        if self.kind == "border":
            return paint_border(img, self.value)
        if self.kind == "exposure":
            return ImageEnhance.Brightness(img).enhance(self.value)
        return zoom(img, self.value)


def parse_shifts(text: str) -> tuple[Shift, ...]:
    """'border:1,exposure:0.7,zoom:0.75' -> Shifts; a bad item raises ValueError naming it."""
    shifts = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(border|exposure|zoom):(\d+(?:\.\d*)?|\.\d+)", item)
        if not match or float(match[2]) <= 0:
            raise ValueError(f"{item!r} is not a shift; use border:RADIUS, exposure:FACTOR or "
                             f"zoom:FACTOR with a positive number (e.g. {DEFAULT_SHIFTS})")
        shifts.append(Shift(match[1], float(match[2])))
    if not shifts:
        raise ValueError(f"no shift given; e.g. {DEFAULT_SHIFTS}")
    return tuple(dict.fromkeys(shifts))


def paint_border(img: Image.Image, radius: float) -> Image.Image:
    """Black (8, 6, 6) outside a centred circle of `radius` x half the side of the centre
    square, its edge blurred by 1% of the side, as a dermatoscope's field of view looks."""
    w, h = img.size
    side = min(w, h)
    r = radius * side / 2
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 100))
    fill = BORDER_COLOUR if img.mode == "RGB" else BORDER_COLOUR[0]
    return Image.composite(img, Image.new(img.mode, (w, h), fill), mask)


def zoom(img: Image.Image, factor: float) -> Image.Image:
    """Zoom about the centre by `factor` at the same size: > 1 crops 1/factor of each side and
    enlarges it; < 1 shrinks the image and reflect-pads it back (module docstring)."""
    w, h = img.size
    if factor == 1:
        return img.copy()
    if factor > 1:
        cw, ch = w / factor, h / factor
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        return img.resize((w, h), Image.Resampling.LANCZOS, box=box)
    sw, sh = max(1, round(w * factor)), max(1, round(h * factor))
    small = np.asarray(img.resize((sw, sh), Image.Resampling.LANCZOS))
    left, top = (w - sw) // 2, (h - sh) // 2
    pad = [(top, h - sh - top), (left, w - sw - left)] + [(0, 0)] * (small.ndim - 2)
    return Image.fromarray(np.pad(small, pad, mode="reflect" if min(sw, sh) > 1 else "edge"),
                           mode=img.mode)


def shifted_halves(is_anomaly: np.ndarray, share: float = 0.5, seed: int = 0) -> np.ndarray:
    """Bool [N]: a seeded round(share x n) of the normals (False) and, independently, of the
    anomalies (True) of `is_anomaly` [N] are marked as shifted."""
    assert 0 <= share <= 1, share
    labels = np.asarray(is_anomaly, dtype=bool)
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=bool)
    for cls in (False, True):
        idx = np.flatnonzero(labels == cls)
        out[rng.permutation(idx)[:round(share * len(idx))]] = True
    return out
