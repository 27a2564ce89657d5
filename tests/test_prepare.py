"""Tests for `anostyle prepare`: odd inputs, layouts, grouped splits, outputs, CLI."""

from __future__ import annotations

import csv
import io
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly.cli import main
from anodata import prepare as prepare_module
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError
from stylegan.imageio import ImageRejected, decode, open_image, to_8bit
from anodata.policy import fit_square
from anodata.prepare import (MANIFEST_COLUMNS, PrepareOptions, prepare_dataset,
                              split_group_sizes)

# ----------------------------------------------------------------------------- fixtures


def _save(path: Path, img: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kwargs)
    return path


def _solid(path: Path, color, size=(12, 8), mode="RGB", **kwargs) -> Path:
    """An image of one color (so any resize filter keeps the value exactly)."""
    return _save(path, Image.new(mode, size, color), **kwargs)


def _noise(path: Path, seed: int, size=(24, 16)) -> Path:
    """A random RGB image (unique content, so no two are duplicates)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return _save(path, Image.fromarray(pixels))


def _raw_png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2,
             scanlines: bytes = b"\0") -> bytes:
    """A PNG built by hand: IHDR as given, IDAT = zlib(scanlines) (each row: filter byte + data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height, with one tiny IDAT (never allocated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_raw_png(width, height))
    return path


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _opts(source: Path, dest: Path, **kwargs) -> PrepareOptions:
    kwargs.setdefault("normal", ("nv",))
    kwargs.setdefault("resolution", 8)
    kwargs.setdefault("workers", 1)
    return PrepareOptions(source=source, dest=dest, **kwargs)


def _zip_labels(path: Path) -> list[list]:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("dataset.json"))["labels"]


# ----------------------------------------------------------------------------- decoding


def test_sixteen_bit_png_is_shifted_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 4660, 32768, 65535]], dtype=np.uint16)
    img = open_image(_encode(Image.fromarray(values), "PNG"))
    assert img.mode == "I;16"
    out = np.asarray(to_8bit(img, 1))
    np.testing.assert_array_equal(out, [[0, 0, 1, 18, 128, 255]])  # value >> 8
    rgb = np.asarray(to_8bit(img, 3))
    np.testing.assert_array_equal(rgb[0, :, 1], [0, 0, 1, 18, 128, 255])


def test_sixteen_bit_rgb_png_keeps_the_high_byte():
    pixel = struct.pack(">HHH", 0x1234, 0x80FF, 0xFFFF)  # one 16-bit RGB pixel
    data = _raw_png(1, 1, bit_depth=16, color_type=2, scanlines=b"\0" + pixel)
    out = np.asarray(decode(data, suffix=".png", channels=3))
    np.testing.assert_array_equal(out[0, 0], [0x12, 0x80, 0xFF])  # >> 8, not clipped to 255


def test_rgba_is_composited_on_black_and_palette_converted():
    rgba = Image.new("RGBA", (2, 2), (200, 100, 50, 128))
    out = np.asarray(decode(_encode(rgba, "PNG"), suffix=".png", channels=3))
    np.testing.assert_array_equal(out[0, 0], [100, 50, 25])  # round(c * 128 / 255)
    palette = Image.new("P", (3, 1), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * 759)
    palette.putpixel((0, 0), 2)
    palette.info["transparency"] = 2  # index 2 is fully transparent -> black
    out = np.asarray(decode(_encode(palette, "PNG", transparency=2), suffix=".png", channels=3))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [10, 20, 30], [10, 20, 30]])


def test_gray_cmyk_and_channels():
    gray = decode(_encode(Image.new("L", (2, 2), 77), "PNG"), suffix=".png", channels=3)
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[0, 0]) == (77, 77, 77)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    red = np.asarray(decode(_encode(cmyk, "JPEG", quality=95), suffix=".jpg", channels=3))
    assert np.abs(red[8, 8].astype(int) - [255, 0, 0]).max() <= 3
    luma = decode(_encode(Image.new("RGB", (2, 2), (200, 100, 50)), "PNG"), suffix=".png",
                  channels=1)
    assert luma.mode == "L" and np.asarray(luma)[0, 0] == 124  # .299*200+.587*100+.114*50


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = open_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 50  # top: red
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 50  # bottom: blue


@pytest.mark.parametrize("keep", [0.5, 0.97, -2])
def test_truncated_jpeg_is_rejected(keep):
    pixels = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    cut = data[:int(len(data) * keep)] if keep > 0 else data[:keep]
    for draft in (None, 8):
        with pytest.raises(ImageRejected, match="truncated"):
            decode(cut, suffix=".jpg", draft_size=draft)


def test_bombs_and_garbage_are_rejected_before_decoding(tmp_path):
    huge = _png_header_only(tmp_path / "huge.png", 20000, 20000).read_bytes()  # 400 MP
    with pytest.raises(ImageRejected, match="decompression bomb"):
        open_image(huge)
    big = _png_header_only(tmp_path / "big.png", 12000, 10000).read_bytes()  # 120 MP
    with pytest.raises(ImageRejected, match="120 megapixels, over the 100-megapixel limit"):
        open_image(big)
    with pytest.raises(ImageRejected, match="not an image"):
        open_image(b"hello, I am text")
    with pytest.raises(ImageRejected, match="empty file"):
        open_image(b"")


def test_dicom_without_pydicom_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImageRejected, match="pydicom"):
        decode(b"DICM", suffix=".dcm")


def test_dicom_with_pydicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = 2, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.array([[0, 16, 4095], [2048, 256, 17]], np.uint16).tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = np.asarray(decode(path.read_bytes(), suffix=".dcm", channels=1))
    np.testing.assert_array_equal(out, [[0, 1, 255], [128, 16, 1]])  # 12 bit >> 4


# ----------------------------------------------------------------------------- transforms


def test_fit_square_transforms():
    img = Image.new("L", (8, 4), 0)
    img.paste(200, (2, 0, 6, 4))  # middle 4x4 bright, sides dark
    crop = np.asarray(fit_square(img, 4, transform="center-crop"))
    assert (crop == 200).all()
    stretch = np.asarray(fit_square(img, 4, transform="resize"))
    np.testing.assert_array_equal(stretch[0], [0, 200, 200, 0])
    pad = np.asarray(fit_square(Image.new("L", (8, 4), 90), 8, transform="pad"))
    assert (pad[:2] == 0).all() and (pad[2:6] == 90).all() and (pad[6:] == 0).all()


def test_split_group_sizes_hand_counts():
    assert split_group_sizes([1] * 10, val=0.1, test=0.2, train=True) == \
        ["test"] * 2 + ["val"] + ["train"] * 7
    assert split_group_sizes([3, 1, 1, 1, 1, 1, 1, 1], val=0.1, test=0.2, train=True) == \
        ["test", "val"] + ["train"] * 6
    # abnormal: test gets test / (val + test) = 2/3 of 6 -> 4, the rest val
    assert split_group_sizes([1] * 6, val=0.1, test=0.2, train=False) == ["test"] * 4 + ["val"] * 2
    assert split_group_sizes([1] * 4, val=0.0, test=0.0, train=True) == ["train"] * 4


# ----------------------------------------------------------------------------- class folders


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    """Layout (a): 10 usable nv, 4 usable mel, and one of every odd input."""
    src = tmp_path / "src"
    for i in range(10):
        _noise(src / "nv" / f"n{i:02d}.png", seed=i)
    for i in range(4):
        _noise(src / "mel" / f"m{i}.jpg", seed=100 + i)
    (src / "nv" / "empty.jpg").write_bytes(b"")
    good = (src / "nv" / "n00.png").read_bytes()
    (src / "nv" / "zz_copy.png").write_bytes(good)  # duplicate of n00.png
    jpeg = (src / "mel" / "m0.jpg").read_bytes()
    (src / "mel" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "mel" / "text.png").write_text("not an image")
    _png_header_only(src / "mel" / "huge.png", 20000, 20000)
    (src / "nv" / "notes.txt").write_text("a note")
    _noise(src / "loose.png", seed=999)  # not in a class folder
    return src


def test_class_folders_with_odd_inputs(odd_folder, tmp_path):
    dest = tmp_path / "out"
    summary = prepare_dataset(_opts(odd_folder, dest, val=0.2, test=0.2))
    assert summary.class_map == {"nv": 0, "mel": 1}
    reasons = {r["source"]: r["reason"] for r in _rows(dest / "rejected.csv")}
    assert reasons["nv/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["nv/zz_copy.png"] == "duplicate of nv/n00.png"
    assert "truncated" in reasons["mel/truncated.jpg"]
    assert "not an image" in reasons["mel/text.png"]
    assert "decompression bomb" in reasons["mel/huge.png"]
    assert "unsupported file type" in reasons["nv/notes.txt"]
    assert "not inside a class folder" in reasons["loose.png"]
    assert len(reasons) == summary.num_rejected == 7
    # 10 nv: test round(2) + val round(2) + train 6; 4 mel: test 2, val 2
    assert summary.counts == {"train": {"nv": 6, "mel": 0}, "val": {"nv": 2, "mel": 2},
                              "test": {"nv": 2, "mel": 2}}
    assert sorted(p.name for p in dest.iterdir()) == [
        "manifest.csv", "prepare.json", "rejected.csv", "test.zip", "train.zip", "val.zip"]


def test_outputs_round_trip_through_image_dataset(odd_folder, tmp_path):
    dest = tmp_path / "out"
    prepare_dataset(_opts(odd_folder, dest, transform="resize", resize_filter="lanczos"))
    manifest = _rows(dest / "manifest.csv")
    assert tuple(manifest[0]) == MANIFEST_COLUMNS
    info = json.loads((dest / "prepare.json").read_text())
    assert info["class_map"] == {"nv": 0, "mel": 1} and info["elapsed_seconds"] >= 0
    for split in ("train", "val", "test"):
        data = ImageDataset(dest / f"{split}.zip")
        rows = [r for r in manifest if r["split"] == split]
        assert data.names == [r["file"] for r in rows]
        assert data.labels.tolist() == [int(r["label"]) for r in rows]
        assert _zip_labels(dest / f"{split}.zip") == [[r["file"], int(r["label"])] for r in rows]
        for i, row in enumerate(rows):
            source = (odd_folder / row["source"]).read_bytes()
            expected = fit_square(decode(source, suffix=Path(row["source"]).suffix), 8,
                                  transform="resize", resize_filter="lanczos")
            image, label = data[i]
            assert image.shape == (3, 8, 8) and label == int(row["label"])
            np.testing.assert_array_equal(image, np.asarray(expected).transpose(2, 0, 1))
            assert row["sha256"] == __import__("hashlib").sha256(source).hexdigest()
    assert all(r["label"] == "0" for r in manifest if r["split"] == "train")


def test_pixel_conversions_end_to_end(tmp_path):
    src = tmp_path / "src"
    _save(src / "nv" / "sixteen.png", Image.fromarray(np.full((8, 8), 0x1234, np.uint16)))
    _solid(src / "nv" / "rgba.png", (200, 100, 50, 128), mode="RGBA")
    _solid(src / "nv" / "gray.png", 77, mode="L")
    dest = tmp_path / "out"
    prepare_dataset(_opts(src, dest, val=0, test=0, channels=3))
    data = ImageDataset(dest / "train.zip")
    by_source = {r["file"]: r["source"] for r in _rows(dest / "manifest.csv")}
    pixels = {by_source[name]: data[i][0][:, 0, 0].tolist() for i, name in enumerate(data.names)}
    assert pixels == {"nv/sixteen.png": [18, 18, 18], "nv/rgba.png": [100, 50, 25],
                      "nv/gray.png": [77, 77, 77]}
    prepare_dataset(_opts(src, dest, val=0, test=0, channels=1))
    gray = ImageDataset(dest / "train.zip")
    assert gray.num_channels == 1 and gray[0][0].shape == (1, 8, 8)


def test_exif_rotated_jpeg_end_to_end(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    _save(tmp_path / "src" / "nv" / "rot.jpg", img, exif=exif.tobytes(), quality=95)
    prepare_dataset(_opts(tmp_path / "src", tmp_path / "out", val=0, test=0,
                          transform="resize", resolution=8))
    image = ImageDataset(tmp_path / "out" / "train.zip")[0][0].astype(int)  # [3, 8, 8]
    assert image[0, 1, 4] > 200 and image[0, 6, 4] < 60  # red on top after rotation


# ----------------------------------------------------------------------------- CSV layouts


def _ham_like(tmp_path: Path) -> tuple[Path, Path]:
    """HAM-style images + metadata: 12 nv lesions (some with 2-3 images), 6 mel lesions."""
    images = tmp_path / "images"
    lines = ["lesion_id,image_id,dx,dx_type"]
    k = 0
    for lesion in range(18):
        dx = "nv" if lesion < 12 else "mel"
        for _ in range(1 + lesion % 3):
            image_id = f"ISIC_{k:07d}"
            _noise(images / "part" / f"{image_id}.jpg", seed=k)
            lines.append(f"HAM_{lesion:04d},{image_id},{dx},histo")
            k += 1
    lines.append("HAM_9999,ISIC_missing,nv,histo")  # row without an image
    _noise(images / "ISIC_norow.jpg", seed=777)  # image without a row
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return images, csv_path


def _ham_opts(tmp_path, images, csv_path, dest_name="out", **kwargs) -> PrepareOptions:
    return _opts(images, tmp_path / dest_name, labels=csv_path, id_column="image_id",
                 label_column="dx", group_column="lesion_id", **kwargs)


def test_ham_csv_groups_never_cross_splits(tmp_path):
    images, csv_path = _ham_like(tmp_path)
    summary = prepare_dataset(_ham_opts(tmp_path, images, csv_path, val=0.2, test=0.3))
    reasons = {r["source"]: r["reason"] for r in _rows(tmp_path / "out" / "rejected.csv")}
    assert "no image file named ISIC_missing" in reasons["ISIC_missing"]
    assert reasons["ISIC_norow.jpg"] == "no row for this image in meta.csv"
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == summary.num_images == 36
    splits_of_group: dict[str, set] = {}
    for r in manifest:
        splits_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert len(splits_of_group) == 18
    assert {r["class"] for r in manifest if r["split"] == "train"} == {"nv"}
    assert {r["split"] for r in manifest if r["class"] == "mel"} <= {"val", "test"}
    assert manifest[0]["source"].startswith("part/ISIC_")


def test_group_with_an_abnormal_image_stays_out_of_train(tmp_path):
    images = tmp_path / "images"
    lines = ["lesion_id,image_id,dx"] + [f"L{i},n{i},nv" for i in range(8)]
    lines += ["MIX,mix_nv,nv", "MIX,mix_mel,mel"]
    for i, line in enumerate(lines[1:]):
        _noise(images / f"{line.split(',')[1]}.png", seed=i)
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    prepare_dataset(_opts(images, tmp_path / "out", labels=tmp_path / "m.csv",
                          label_column="dx", group_column="lesion_id", val=0.0, test=0.25))
    mixed = {r["split"] for r in _rows(tmp_path / "out" / "manifest.csv") if r["group"] == "MIX"}
    assert mixed == {"test"}  # val 0: the whole lesion, naevus image included, is test


def test_splits_are_deterministic_and_independent_of_workers(tmp_path):
    images, csv_path = _ham_like(tmp_path)
    prepare_dataset(_ham_opts(tmp_path, images, csv_path, "a", seed=3))
    prepare_dataset(_ham_opts(tmp_path, images, csv_path, "b", seed=3, workers=2))
    prepare_dataset(_ham_opts(tmp_path, images, csv_path, "c", seed=4))
    for name in ("train.zip", "val.zip", "test.zip", "manifest.csv", "rejected.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    groups = [{(r["group"], r["split"]) for r in _rows(tmp_path / d / "manifest.csv")}
              for d in "ac"]
    assert groups[0] != groups[1]  # another seed, another split


def test_max_per_class_takes_whole_groups(tmp_path):
    images, csv_path = _ham_like(tmp_path)
    summary = prepare_dataset(_ham_opts(tmp_path, images, csv_path, max_per_class=5))
    per_class = {c: sum(summary.counts[s][c] for s in summary.counts) for c in ("nv", "mel")}
    assert per_class == {"nv": 5, "mel": 5}
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    sizes = {}
    for r in manifest:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    assert all(size == 1 + int(g[4:]) % 3 for g, size in sizes.items())  # whole lesions


def test_onehot_csv(tmp_path):
    images = tmp_path / "images"
    rows = ["image,MEL,NV,BCC", "a,0.0,1.0,0.0", "b,1.0,0.0,0.0", "c,0,0,1", "d,0,0,0",
            "e,1,1,0", "f,0,1,0", "g,0,1,0"]
    for i, name in enumerate("abcdefg"):
        _noise(images / f"{name}.jpg", seed=i)
    (tmp_path / "gt.csv").write_text("\n".join(rows) + "\n")
    summary = prepare_dataset(_opts(images, tmp_path / "out", labels=tmp_path / "gt.csv",
                                    onehot_columns=("MEL", "NV", "BCC"), normal=("NV",)))
    assert summary.class_map == {"NV": 0, "BCC": 1, "MEL": 2}
    reasons = {r["source"]: r["reason"] for r in _rows(tmp_path / "out" / "rejected.csv")}
    assert "no one-hot column is set" in reasons["d"]
    assert "several one-hot columns" in reasons["e"]
    # ISIC 2017 style: all-zero rows are a third class named by --onehot-zero-class
    (tmp_path / "gt17.csv").write_text("image_id,melanoma,seborrheic_keratosis\n"
                                       "a,0,0\nb,1,0\nc,0,1\nd,0,0\n")
    summary = prepare_dataset(_opts(images, tmp_path / "out17", labels=tmp_path / "gt17.csv",
                                    onehot_columns=("melanoma", "seborrheic_keratosis"),
                                    onehot_zero_class="nevus", normal=("nevus",)))
    assert summary.class_map == {"nevus": 0, "melanoma": 1, "seborrheic_keratosis": 2}
    assert sum(summary.counts[s]["nevus"] for s in summary.counts) == 2


def test_given_splits_are_kept(tmp_path):
    src = tmp_path / "src"
    seed = iter(range(100))
    for split, cls, n in [("train", "nv", 4), ("val", "nv", 2), ("val", "mel", 1),
                          ("test", "nv", 2), ("test", "mel", 3), ("train", "mel", 1)]:
        for i in range(n):
            _noise(src / split / cls / f"{split}{cls}{i}.png", seed=next(seed))
    summary = prepare_dataset(_opts(src, tmp_path / "out"))
    assert summary.counts == {"train": {"nv": 4, "mel": 0}, "val": {"nv": 2, "mel": 1},
                              "test": {"nv": 2, "mel": 3}}
    reasons = {r["source"]: r["reason"] for r in _rows(tmp_path / "out" / "rejected.csv")}
    assert reasons == {"train/mel/trainmel0.png":
                       "class mel is not normal; train.zip holds normal images only"}
    for r in _rows(tmp_path / "out" / "manifest.csv"):
        assert r["source"].split("/")[0] == r["split"]


# ----------------------------------------------------------------------------- failures


def test_unknown_normal_class_names_the_classes(odd_folder, tmp_path):
    with pytest.raises(UserError, match="classes found: mel, nv"):
        prepare_dataset(_opts(odd_folder, tmp_path / "out", normal=("naevus",)))


def test_bad_options_are_user_errors(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(UserError, match="power of two"):
        _opts(tmp_path / "src", tmp_path / "out", resolution=100)
    with pytest.raises(UserError, match="below 1"):
        _opts(tmp_path / "src", tmp_path / "out", val=0.5, test=0.5)
    with pytest.raises(UserError, match="not a folder"):
        _opts(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(UserError, match="need --labels"):
        _opts(tmp_path / "src", tmp_path / "out", group_column="lesion_id")


def test_no_usable_image_leaves_no_zip(tmp_path):
    src = tmp_path / "src"
    (src / "nv").mkdir(parents=True)
    (src / "nv" / "a.png").write_text("not a png")
    dest = tmp_path / "out"
    with pytest.raises(UserError, match="No usable image"):
        prepare_dataset(_opts(src, dest))
    assert sorted(p.name for p in dest.iterdir()) == ["rejected.csv"]


def test_crash_mid_write_keeps_old_outputs(odd_folder, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    prepare_dataset(_opts(odd_folder, dest))
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    calls = []

    def failing_entry(name):
        calls.append(name)
        if len(calls) == 5:  # in the middle of writing the zips
            raise RuntimeError("disk on fire")
        return original(name)

    original = prepare_module._zip_entry
    monkeypatch.setattr(prepare_module, "_zip_entry", failing_entry)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_dataset(_opts(odd_folder, dest, resolution=16))
    assert len(calls) == 5
    after = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert after == before  # old zips and CSVs intact, no temp or spool file left


# ----------------------------------------------------------------------------- CLI


def test_cli_summary_strict_and_errors(odd_folder, tmp_path):
    runner = CliRunner()
    args = ["prepare", "--source", str(odd_folder), "--normal", "nv", "--resolution", "8",
            "--workers", "1"]
    ok = runner.invoke(main, args + ["--dest", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    assert "total" in ok.output and "7 inputs rejected" in ok.output
    strict = runner.invoke(main, args + ["--dest", str(tmp_path / "b"), "--strict"])
    assert strict.exit_code == 1 and "--strict: 7 inputs were rejected" in strict.output
    assert (tmp_path / "b" / "train.zip").is_file()  # written, but the run counts as failed
    bad = runner.invoke(main, args[:4] + ["mole", "--dest", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "classes found: mel, nv" in bad.output
    assert "Traceback" not in bad.output
    empty = tmp_path / "empty" / "nv"
    empty.mkdir(parents=True)
    none = runner.invoke(main, ["prepare", "--source", str(empty.parent), "--normal", "nv",
                                "--dest", str(tmp_path / "d")])
    assert none.exit_code == 1 and "No usable image was found" in none.output


# ----------------------------------------------------------------------------- real data


def test_real_ham10000_subset(ham_dir, tmp_path):
    options = PrepareOptions(source=ham_dir / "images", dest=tmp_path / "out", normal=("nv",),
                             labels=ham_dir / "metadata.csv", id_column="image_id",
                             label_column="dx", group_column="lesion_id", resolution=16,
                             max_per_class=10, workers=2)
    summary = prepare_dataset(options)
    assert summary.class_map == {"nv": 0, "mel": 1}  # the demo's two classes
    assert summary.num_images == 20 and summary.num_rejected == 0
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    lesion_splits = {}
    for r in manifest:
        lesion_splits.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in lesion_splits.values())
    test = ImageDataset(tmp_path / "out" / "test.zip")
    assert test.resolution == 16 and set(test.labels.tolist()) == {0, 1}


def test_shades_of_gray_makes_the_illuminant_grey_and_keeps_neutral_images():
    from anodata.policy import shades_of_gray
    rng = np.random.default_rng(0)
    grey = rng.integers(20, 200, size=(16, 16, 1)).repeat(3, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(shades_of_gray(grey), grey)  # already neutral
    cast = np.clip(grey * np.array([1.0, 0.8, 0.6]), 0, 255).astype(np.uint8)  # a warm cast
    out = shades_of_gray(cast, 6.0).astype(np.float64)
    e = np.mean(out ** 6, axis=(0, 1)) ** (1 / 6)  # the illuminant estimate after correction
    assert np.ptp(e) / e.mean() < 0.01, e  # grey to rounding
    # gain by hand for one pixel: |e| / (sqrt(3) e_c)
    e0 = np.mean(cast.astype(np.float64) ** 6, axis=(0, 1)) ** (1 / 6)
    gain = np.linalg.norm(e0) / (np.sqrt(3) * e0)
    np.testing.assert_array_equal(out[3, 5], np.clip(np.rint(cast[3, 5] * gain), 0, 255))
    padded = np.zeros((32, 16, 3), np.uint8)
    padded[8:24] = cast
    np.testing.assert_array_equal(shades_of_gray(padded)[8:24], shades_of_gray(cast))


# ----------------------------------------------------------------------------- lesion framing

SKIN, LESION = (200, 150, 130), (100, 60, 45)


def _skin_with_lesion(path: Path | None, *, size=(160, 120), centre=(100, 50), radius=12,
                      seed=0) -> np.ndarray:
    """A 4:3 photo of noisy skin with a dark round lesion (none when radius is 0)."""
    w, h = size
    img = np.empty((h, w, 3), np.float64)
    img[:] = SKIN
    img += np.random.default_rng(seed).normal(0, 3, img.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    img[np.hypot(xx - centre[0], yy - centre[1]) < radius] = LESION
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if path is not None:
        _save(path, Image.fromarray(img))
    return img


def test_the_policy_records_the_framing_and_old_records_mean_frame():
    from anodata.policy import Preprocessing

    policy = Preprocessing(resolution=64, framing="lesion")
    assert Preprocessing.from_dict(policy.to_dict(), source="x") == policy
    old = policy.to_dict()
    del old["framing"]  # written before the option existed
    assert Preprocessing.from_dict(old, source="x").framing == "frame"
    with pytest.raises(UserError, match="framing 'crop' is not one of frame, lesion"):
        Preprocessing(framing="crop")
    with pytest.raises(UserError, match="framing 'crop' is not one of frame, lesion"):
        _opts(Path(__file__).parent, Path("x"), framing="crop")


@pytest.mark.parametrize("box,want", [
    ((40, 60, 30, 40), (35, 20, 30)),  # side 20 * 1.5, centred on (50, 35)
    ((90, 100, 30, 50), (70, 25, 30)),  # at the right edge: shifted inside
    ((0, 100, 20, 60), (10, 0, 80)),  # larger than the short side: the whole height, centred
    ((50, 51, 79, 80), (40, 60, 20)),  # a speck: a quarter of the short side, at the bottom
])
def test_lesion_square_by_hand(box, want):
    from anodata.policy import lesion_square

    mask = np.zeros((80, 100), bool)  # H 80, W 100
    x0, x1, y0, y1 = box
    mask[y0:y1, x0:x1] = True
    assert lesion_square(mask) == want


@pytest.mark.parametrize("box,max_side,want", [
    ((0, 100, 20, 60), 1.0, (10, 0, 80)),  # the default: cut down to the short side
    ((0, 100, 20, 60), 1.5, (-10, -20, 120)),  # 150 -> 1.5 x 80 = 120: past every edge, centred
    ((30, 70, 10, 40), 2.0, (20, 0, 60)),  # 60 fits: shifted inside, as with the default
    ((20, 80, 0, 40), 1.5, (5, -10, 90)),  # taller than the image: covers it, near the lesion
])
def test_lesion_square_may_reach_past_the_image(box, max_side, want):
    from anodata.policy import lesion_square

    mask = np.zeros((80, 100), bool)  # H 80, W 100
    x0, x1, y0, y1 = box
    mask[y0:y1, x0:x1] = True
    assert lesion_square(mask, max_side=max_side) == want


def test_crop_square_reflects_the_image_past_its_edges():
    from anodata.policy import crop_square

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    np.testing.assert_array_equal(np.asarray(crop_square(img, 5, 2, 20)), a[2:22, 5:25])
    # a square of 50 from (-5, -10): 10 rows above, 10 below, 5 columns left, 5 right
    got = np.asarray(crop_square(img, -5, -10, 50))
    rows = [abs(r) if r < 0 else (2 * 29 - r if r > 29 else r) for r in range(-10, 40)]
    cols = [abs(c) if c < 0 else (2 * 39 - c if c > 39 else c) for c in range(-5, 45)]
    np.testing.assert_array_equal(got, a[np.ix_(rows, cols)])
    grey = Image.fromarray(a[..., 0])
    np.testing.assert_array_equal(np.asarray(crop_square(grey, -5, -10, 50)), got[..., 0])


def test_the_policy_records_lesion_max_side_and_old_records_mean_one():
    from anodata.policy import Preprocessing

    policy = Preprocessing(resolution=64, framing="lesion", lesion_max_side=1.5)
    assert Preprocessing.from_dict(policy.to_dict(), source="x") == policy
    old = policy.to_dict()
    del old["lesion_max_side"]
    assert Preprocessing.from_dict(old, source="x").lesion_max_side == 1.0
    assert Preprocessing.from_dict({**old, "lesion_max_side": 2}, source="x").lesion_max_side == 2.0
    for bad in (0.5, 5.0):
        with pytest.raises(UserError, match=f"lesion_max_side {bad} is not in"):
            Preprocessing(framing="lesion", lesion_max_side=bad)
    with pytest.raises(UserError, match="lesion_max_side 1.5 needs framing 'lesion'"):
        Preprocessing(lesion_max_side=1.5)


def test_a_large_lesion_keeps_its_scale_only_when_the_square_may_reach_past_the_image():
    """A lesion whose square is larger than the photo: with lesion_max_side 1 its share of the
    fitted image follows the photo's zoom; with 2 it is the same (2/3 of the side) at both."""
    from anodata.lesion import lesion_mask
    from anodata.policy import Preprocessing, fit_image

    def width(img, max_side):
        policy = Preprocessing(resolution=64, framing="lesion", lesion_max_side=max_side)
        xs = np.nonzero(lesion_mask(np.asarray(fit_image(img, policy))))[1]
        return (xs.max() - xs.min() + 1) / 64

    near = Image.fromarray(_skin_with_lesion(None, centre=(120, 90), radius=75, size=(240, 180)))
    far = Image.fromarray(_skin_with_lesion(None, centre=(120, 90), radius=62, size=(240, 180)))
    assert abs(width(near, 2.0) - 2 / 3) < 0.05 and abs(width(far, 2.0) - 2 / 3) < 0.05
    assert width(near, 1.0) - width(far, 1.0) > 0.08  # cut down: the zoom shows through


def test_prepare_records_lesion_max_side_and_a_model_carries_it(tmp_path):
    from anodata.policy import Preprocessing, fit_image

    src = tmp_path / "src"
    for i in range(3):
        _skin_with_lesion(src / "nv" / f"n{i}.png", centre=(80, 60), radius=50, seed=i)
    args = ["prepare", "--source", str(src), "--normal", "nv", "--resolution", "32",
            "--workers", "1", "--framing", "lesion", "--lesion-max-side", "1.5", "--val", "0",
            "--test", "0"]
    result = CliRunner().invoke(main, args + ["--dest", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert info["preprocessing"]["lesion_max_side"] == 1.5
    data = ImageDataset(tmp_path / "out" / "train.zip")
    policy = Preprocessing(resolution=32, framing="lesion", lesion_max_side=1.5)
    row = _rows(tmp_path / "out" / "manifest.csv")[0]
    got = data[data.names.index(row["file"])][0].transpose(1, 2, 0)
    want = fit_image(Image.open(src / row["source"]), policy)
    np.testing.assert_array_equal(got, np.asarray(want))
    assert not np.array_equal(got, np.asarray(fit_image(
        Image.open(src / row["source"]), Preprocessing(resolution=32, framing="lesion"))))


def test_a_real_demo_photo_is_framed_around_its_lesion(ham_dir):
    """On real photos whose lesion is small in the frame, lesion framing makes it fill more of
    the fitted image, about as much as the margin says; the fitted image is the same through
    the PIL path (AnoModel.fit) and the file path (prepare) for these small JPEGs."""
    from anodata.lesion import lesion_mask
    from anodata.policy import Preprocessing, fit_image, fit_raw_framed

    frame = Preprocessing(resolution=64, colour="shades-of-gray")
    lesion = Preprocessing(resolution=64, colour="shades-of-gray", framing="lesion")
    grown = []
    for path in sorted((ham_dir / "images").glob("*.jpg"))[:40]:
        data = path.read_bytes()
        before = lesion_mask(np.asarray(fit_raw_framed(data, ".jpg", frame)[0])).mean()
        if not 0.02 < before < 0.12:  # small lesions only
            continue
        framed, note = fit_raw_framed(data, ".jpg", lesion)
        assert note == ""
        np.testing.assert_array_equal(np.asarray(framed), np.asarray(
            fit_image(Image.open(path).convert("RGB"), lesion)))
        grown.append(lesion_mask(np.asarray(framed)).mean() / before)
    assert len(grown) >= 5 and min(grown) > 1.2 and np.median(grown) > 1.8


def test_a_synthetic_lesion_off_centre_is_centred_and_sized():
    from anodata.lesion import lesion_mask
    from anodata.policy import Preprocessing, fit_image

    img = Image.fromarray(_skin_with_lesion(None, centre=(120, 40), radius=15))
    fitted = np.asarray(fit_image(img, Preprocessing(resolution=64, framing="lesion")))
    mask = lesion_mask(fitted)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 31.5) < 1.5 and abs(ys.mean() - 31.5) < 1.5  # in the middle
    assert abs((xs.max() - xs.min() + 1) / 64 - 1 / 1.5) < 0.05  # 2/3 of the side
    centre_crop = np.asarray(fit_image(img, Preprocessing(resolution=64)))
    assert lesion_mask(centre_crop).mean() < 0.5 * mask.mean()


def test_prepare_lists_images_without_a_lesion_and_keeps_their_frame(tmp_path):
    from anodata.policy import Preprocessing, fit_image

    src = tmp_path / "src"
    for i in range(6):
        _skin_with_lesion(src / "nv" / f"n{i}.png", centre=(60 + 8 * i, 50), seed=i)
    for i in range(2):
        _skin_with_lesion(src / "nv" / f"skin{i}.png", radius=0, seed=10 + i)
    for i in range(3):
        _skin_with_lesion(src / "mel" / f"m{i}.png", radius=20, seed=20 + i)
    args = ["prepare", "--source", str(src), "--normal", "nv", "--resolution", "32",
            "--workers", "1", "--framing", "lesion"]
    result = CliRunner().invoke(main, args + ["--dest", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert ("framing: 9 images cropped around their lesion, 2 kept the photo's framing (no "
            "lesion found; see") in result.output
    dest = tmp_path / "out"
    listed = _rows(dest / "framing.csv")
    assert [(r["source"], r["reason"]) for r in listed] == [
        ("nv/skin0.png", "no dark region"), ("nv/skin1.png", "no dark region")]
    info = json.loads((dest / "prepare.json").read_text())
    assert info["preprocessing"]["framing"] == "lesion"
    assert info["framing"] == {"framing": "lesion", "num_whole_frame": 2}
    manifest = {r["source"]: r for r in _rows(dest / "manifest.csv")}
    for row in listed:  # written as the centre crop of today's framing
        data = ImageDataset(dest / f"{row['split']}.zip")
        got = data[data.names.index(row["file"])][0].transpose(1, 2, 0)
        want = fit_image(Image.open(src / row["source"]), Preprocessing(resolution=32))
        np.testing.assert_array_equal(got, np.asarray(want))
        assert manifest[row["source"]]["file"] == row["file"]
    again = CliRunner().invoke(main, args[:-2] + ["--dest", str(dest)])  # framing frame
    assert again.exit_code == 0 and "framing:" not in again.output
    assert not (dest / "framing.csv").exists()  # no stale list from the run before


def test_prepare_with_a_model_carries_its_framing(tmp_path):
    from encoder_helpers import tiny_networks

    from anodata.policy import Preprocessing
    from stylegan.checkpoint import save_networks

    src = tmp_path / "src"
    for i in range(4):
        _skin_with_lesion(src / "nv" / f"n{i}.png", seed=i)
    _skin_with_lesion(src / "mel" / "m0.png", radius=20, seed=9)
    G, D = tiny_networks(16)
    models = {}
    for name, policy in (("lesion", Preprocessing(resolution=16, framing="lesion").to_dict()),
                         ("old", {k: v for k, v in Preprocessing(resolution=16).to_dict().items()
                                  if k != "framing"})):
        models[name] = tmp_path / name
        models[name].mkdir()
        save_networks(models[name] / "network.safetensors", G=G, D=D, G_ema=G,
                      extra={"preprocessing": policy})
    base = ["prepare", "--source", str(src), "--normal", "nv", "--workers", "1"]
    run = CliRunner().invoke
    ok = run(main, base + ["--model", str(models["lesion"]), "--dest", str(tmp_path / "a")])
    assert ok.exit_code == 0, ok.output
    info = json.loads((tmp_path / "a" / "prepare.json").read_text())
    assert info["preprocessing"]["framing"] == "lesion" and (tmp_path / "a" / "framing.csv").is_file()
    old = run(main, base + ["--model", str(models["old"]), "--dest", str(tmp_path / "b")])
    assert old.exit_code == 0, old.output
    assert json.loads((tmp_path / "b" / "prepare.json").read_text())[
        "preprocessing"]["framing"] == "frame"
    bad = run(main, base + ["--model", str(models["old"]), "--framing", "lesion",
                            "--dest", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "framing lesion (the model's: frame)" in bad.output


def test_a_large_jpeg_without_a_lesion_is_fitted_exactly_as_framed():
    """Lesion framing decodes box-filtered JPEGs larger (the crop is resized down); a photo
    where no lesion is found is decoded again so that it equals framing 'frame' bit for bit."""
    from anodata.policy import Preprocessing, fit_raw, fit_raw_framed

    skin = _encode(Image.fromarray(_skin_with_lesion(None, size=(600, 450), radius=0)), "JPEG")
    frame = Preprocessing(resolution=32)
    lesion = Preprocessing(resolution=32, framing="lesion")
    fitted, note = fit_raw_framed(skin, ".jpg", lesion)
    assert note == "no dark region"
    np.testing.assert_array_equal(np.asarray(fitted), np.asarray(fit_raw(skin, ".jpg", frame)))
    mole = _encode(Image.fromarray(_skin_with_lesion(None, size=(600, 450), centre=(420, 150),
                                                     radius=40)), "JPEG")
    fitted, note = fit_raw_framed(mole, ".jpg", lesion)
    assert note == "" and np.asarray(fitted)[16, 16].mean() < 110  # the lesion in the middle
    assert np.asarray(fit_raw(mole, ".jpg", frame))[16, 16].mean() > 150  # skin there
