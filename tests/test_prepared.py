"""PreparedDataset: a tiny folder written by `prepare`, checked against a hand-read manifest.csv."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anodata.prepare import MANIFEST_COLUMNS, PrepareOptions, prepare_dataset
from anodata.prepared import PreparedDataset, original_name, split_of_zip
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError

# (lesion, dx, images, split): two images of a lesion share its split
LESIONS = [("L0", "nv", 2, "train"), ("L1", "nv", 1, "train"), ("L2", "nv", 1, "val"),
           ("L3", "mel", 2, "val"), ("L4", "nv", 1, "test"), ("L5", "bcc", 1, "test"),
           ("L6", "mel", 1, "test")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    lines = ["lesion_id,image_id,dx,dx_type,age,split"]
    for seed, (lesion, dx, n, split) in enumerate(LESIONS):
        for k in range(n):
            rng = np.random.RandomState(10 * seed + k)
            path = root / "images" / f"ISIC_{lesion}_{k}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (10, 14, 3), dtype=np.uint8)).save(path)
            lines.append(f"{lesion},ISIC_{lesion}_{k},{dx},histo,{30 + seed},{split}")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    prepare_dataset(PrepareOptions(source=root / "images", dest=root / "out", normal=("nv",),
                                   labels=root / "meta.csv", id_column="image_id",
                                   label_column="dx", group_column="lesion_id",
                                   split_column="split", resolution=8, workers=1))
    return root / "out"


def _hand_read(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_frame_equals_the_csv(folder):
    rows = _hand_read(folder)
    data = PreparedDataset.open(folder)
    assert data.folder == folder and PreparedDataset.open(folder / "val.zip").folder == folder
    assert list(data.manifest.columns) == [*MANIFEST_COLUMNS, "dx_type", "age"]
    assert data.meta_columns == ("dx_type", "age")
    assert data.manifest["label"].dtype == np.int64
    assert data.manifest["label"].tolist() == [int(r["label"]) for r in rows]
    for column in ("file", "source", "class", "group", "split", "sha256", "dx_type", "age"):
        assert data.manifest[column].tolist() == [r[column] for r in rows], column
    assert len(rows) == 9  # every image of LESIONS


def test_rows_of_a_split_and_of_a_zip(folder):
    rows = _hand_read(folder)
    data = PreparedDataset.open(folder)
    for split, want in (("train", 3), ("val", 3), ("test", 3)):
        got = data.rows(split)
        hand = [r for r in rows if r["split"] == split]
        assert len(got) == len(hand) == want
        assert got["file"].tolist() == [r["file"] for r in hand]
        assert got["source"].tolist() == [r["source"] for r in hand]
    zipped = ImageDataset(data.zip_path("test"))
    names = list(reversed(zipped.names)) + ["not/in.png"]
    got = data.rows_of("test", names)
    by_file = {r["file"]: r for r in rows if r["split"] == "test"}
    assert got["file"].tolist() == names
    assert got["class"].tolist()[:3] == [by_file[n]["class"] for n in names[:3]]
    assert got["group"].tolist()[:3] == [by_file[n]["group"] for n in names[:3]]
    assert got.iloc[3].drop("file").isna().all()  # a file the manifest does not list
    # the zip's labels (dataset.json) agree with the manifest's
    assert zipped.labels.tolist() == [int(by_file[n]["label"]) for n in zipped.names]


def test_descriptions_counts_groups_and_policy(folder):
    rows = _hand_read(folder)
    data = PreparedDataset.open(folder)
    val = [r for r in rows if r["split"] == "val"]
    described = data.descriptions("val")
    assert list(described) == [r["file"] for r in val]
    for r in val:
        assert described[r["file"]] == {"image": Path(r["source"]).stem, "group": r["group"],
                                        "dx_type": "histo", "age": r["age"]}
    assert {d["image"] for d in described.values()} == {"ISIC_L2_0", "ISIC_L3_0", "ISIC_L3_1"}
    hand = Counter((r["split"], r["class"]) for r in rows)
    assert data.counts() == {"test": {"bcc": 1, "mel": 1, "nv": 1}, "train": {"nv": 3},
                             "val": {"mel": 2, "nv": 1}}
    assert {(s, c): n for s, per in data.counts().items() for c, n in per.items()} == hand
    assert data.normal_classes() == ["nv"]
    groups = data.lesion_groups()
    assert list(groups.itertuples(index=False, name=None)) == [
        ("L0", "train"), ("L1", "train"), ("L2", "val"), ("L3", "val"), ("L4", "test"),
        ("L5", "test"), ("L6", "test")]
    assert data.policy is not None and data.policy.resolution == 8
    assert data.source_folder == str(folder.parent / "images")


def test_lesion_groups_of_images_without_group(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "file,class,label,group,split\na.png,nv,0,,train\nb.png,nv,0,L1,train\n"
        "c.png,mel,1,L1,val\nd.png,mel,1,,val\n")
    groups = PreparedDataset.open(tmp_path).lesion_groups()
    assert groups.values.tolist() == [["image:a.png", "train"], ["L1", "train"], ["L1", "val"],
                                      ["image:d.png", "val"]]
    assert PreparedDataset.open(tmp_path).info == {}  # no prepare.json
    assert PreparedDataset.open(tmp_path).source_folder is None


def test_zip_names_and_original_names():
    assert [split_of_zip(p) for p in ("d/train.zip", "val.zip", "d/test.zip", "mine.zip")] == [
        "train", "val", "test", "test"]
    assert original_name("part\\ISIC_0024307.jpg") == "ISIC_0024307"
    assert original_name("a/b/c.d.png") == "c.d"


def test_manifest_beside_a_zip(tmp_path):
    dest = tmp_path / "prepared"
    dest.mkdir()
    (dest / "manifest.csv").write_text(
        "file,source,class,label,group,split,sha256\n"
        "a.png,x/a.jpg,nv,0,g1,train,00\nb.png,x/b.jpg,mel,2,g2,test,11\n"
        "c.png,x/c.jpg,bcc,1,g3,val,22\n")
    data = PreparedDataset.find(dest / "test.zip")
    assert data.manifest["class"].tolist() == ["nv", "mel", "bcc"]
    assert data.manifest["label"].tolist() == [0, 2, 1]
    assert data.rows("test")["file"].tolist() == ["b.png"]
    assert PreparedDataset.find(tmp_path) is None


@pytest.mark.parametrize("text, match", [
    (None, r"is not a prepared folder: it has no manifest.csv; give the folder `anostyle "
           r"prepare --dest` wrote"),
    ("file,class,split\na.png,nv,train\n", r"lacks the column\(s\) label; prepare the data"),
    ("file,class,label,split\na.png,nv,0,train\nb.png,mel,one,val\n",
     r"line 3 has the label 'one', not an integer class index"),
    ("file,class,label,split\na.png,nv,0.5,train\n", r"line 2 has the label '0.5'"),
    ("", r"is not a readable CSV"),
])
def test_refusals_are_one_sentence(tmp_path, text, match):
    if text is not None:
        (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(UserError, match=match) as info:
        PreparedDataset.open(tmp_path)
    assert "\n" not in str(info.value) and str(info.value).endswith(".")
