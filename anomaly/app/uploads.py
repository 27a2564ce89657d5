"""Uploaded images for `anostyle serve`: multipart/form-data (RFC 7578) read in memory, limited.

Limits, each checked as early as it can be:
  body size    Content-Length before reading, then the bytes counted while streaming (a body
               without Content-Length is cut off at the limit, not read to its end); the bytes
               received at once across requests within a BodyBudget (what has arrived, not
               what a Content-Length announces, so that clients who send nothing hold none);
  files        at most `max_files` parts, all in the field 'image', each with a file name;
  pixels       width x height from the image header, before any pixel is decoded
               (decompression bombs), then decoded by the project's one policy
               (stylegan.imageio) and fitted by the model's recorded preprocessing policy
               (as `anostyle prepare` fitted its data);
  decoded      the bytes the decoder will hold (width x height x bytes per pixel of the file's
               mode, after JPEG's DCT-domain reduction), summed over the request's files;
  memory       decodes run through a DecodeBudget: large images one after another within a
               fixed budget of estimated working memory (WORK_BYTES per pixel), small ones in
               a lane of their own; an image whose estimate exceeds the budget is refused.
Nothing touches the file system: python-multipart's streaming parser hands each part's bytes to
an in-memory buffer. A client's file name is kept only to be shown (cleaned of control
characters); it never becomes a path, and not even its extension picks the decoder: the bytes do.
Every refusal is an UploadError carrying an HTTP status (4xx) and one sentence for the user.
"""

from __future__ import annotations

import io
import re
import threading
import time
import unicodedata
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import numpy as np
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from anodata.policy import Preprocessing
from anodata.reader import read_fitted
from stylegan.imageio import ImageRejected

FIELD = "image"
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # what PIL may identify an upload as
MAX_NAME_CHARS = 200
# Bytes per pixel of a decoded PIL image, by mode (unknown modes: 4).
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16L": 2,
              "I;16B": 2, "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4,
              "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
# Working memory of decoding, converting and fitting one image, in bytes per decoded pixel, by
# the mode of its header: PIL's own copy (4 bytes per pixel for every multi-band mode), the
# 8-bit gray or RGB result and, for alpha, the compositing. Measured with 6000x4000 all-zero
# PNGs (peak RSS increase): RGB 4.1, L and P 5.0, 16-bit gray 7.2, RGBA and LA 12.0.
WORK_BYTES = {"RGB": 5, "YCbCr": 5, "L": 6, "P": 6, "1": 6, "I;16": 8, "I;16L": 8,
              "I;16B": 8, "I;16N": 8}
WORK_BYTES_OTHER = 13  # alpha modes, CMYK, 32-bit: the most any mode was seen to need


class UploadError(Exception):
    """A request the server refuses: HTTP status (4xx) and a message for the user."""

    def __init__(self, status: int, message: str):
        assert 400 <= status < 500, status
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class UploadLimits:
    """Per-request limits (see the module docstring)."""

    max_bytes: int
    max_files: int
    max_pixels: int
    max_decoded_bytes: int = 256 * 2**20  # per request, all files together


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its display name (never a path) and its bytes."""

    name: str
    data: bytes


def display_name(raw: bytes) -> str:
    """A client's file name for display only: UTF-8 (or Latin-1), no control characters, at
    most MAX_NAME_CHARS characters. Slashes stay: the name is never used as a path.

    Browsers send '"', CR and LF in file names as %22, %0D and %0A (HTML form-data encoding):
    the quote is restored, the line breaks dropped.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = re.sub("%0[ad]", "", text.replace("%22", '"'), flags=re.IGNORECASE)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    return text[:MAX_NAME_CHARS] or "unnamed"


class _Parts:
    """python-multipart callbacks that collect the 'image' file parts in memory."""

    def __init__(self, max_files: int):
        self.max_files = max_files
        self.files: list[Upload] = []
        self.ended = False
        self._headers: dict[str, str] = {}
        self._key, self._value = bytearray(), bytearray()
        self._name, self._data = "", bytearray()

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._key += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._key.decode("latin-1").strip().lower()] = self._value.decode("latin-1")
        self._key, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self._headers.get("content-disposition", ""))
        field = params.get(b"name", b"").decode("latin-1")
        if kind != b"form-data" or field != FIELD:
            raise UploadError(400, f"Send the images in the multipart field '{FIELD}' "
                                   f"(this request used the field '{field[:40]}').")
        if b"filename" not in params:
            raise UploadError(400, f"The field '{FIELD}' must hold a file, not a text value.")
        if len(self.files) >= self.max_files:
            raise UploadError(413, f"At most {self.max_files} images per request; send the "
                                   f"others in another request.")
        self._name = display_name(params[b"filename"])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def _part_end(self) -> None:
        self.files.append(Upload(self._name, bytes(self._data)))

    def _end(self) -> None:
        self.ended = True


class BodyBudgetFull(Exception):
    """The server holds as many bytes of bodies being received as its BodyBudget allows."""


class BodyBudget:
    """Bytes of request bodies being received at once, across requests (used from one event
    loop: no lock)."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0

    def take(self, n: int) -> None:
        """Count `n` more bytes, or raise BodyBudgetFull (counting nothing)."""
        if self.used + n > self.capacity:
            raise BodyBudgetFull
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


def _boundary(content_type: str | None) -> bytes:
    """The multipart boundary of a Content-Type header, or an UploadError."""
    if not content_type:
        raise UploadError(400, f"Empty request: send one or more images as multipart/form-data "
                               f"in the field '{FIELD}'.")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UploadError(415, f"Send the images as multipart/form-data in the field '{FIELD}', "
                               f"not as {kind.decode('latin-1')[:60] or 'an unnamed type'}.")
    if not params.get(b"boundary"):
        raise UploadError(400, "The multipart/form-data request has no boundary parameter.")
    return params[b"boundary"]


def _too_large(limits: UploadLimits) -> UploadError:
    return UploadError(413, f"The upload is larger than the server's limit of "
                            f"{limits.max_bytes / 2**20:g} MB; send smaller or fewer images.")


async def read_uploads(content_type: str | None, content_length: str | None,
                       chunks: AsyncIterator[bytes], limits: UploadLimits, *,
                       budget: BodyBudget | None = None) -> list[Upload]:
    """The 'image' files of a multipart body, read from `chunks` without exceeding the limits;
    the bytes received count in `budget` (if given) until the body has been read."""
    boundary = _boundary(content_type)
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise UploadError(400, "The Content-Length header is not a number.")
        if int(content_length) > limits.max_bytes:
            raise _too_large(limits)  # refused before one byte of the body is read
    parts = _Parts(limits.max_files)
    received = 0
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in chunks:
            if received + len(chunk) > limits.max_bytes:
                raise _too_large(limits)
            if budget is not None:
                budget.take(len(chunk))
            received += len(chunk)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, f"The multipart/form-data body is malformed ({exc}).") from None
    finally:
        if budget is not None:
            budget.give(received)
    if received == 0:
        raise UploadError(400, f"Empty request: the body holds no image in the field '{FIELD}'.")
    if not parts.ended:
        raise UploadError(400, "The multipart/form-data body is incomplete (no final "
                               "boundary); send the whole file.")
    if not parts.files:
        raise UploadError(400, f"The request holds no file in the field '{FIELD}'.")
    return parts.files


@dataclass(frozen=True)
class Header:
    """What an upload's image header says, before any pixel is decoded."""

    width: int
    height: int
    decoded_bytes: int  # what the decoder will hold (after JPEG's reduction)
    work_bytes: int  # estimated working memory of decoding and converting it


def read_header(upload: Upload, *, max_pixels: int, draft_size: int | None = None) -> Header:
    """The header of an upload; refuses non-images and too many pixels, decodes nothing.

    `draft_size`: the size JPEG decoding may reduce to (as `read_fitted` asks), which sets the
    decoded bytes of a JPEG.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(upload.data), formats=UPLOAD_FORMATS) as img:
                width, height = img.size
                if draft_size is not None and img.format == "JPEG" and width * height <= max_pixels:
                    img.draft(None, (draft_size, draft_size))  # header only: sets the size
                decoded_pixels, mode = img.size[0] * img.size[1], img.mode
                decoded = decoded_pixels * MODE_BYTES.get(mode, 4)
        except Image.DecompressionBombError:  # PIL's own limit, far above any sane photo
            raise UploadError(413, f"'{upload.name}' has more pixels than the server's limit of "
                                   f"{max_pixels / 1e6:g} megapixels.") from None
        except Image.UnidentifiedImageError:
            raise UploadError(415, f"'{upload.name}' is not a PNG, JPEG, BMP or TIFF image."
                              ) from None
        except Exception as exc:  # noqa: BLE001 - crafted headers raise many types in PIL
            raise UploadError(422, f"'{upload.name}' has a corrupt image header ({exc})."
                              ) from None
    if width * height > max_pixels:
        raise UploadError(413, f"'{upload.name}' is {width}x{height} = "
                               f"{width * height / 1e6:.1f} megapixels, over the server's limit "
                               f"of {max_pixels / 1e6:g} megapixels.")
    return Header(width, height, decoded,
                  decoded_pixels * WORK_BYTES.get(mode, WORK_BYTES_OTHER))


def image_size(upload: Upload, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) read from the header alone; refuses non-images and too many pixels."""
    header = read_header(upload, max_pixels=max_pixels)
    return header.width, header.height


def read_headers(uploads: list[Upload], limits: UploadLimits, *, draft_size: int
                 ) -> list[Header]:
    """Every upload's header, and the request's decoded bytes within `max_decoded_bytes`."""
    headers = []
    for upload in uploads:
        if not upload.data:
            raise UploadError(400, f"'{upload.name}' is an empty file (0 bytes); choose an image.")
        headers.append(read_header(upload, max_pixels=limits.max_pixels, draft_size=draft_size))
    total = sum(h.decoded_bytes for h in headers)
    if total > limits.max_decoded_bytes:
        raise UploadError(413, f"These {len(uploads)} images decode to "
                               f"{total / 2**20:.0f} MB, over the server's limit of "
                               f"{limits.max_decoded_bytes / 2**20:g} MB per request; send "
                               f"fewer or smaller images (or JPEG) per request.")
    return headers


def fit_upload(upload: Upload, *, policy: Preprocessing,
               max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [C, H, W] fitted by the model's preprocessing policy, (width, height) of the
    upload)."""
    if not upload.data:
        raise UploadError(400, f"'{upload.name}' is an empty file (0 bytes); choose an image.")
    size = image_size(upload, max_pixels=max_pixels)
    try:  # a fixed name: the client's extension must not pick the decoder (e.g. '.dcm')
        fitted = read_fitted(upload.data, "upload", policy)
    except ImageRejected as exc:
        raise UploadError(422, f"'{upload.name}' cannot be used: {exc}.") from None
    except Exception as exc:  # noqa: BLE001 - a crafted file may break a decoder in any way
        raise UploadError(422, f"'{upload.name}' cannot be decoded ({type(exc).__name__}: "
                               f"{exc}).") from None
    return fitted, size


class DecodeBudget:
    """Bounds the memory of decodes running at once, in estimated working bytes.

    Images needing more than `small` bytes share `capacity` (one at a time when they are
    large); smaller ones run in `small_lanes` threads of their own, so a normal photo is not
    queued behind a batch of huge ones. Peak: capacity + small_lanes * small.
    """

    def __init__(self, capacity: int, *, small: int, small_lanes: int = 2):
        assert 0 < small <= capacity, (small, capacity)
        self.capacity, self.small = capacity, small
        self._used = 0
        self._large = threading.Condition()
        self._lanes = threading.BoundedSemaphore(small_lanes)

    def admits(self, cost: int) -> bool:
        return cost <= self.capacity

    @contextmanager
    def hold(self, cost: int, *, deadline: float) -> Iterator[None]:
        """Wait (until the monotonic `deadline`, else TimeoutError) for room for `cost` bytes."""
        assert self.admits(cost), (cost, self.capacity)
        if cost <= self.small:
            if not self._lanes.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            try:
                yield
            finally:
                self._lanes.release()
            return
        with self._large:
            if not self._large.wait_for(lambda: self._used + cost <= self.capacity,
                                        timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            self._used += cost
        try:
            yield
        finally:
            with self._large:
                self._used -= cost
                self._large.notify_all()
