"""Prepared image datasets: a zip or folder of square images plus an optional `dataset.json`.

The format is the one NVlabs' stylegan2-ada-pytorch `dataset_tool.py` writes (Karras et al. 2020,
"Training Generative Adversarial Networks with Limited Data"), so datasets made by either tool load
here: image files (any of `stylegan.imageio.IMAGE_EXTENSIONS`, at any depth) and
`dataset.json` = `{"labels": [[relative_name, int_label], ...]}` or `{"labels": null}`.
`anostyle prepare` writes `{train,val,test}.zip` in this format with label 0 = normal.

Images are read lazily: nothing but the names and image headers is read at construction, and the
zip file is (re)opened per process, so the dataset works in a torch DataLoader with workers.
Items are uint8 arrays [C, H, W] (C = 1 or 3) and an int label.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from stylegan.errors import UserError
from stylegan.fileio import UntrustedJSONError, loads_untrusted
from stylegan.imageio import (IMAGE_EXTENSIONS, ImageRejected, channels_of_mode, is_image_name,
                              open_image, to_8bit)

DATASET_JSON = "dataset.json"


class ImageDataset(torch.utils.data.Dataset):
    """A prepared dataset (zip or folder). Item i -> (uint8 array [C, H, W], int label).

    xflip: double the length; items len/2.. are the mirrored (left-right) images.
    rot90: four times the length; the k-th quarter (k = 0..3) holds the images rotated by
        k * 90 degrees (after any mirror), so xflip + rot90 give all 8 symmetries of the square.
    max_size: keep a random subset of at most this many images (before xflip; `random_seed`).
    use_labels: read labels from dataset.json; if False, every label is 0 and label_dim is 0
        (what unconditional GAN training wants).
    """

    def __init__(self, path: str | os.PathLike, *, xflip: bool = False, rot90: bool = False,
                 max_size: int | None = None, use_labels: bool = True, random_seed: int = 0):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        raw_names = self._list_images()
        raw_labels = self._load_labels(raw_names) if use_labels else None
        self.has_labels = raw_labels is not None
        if raw_labels is None:
            raw_labels = np.zeros(len(raw_names), dtype=np.int64)
        self.label_dim = int(raw_labels.max()) + 1 if self.has_labels else 0

        index = np.arange(len(raw_names))
        if max_size is not None and len(index) > max_size:
            index = np.sort(np.random.RandomState(random_seed).permutation(index)[:max_size])
        flips = (False, True) if xflip else (False,)
        turns = (0, 1, 2, 3) if rot90 else (0,)
        variants = [(f, k) for k in turns for f in flips]  # identity first
        self._raw_index = np.concatenate([index] * len(variants))  # [len]
        self._xflip = np.repeat([f for f, _k in variants], len(index)).astype(bool)  # [len]
        self._rot90 = np.repeat([k for _f, k in variants], len(index)).astype(np.int64)  # [len]
        self._raw_names = raw_names
        self.names = [raw_names[i] for i in self._raw_index]
        self.labels = raw_labels[self._raw_index].astype(np.int64)
        self.num_channels, self.resolution = self._check_shapes(raw_names, index)

    # ---------------------------------------------------------------- item access

    def __len__(self) -> int:
        return len(self._raw_index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        name = self._raw_names[self._raw_index[i]]
        image = self._read_array(name)  # [C, H, W]
        if image.shape != (self.num_channels, self.resolution, self.resolution):
            raise UserError(f"{self._where(name)} is {image.shape[2]}x{image.shape[1]} with "
                            f"{image.shape[0]} channels, unlike the other images "
                            f"({self.resolution}x{self.resolution}, {self.num_channels}); "
                            f"rebuild the dataset with `anostyle prepare`.")
        if self._xflip[i]:
            image = image[:, :, ::-1]
        if self._rot90[i]:
            image = np.rot90(image, k=int(self._rot90[i]), axes=(1, 2))  # counter-clockwise
        return np.ascontiguousarray(image), int(self.labels[i])

    def __repr__(self) -> str:
        return (f"ImageDataset({str(self.path)!r}, len={len(self)}, resolution={self.resolution}, "
                f"num_channels={self.num_channels}, label_dim={self.label_dim})")

    # ---------------------------------------------------------------- files

    @property
    def _is_zip(self) -> bool:
        return self.path.is_file()

    def _get_zip(self) -> zipfile.ZipFile:
        # zipfile handles must not cross a fork: reopen in every process.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"] = None
        state["_zip_pid"] = None
        return state

    def close(self) -> None:
        """Close the zip handle of this process (it reopens on the next access)."""
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip = None
        self._zip_pid = None

    def _open(self, name: str):
        if self._is_zip:
            return self._get_zip().open(name, "r")
        return open(self.path / name, "rb")

    def _read_bytes(self, name: str) -> bytes:
        with self._open(name) as f:
            return f.read()

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}" if self._is_zip else str(self.path / name)

    def _list_images(self) -> list[str]:
        """Sorted relative names (posix) of every image file in the zip or folder."""
        if not self.path.exists():
            raise UserError(f"Dataset {self.path} does not exist; give a zip or folder made by "
                            f"`anostyle prepare` (or NVlabs dataset_tool.py).")
        if self._is_zip:
            try:
                names = self._get_zip().namelist()
            except zipfile.BadZipFile:
                raise UserError(f"Dataset {self.path} is not a valid zip file; rebuild it with "
                                f"`anostyle prepare`.") from None
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                     if p.is_file()]
        names = sorted(n for n in names if is_image_name(n, IMAGE_EXTENSIONS))
        if not names:
            raise UserError(f"Dataset {self.path} contains no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path or rebuild "
                            f"it with `anostyle prepare`.")
        return names

    def _load_labels(self, names: list[str]) -> np.ndarray | None:
        """Labels from dataset.json in file order, or None when it is absent or null."""
        try:
            raw = loads_untrusted(self._read_bytes(DATASET_JSON))
        except (FileNotFoundError, KeyError):
            return None
        except UntrustedJSONError as exc:
            raise UserError(f"{self._where(DATASET_JSON)} cannot be read: {exc}; rebuild the "
                            f"dataset with `anostyle prepare`.") from None
        pairs = raw.get("labels") if isinstance(raw, dict) else None
        if pairs is None:
            return None
        by_name = self._label_pairs(pairs)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UserError(f"{self._where(DATASET_JSON)} has no label for {missing[0]} "
                            f"({len(missing)} images without label); rebuild the dataset.")
        absent = sorted(set(by_name) - set(names))
        if absent:
            raise UserError(f"{self._where(DATASET_JSON)} lists {len(absent)} image"
                            f"{'s' * (len(absent) != 1)} that the dataset does not hold (first: "
                            f"{absent[0][:120]}); rebuild the dataset with `anostyle prepare`.")
        labels = [by_name[n] for n in names]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
            raise UserError(f"{self._where(DATASET_JSON)} holds labels that are not non-negative "
                            f"integers; AnoStyle needs class indices (0 = normal).")
        return np.asarray(labels, dtype=np.int64)

    def _label_pairs(self, pairs: object) -> dict[str, object]:
        """dataset.json's labels as {relative name: label}; a wrong shape, a name leaving the
        dataset or a name given twice is one sentence."""
        where = self._where(DATASET_JSON)
        fix = 'it must be {"labels": [["relative/name.png", 0], ...]} or {"labels": null}'
        if not isinstance(pairs, list):
            raise UserError(f"{where} has 'labels' of type {type(pairs).__name__}; {fix}.")
        by_name: dict[str, object] = {}
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise UserError(f"{where} has the label entry {json.dumps(pair)[:80]}, not a "
                                f"[name, label] pair; {fix}.")
            name = pair[0].replace("\\", "/")
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
                raise UserError(f"{where} names {name[:120]!r}, which lies outside the dataset; "
                                f"rebuild the dataset with `anostyle prepare`.")
            if name in by_name:
                raise UserError(f"{where} lists {name[:120]} twice; rebuild the dataset with "
                                f"`anostyle prepare`.")
            by_name[name] = pair[1]
        return by_name

    # ---------------------------------------------------------------- pixels

    def _read_header(self, name: str) -> tuple[int, int, int]:
        """(width, height, channels) from the image header, without decoding pixels."""
        with self._open(name) as f:
            try:
                with Image.open(f) as img:
                    return img.size[0], img.size[1], channels_of_mode(img.mode)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise UserError(f"{self._where(name)} is not a readable image ({exc}); "
                                f"rebuild the dataset with `anostyle prepare`.") from None

    def _check_shapes(self, names: list[str], index: np.ndarray) -> tuple[int, int]:
        """Check that all used images are square, of one size and one channel count."""
        shapes: dict[tuple[int, int, int], str] = {}
        for i in index:
            shapes.setdefault(self._read_header(names[i]), names[i])
        if len(shapes) > 1:
            (a, name_a), (b, name_b) = list(shapes.items())[:2]
            raise UserError(f"Dataset {self.path} mixes image sizes or channel counts: "
                            f"{name_a} is {a[0]}x{a[1]}x{a[2]}, {name_b} is {b[0]}x{b[1]}x{b[2]}; "
                            f"rebuild it with `anostyle prepare --resolution R`.")
        (width, height, channels), name = next(iter(shapes.items()))
        if width != height:
            raise UserError(f"Dataset {self.path} has non-square images ({name} is "
                            f"{width}x{height}); rebuild it with `anostyle prepare`.")
        if width < 4 or width & (width - 1):
            raise UserError(f"Dataset {self.path} has {width}x{width} images, but StyleGAN needs a "
                            f"power-of-two resolution (e.g. 64, 128, 256); rebuild it with "
                            f"`anostyle prepare --resolution 256`.")
        return channels, width

    def _read_array(self, name: str) -> np.ndarray:
        try:
            img = to_8bit(open_image(self._read_bytes(name)), self.num_channels)
        except ImageRejected as exc:
            raise UserError(f"{self._where(name)} cannot be used: {exc}; rebuild the dataset "
                            f"with `anostyle prepare`.") from None
        array = np.array(img, dtype=np.uint8)  # [H, W] or [H, W, C], a writable copy
        if array.ndim == 2:
            array = array[:, :, None]
        return np.ascontiguousarray(array.transpose(2, 0, 1))  # [C, H, W]


class _Named(torch.utils.data.Dataset):
    """Wrap an ImageDataset so that items also carry their file name (for iterate_batches)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, str]:
        image, label = self.dataset[i]
        return image, label, self.dataset.names[i]


def iterate_batches(dataset: ImageDataset, batch_size: int, *,
                    num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Yield (uint8 images [N, C, H, W], int64 labels [N], names) in dataset order (no shuffle)."""
    assert batch_size > 0, batch_size
    loader = torch.utils.data.DataLoader(_Named(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, drop_last=False)
    for images, labels, names in loader:
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        yield images, labels.to(torch.int64), list(names)
