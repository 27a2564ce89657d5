"""The one reader of raw images: folders and zips of images of any size, and uploaded bytes.

Every file is decoded by stylegan.imageio (one decoding policy) and fitted to a square the way
`anostyle prepare` fits it (anodata.policy: the model's recorded preprocessing); which files count as images is
stylegan.imageio.is_image_name (one rule).

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

from anodata.policy import Preprocessing, fit_array
from stylegan.errors import UserError
from stylegan.imageio import SOURCE_EXTENSIONS, ImageRejected, is_image_name



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


def read_fitted(data: bytes, name: str, policy: Preprocessing) -> np.ndarray:
    """The encoded bytes of source file `name` (or an upload), decoded and fitted by `policy`
    exactly as `anostyle prepare` fits it: uint8 [C, H, W].

    Raises ImageRejected for a file that is not a usable image.
    """
    return fit_array(data, PurePosixPath(name).suffix, policy)


def iterate_source(source: SourceImages, *, policy: Preprocessing, batch: int,
                   skipped: list[tuple[str, str]]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches (uint8 [N, C, H, W], names); unreadable files are appended to `skipped`."""
    images, names = [], []
    with _Reader(source) as reader:
        for name in source.names:
            try:
                images.append(read_fitted(reader.read(name), name, policy))
                names.append(name)
            except ImageRejected as exc:
                skipped.append((name, str(exc)))
            if len(images) == batch:
                yield torch.from_numpy(np.stack(images)), names
                images, names = [], []
    if images:
        yield torch.from_numpy(np.stack(images)), names
