"""Robust image decoding shared by `prepare` (raw inputs) and `ImageDataset` (prepared sets);
it sits in stylegan, which imports nothing from anodata or anomaly.

One policy for every odd input, so a dataset reads the same pixels wherever it was made:

- empty, truncated or non-image files are refused with a reason (`ImageRejected`); PIL's
  `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False, partial decodes are never accepted;
- images over `MAX_PIXELS` are refused from their header, before any pixel is decoded
  (decompression bombs), and PIL's own DecompressionBombError is turned into a reason;
- EXIF orientation is applied (`PIL.ImageOps.exif_transpose`);
- 16-bit samples are scaled to 8 bit by dropping the low byte (`value >> 8`), never clipped
  (PIL already keeps the high byte when it opens 16-bit RGB/RGBA PNGs);
- transparency (RGBA, LA, palette with transparency) is composited on black:
  `out = round(color * alpha / 255)`; palette, CMYK, YCbCr, bilevel images are converted;
- the result is mode 'L' (channels=1, ITU-R 601-2 luma) or 'RGB' (channels=3, gray replicated).

DICOM (`.dcm`) needs the optional `pydicom` package (`pip install anostyle[dicom]`).
"""

from __future__ import annotations

import io
import warnings
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 100_000_000  # refuse images above 100 megapixels (checked on the header)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
DICOM_EXTENSIONS = frozenset({".dcm"})
SOURCE_EXTENSIONS = IMAGE_EXTENSIONS | DICOM_EXTENSIONS  # raw inputs; prepared sets hold no DICOM

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F"}) | _SIXTEEN_BIT_MODES
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ROW_BLOCK = 256  # rows converted at once by the 16-bit and alpha paths (bounds temporaries)


def is_hidden_part(part: str) -> bool:
    """A path part that marks an entry to skip silently: dot-files/folders and macOS `__MACOSX`."""
    return part.startswith(".") or part == "__MACOSX"


def is_image_name(name: str, extensions: frozenset[str] = SOURCE_EXTENSIONS) -> bool:
    """The one image-name rule for folders and zips: a file (not a folder entry) whose suffix is
    in `extensions` and no part of whose relative posix path is hidden (`.x`, `._x`, `__MACOSX`)."""
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    return (bool(parts) and not name.endswith("/")
            and PurePosixPath(name).suffix.lower() in extensions
            and not any(is_hidden_part(p) for p in parts))


class ImageRejected(Exception):
    """A single input file that cannot be used; the message is the reason for rejected.csv."""


def open_image(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes completely, with EXIF orientation applied.

    `draft_size` lets JPEG decoding downscale by 1/2, 1/4 or 1/8 in the DCT domain while both
    sides stay >= draft_size (a large speed-up for big photos; skipped when None).
    Raises ImageRejected with a reason for any file that cannot be used.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; AnoStyle refuses partial "
                           "decodes, so set it back to False")
    if len(data) == 0:
        raise ImageRejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns from ~89 megapixels; our own limit (MAX_PIXELS) is checked just below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            check_size(img.size)
            if draft_size is not None and img.format == "JPEG":
                img.draft(None, (draft_size, draft_size))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of every image
        except ImageRejected:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"decompression bomb refused by PIL: {exc}") from None
        except Image.UnidentifiedImageError:
            raise ImageRejected("not an image file PIL can read (wrong extension or corrupt "
                                "header)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    return img


def check_size(size: tuple[int, int]) -> None:
    """Refuse a (width, height) that is empty or over MAX_PIXELS, before decoding any pixel."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected(f"image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"image is {width}x{height} = {width * height / 1e6:.0f} megapixels, "
                            f"over the {MAX_PIXELS // 1_000_000}-megapixel limit")


# What a decoded source image must be to become a model input (anodata.policy.fit_image, the
# one fitting path of prepare, the API and serve, checks it): at least MIN_SIDE px on its short
# side (a 1x1 or 3x3 "photo" scaled to 64 px is a flat patch), at most MAX_ASPECT times longer
# than wide (a 1x10000 strip holds no lesion to crop), and not a blank frame: one grey level
# (standard deviation below FLAT_STD) that is black or white (mean within BLANK_LEVELS of 0 or
# 255), as a failed capture gives. Real dermoscopy photos are hundreds of pixels with aspect
# ratios near 4:3. A one-colour image of another tone, and sides of 6-15 px, stay allowed:
# the synthetic test images of prepare and the reader are such.
MIN_SIDE, MAX_ASPECT, FLAT_STD, BLANK_LEVELS = 6, 8.0, 1.0, 8


def check_source_image(img: Image.Image) -> None:
    """Refuse (ImageRejected, with the reason) a decoded image too small, too elongated or
    blank to be a photo of a lesion."""
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(f"image is {width}x{height} px, smaller than {MIN_SIDE} px on a side")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageRejected(f"image is {width}x{height} px, more elongated than 1:{MAX_ASPECT:g}")
    grey = np.asarray(img.convert("L"), dtype=np.float32)
    mean, std = float(grey.mean()), float(grey.std())
    if std < FLAT_STD and not BLANK_LEVELS < mean < 255 - BLANK_LEVELS:
        raise ImageRejected(f"image is blank ({'black' if mean < 128 else 'white'}: one grey "
                            f"level {mean:.0f}); no lesion to see")


def channels_of_mode(mode: str) -> int:
    """Number of channels (1 or 3) that `to_8bit(img, channels=None)` gives for a PIL mode."""
    return 1 if mode in _GRAY_MODES else 3


def to_8bit(img: Image.Image, channels: int | None = None) -> Image.Image:
    """Convert any decoded PIL image to mode 'L' (channels=1) or 'RGB' (channels=3).

    With channels=None the image keeps its kind: gray modes give 'L', the others 'RGB'.
    """
    channels = channels_of_mode(img.mode) if channels is None else channels
    assert channels in (1, 3), channels
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        out = _sixteen_to_8bit(img)
    elif mode == "F":
        raise ImageRejected("floating-point images are not supported; save them as 8- or "
                            "16-bit PNG")
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        out = _composite_on_black(img)
    elif mode in ("L", "RGB"):
        out = img
    else:  # P, 1, CMYK, YCbCr, LAB, HSV, ...
        try:
            out = img.convert("L" if mode == "1" else "RGB")
        except ValueError as exc:
            raise ImageRejected(f"cannot convert PIL mode {mode} to RGB: {exc}") from None
    if channels == 1 and out.mode != "L":
        out = out.convert("L")
    elif channels == 3 and out.mode != "RGB":
        out = out.convert("RGB")
    return out


def _sixteen_to_8bit(img: Image.Image) -> Image.Image:
    """Gray 16-bit (or 32-bit integer holding 16-bit values) -> 'L' by value >> 8.

    Converted in strips of rows pasted into the result: no full-size array copy (a 49-megapixel
    16-bit image once took ~1 GB here).
    """
    if img.mode == "I":
        low, high = img.getextrema()
        if low < 0 or high > 65535:
            raise ImageRejected(f"integer pixel values {low}..{high} do not fit 16 bits; save "
                                f"the image as 8- or 16-bit PNG")
    out = Image.new("L", img.size)
    for top in range(0, img.height, _ROW_BLOCK):
        strip = np.asarray(img.crop((0, top, img.width, min(top + _ROW_BLOCK, img.height))))
        out.paste(Image.fromarray((strip >> 8).astype(np.uint8), mode="L"), (0, top))
    return out


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Any image with alpha -> 'RGB' composited on black: round(color * alpha / 255).

    In strips of rows pasted into the result, so no full-size array is ever built."""
    out = Image.new("RGB", img.size)
    for top in range(0, img.height, _ROW_BLOCK):
        strip = img.crop((0, top, img.width, min(top + _ROW_BLOCK, img.height)))  # keeps palette
        block = np.asarray(strip if strip.mode == "RGBA" else strip.convert("RGBA"))
        block = block.astype(np.uint32)  # [rows, W, 4]
        rgb = ((block[..., :3] * block[..., 3:] + 127) // 255).astype(np.uint8)
        out.paste(Image.fromarray(rgb, mode="RGB"), (0, top))
    return out


def decode_dicom(data: bytes) -> Image.Image:
    """First frame of a DICOM file as an 8-bit 'L' or 'RGB' image (needs pydicom)."""
    try:
        import pydicom
    except ImportError:
        raise ImageRejected("DICOM file needs the optional pydicom package: "
                            "pip install 'anostyle[dicom]'") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        check_size((int(ds.Columns), int(ds.Rows)))
        pixels = _dicom_first_frame(ds)  # [H, W] or [H, W, 3]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize))
    except ImageRejected:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageRejected(f"unreadable DICOM file: {exc}") from None
    pixels = _dicom_to_uint8(pixels, bits)
    if photometric == "MONOCHROME1":  # 0 means white
        pixels = 255 - pixels
    return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")


def _dicom_first_frame(ds) -> np.ndarray:
    """Pixels of the first frame, YBR colour converted to RGB (pydicom 3, or 2.4 fallback)."""
    try:
        from pydicom.pixels import pixel_array
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import convert_color_space
        pixels = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[0]
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        return pixels
    return pixel_array(ds, index=0)


def _dicom_to_uint8(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Scale stored DICOM samples to 8 bit by dropping the low bits (bits stored -> 8)."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ImageRejected(f"DICOM pixel array of shape {pixels.shape} is neither gray nor RGB")
    if pixels.dtype.kind not in "ui":
        raise ImageRejected(f"DICOM pixel type {pixels.dtype} is not supported")
    values = pixels.astype(np.int64)
    if pixels.dtype.kind == "i":  # signed: move the range to 0..2**bits - 1
        values = values + (1 << (bits - 1))
    return np.clip(values >> max(bits - 8, 0), 0, 255).astype(np.uint8)


def decode(data: bytes, *, suffix: str, channels: int | None = None,
           draft_size: int | None = None) -> Image.Image:
    """Encoded bytes of a file with extension `suffix` -> 8-bit 'L' or 'RGB' PIL image."""
    if suffix.lower() in DICOM_EXTENSIONS:
        if len(data) == 0:
            raise ImageRejected("empty file (0 bytes)")
        return to_8bit(decode_dicom(data), channels)
    return to_8bit(open_image(data, draft_size=draft_size), channels)
