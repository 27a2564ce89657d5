"""The one reader of raw images: folders and zips of images of any size, and uploaded bytes.

Every file is decoded by anodata.imageio (one decoding policy) and fitted to a square the way
`anostyle prepare` fits it (anodata.prepare.fit_square); which files count as images is
anodata.imageio.is_image_name (one rule).

Shape letters: N batch, C channels, H/W height/width.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch

from anodata.imageio import SOURCE_EXTENSIONS, ImageRejected, decode, is_image_name
from anodata.prepare import fit_square
from stylegan.errors import UserError



@dataclass(frozen=True)
class SourceImages:
    """The usable image files of a source (folder or zip), relative posix names, sorted."""

    path: Path
    names: tuple[str, ...]

    @property
    def is_zip(self) -> bool:
        return self.path.is_file()


def list_source(path: str | os.PathLike, *, flag: str = "--source") -> SourceImages:
    """Every image file in a folder (recursively) or zip; missing or empty: a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; give a folder or zip of images.")
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise UserError(f"{flag} {path} is neither a folder nor a zip file; give a folder "
                            f"or zip of images.") from None
    else:
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    names = sorted(n for n in names if is_image_name(n))
    if not names:
        raise UserError(f"{flag} {path} contains no images ({', '.join(sorted(SOURCE_EXTENSIONS))}"
                        f"); check the path.")
    return SourceImages(path, tuple(names))


class _Reader:
    """Bytes of source files by name; a zip is opened once, in the process that reads."""

    def __init__(self, source: SourceImages):
        self.source = source
        self.zip = zipfile.ZipFile(source.path) if source.is_zip else None

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        return (self.source.path / name).read_bytes()


def read_fitted(data: bytes, name: str, *, resolution: int, channels: int) -> np.ndarray:
    """The encoded bytes of source file `name`, decoded and fitted: uint8 [C, H, W].

    Raises ImageRejected for a file that is not a usable image.
    """
    img = decode(data, suffix=PurePosixPath(name).suffix, channels=channels,
                 draft_size=resolution)
    array = np.asarray(fit_square(img, resolution), dtype=np.uint8)  # [H, W] or [H, W, C]
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # [C, H, W]


def iterate_source(source: SourceImages, *, resolution: int, channels: int, batch: int,
                   skipped: list[tuple[str, str]]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches (uint8 [N, C, H, W], names); unreadable files are appended to `skipped`."""
    images, names = [], []
    with _Reader(source) as reader:
        for name in source.names:
            try:
                images.append(read_fitted(reader.read(name), name, resolution=resolution,
                                          channels=channels))
                names.append(name)
            except ImageRejected as exc:
                skipped.append((name, str(exc)))
            if len(images) == batch:
                yield torch.from_numpy(np.stack(images)), names
                images, names = [], []
    if images:
        yield torch.from_numpy(np.stack(images)), names
