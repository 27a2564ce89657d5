"""Tests for ImageDataset: our zips, NVlabs-style zips/folders, xflip, subsets, workers, errors."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylegan.dataset import ImageDataset, iterate_batches
from stylegan.errors import UserError


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    shape = (size, size, channels) if channels == 3 else (size, size)
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _make_zip(path: Path, images: list[np.ndarray], labels: list[int] | None, *,
              extra: dict[str, bytes] | None = None) -> Path:
    """NVlabs layout: 00000/img00000000.png ... plus dataset.json."""
    with zipfile.ZipFile(path, "w") as z:
        for i, image in enumerate(images):
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", _png(image))
        if labels is not None:
            pairs = [[f"{i // 1000:05d}/img{i:08d}.png", label] for i, label in enumerate(labels)]
            z.writestr("dataset.json", json.dumps({"labels": pairs}))
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_zip_items_and_labels(tmp_path):
    images = _images(5)
    data = ImageDataset(_make_zip(tmp_path / "d.zip", images, [0, 2, 1, 0, 2]))
    assert len(data) == 5 and data.resolution == 8 and data.num_channels == 3
    assert data.names == [f"00000/img{i:08d}.png" for i in range(5)]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 2, 1, 0, 2]
    assert data.has_labels and data.label_dim == 3
    image, label = data[1]
    assert image.dtype == np.uint8 and image.shape == (3, 8, 8) and label == 2
    np.testing.assert_array_equal(image, images[1].transpose(2, 0, 1))
    unlabeled = ImageDataset(tmp_path / "d.zip", use_labels=False)
    assert unlabeled.label_dim == 0 and not unlabeled.has_labels
    assert unlabeled.labels.tolist() == [0] * 5


def test_xflip_doubles_and_mirrors(tmp_path):
    images = _images(3)
    data = ImageDataset(_make_zip(tmp_path / "d.zip", images, [0, 1, 1]), xflip=True)
    assert len(data) == 6 and data.labels.tolist() == [0, 1, 1, 0, 1, 1]
    assert data.names[3:] == data.names[:3]
    for i in range(3):
        np.testing.assert_array_equal(data[i + 3][0], images[i].transpose(2, 0, 1)[:, :, ::-1])
        np.testing.assert_array_equal(data[i][0], images[i].transpose(2, 0, 1))


def test_max_size_is_a_seeded_sorted_subset(tmp_path):
    path = _make_zip(tmp_path / "d.zip", _images(10), list(range(10)))
    a = ImageDataset(path, max_size=4)
    b = ImageDataset(path, max_size=4)
    assert len(a) == 4 and a.names == b.names and a.names == sorted(a.names)
    assert a.labels.tolist() == [int(n[-6:-4]) for n in a.names]  # label i belongs to img i
    assert ImageDataset(path, max_size=4, random_seed=1).names != a.names
    assert len(ImageDataset(path, max_size=100)) == 10


def test_nvlabs_folder_without_labels_and_grayscale(tmp_path):
    root = tmp_path / "folder"
    for i, image in enumerate(_images(3, size=16, channels=1)):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / "sub" / f"x{i}.png").write_bytes(_png(image))
    (root / "readme.txt").write_text("ignored")
    data = ImageDataset(root)
    assert data.names == ["sub/x0.png", "sub/x1.png", "sub/x2.png"]
    assert data.num_channels == 1 and data.resolution == 16 and not data.has_labels
    assert data[2][0].shape == (1, 16, 16) and data[2][1] == 0
    (root / "dataset.json").write_text(json.dumps({"labels": None}))  # NVlabs unconditional
    assert not ImageDataset(root).has_labels


def test_macos_resource_forks_are_ignored(tmp_path):
    path = _make_zip(tmp_path / "d.zip", _images(2), [0, 0],
                     extra={"__MACOSX/00000/._img00000000.png": b"junk", "._x.png": b"junk"})
    assert len(ImageDataset(path)) == 2


def test_dataloader_workers_match_sequential_reads(tmp_path):
    images = _images(12)
    data = ImageDataset(_make_zip(tmp_path / "d.zip", images, [i % 2 for i in range(12)]))
    data[0]  # opens the zip in this process before the workers fork
    batches = list(iterate_batches(data, 5, num_workers=2))
    assert [x.shape[0] for x, _, _ in batches] == [5, 5, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 8, 8)
    np.testing.assert_array_equal(x.numpy(), np.stack([im.transpose(2, 0, 1) for im in images]))
    assert torch.cat([b[1] for b in batches]).tolist() == [i % 2 for i in range(12)]
    assert sum((b[2] for b in batches), []) == data.names
    clone = copy.copy(data)  # what pickling for spawned workers sees: no open zip handle
    assert clone._zip is None and clone[3][1] == 1


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "contains no images"),
    ("nonsquare", "non-square"),
    ("mixed", "mixes image sizes"),
    ("notpow2", "power-of-two"),
    ("nolabel", "has no label for"),
    ("badzip", "not a valid zip"),
])
def test_clear_user_errors(tmp_path, case, match):
    path = tmp_path / "d.zip"
    if case == "empty":
        _make_zip(path, [], [])
    elif case == "nonsquare":
        _make_zip(path, [np.zeros((8, 16, 3), np.uint8)], None)
    elif case == "mixed":
        _make_zip(path, [np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], None)
    elif case == "notpow2":
        _make_zip(path, [np.zeros((12, 12, 3), np.uint8)], None)
    elif case == "nolabel":
        _make_zip(path, _images(2), None, extra={"dataset.json": b'{"labels": [["x.png", 0]]}'})
    elif case == "badzip":
        path.write_bytes(b"PK but not really")
    with pytest.raises(UserError, match=match):
        ImageDataset(path)


def test_rot90_with_mirror_gives_the_eight_symmetries_of_the_square(tmp_path):
    images = _images(2)
    data = ImageDataset(_make_zip(tmp_path / "d.zip", images, [0, 1]), xflip=True, rot90=True)
    assert len(data) == 16 and data.labels.tolist() == [0, 1] * 8
    for i in range(2):
        chw = images[i].transpose(2, 0, 1)
        variants = [data[i + 2 * v][0] for v in range(8)]
        expected = [np.rot90(f, k, axes=(1, 2)) for k in range(4) for f in (chw, chw[:, :, ::-1])]
        for got, want in zip(variants, expected):
            np.testing.assert_array_equal(got, want)
        assert len({v.tobytes() for v in variants}) == 8  # random images: all 8 differ
    # rotating by 90 degrees moves the top-left pixel to the bottom-left corner
    np.testing.assert_array_equal(data[2 * 2][0][:, -1, 0], images[0][0, 0])
