"""The one image reader of the data package: image-name rule, folders and zips alike."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from anodata.policy import Preprocessing
from anodata.reader import iterate_source, list_source, read_fitted
from stylegan.imageio import IMAGE_EXTENSIONS, is_image_name


@pytest.mark.parametrize("name, expected", [
    ("a.png", True), ("x/y/B.JPG", True), ("scan.dcm", True), ("x/", False), ("notes.txt", False),
    ("__MACOSX/a.png", False), ("x/._a.png", False), (".hidden/a.png", False), ("x/.a.png", False),
])
def test_one_image_name_rule(name, expected):
    assert is_image_name(name) is expected


def test_prepared_sets_use_the_same_rule_without_dicom():
    assert not is_image_name("scan.dcm", IMAGE_EXTENSIONS)
    assert is_image_name("00000/img00000000.png", IMAGE_EXTENSIONS)


def _png(value: int, size=(10, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_and_zip_give_the_same_batches(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(10))
    (folder / "sub" / "b.png").write_bytes(_png(200))
    (folder / "._a.png").write_bytes(b"resource fork")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for name in ("a.png", "sub/b.png", "._a.png"):
            zf.write(folder / name, name)
    out = []
    for path in (folder, tmp_path / "imgs.zip"):
        source = list_source(path)
        assert source.names == ("a.png", "sub/b.png")
        skipped: list = []
        (images, names), = iterate_source(source, policy=Preprocessing(resolution=4), batch=8,
                                          skipped=skipped)
        assert names == ["a.png", "sub/b.png"] and not skipped
        out.append(images.numpy())
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0].shape == (2, 3, 4, 4) and out[0][0].max() == 10 and out[0][1].min() == 200
    # uploaded bytes go through the same function
    np.testing.assert_array_equal(read_fitted(_png(10), "upload", Preprocessing(resolution=4)),
                                  out[0][0])
