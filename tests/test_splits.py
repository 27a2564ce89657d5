"""Fixed splits (`prepare --split-column`, `--splits-from`), image records that travel with the
data (original id, group, metadata columns), and `prepare --model DIR`."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anodata.policy import Preprocessing
from anodata.prepare import (MANIFEST_COLUMNS, PrepareOptions, format_summary, prepare_dataset,
                             read_split_file)
from anomaly.cli import main
from stylegan.dataset import ImageDataset
from stylegan.errors import UserError

# ----------------------------------------------------------------------------- fixtures

# (lesion, dx, number of images, split column value); values in mixed case on purpose
LESIONS = [("L00", "nv", 1, "train"), ("L01", "nv", 2, "Train"), ("L02", "nv", 1, "TRAIN"),
           ("L03", "nv", 3, "train"), ("L04", "nv", 1, "val"), ("L05", "nv", 2, "Validation"),
           ("L06", "nv", 1, "test"), ("L07", "nv", 2, "Test"), ("L08", "mel", 1, "val"),
           ("L09", "mel", 2, "test"), ("L10", "mel", 1, "test"), ("L11", "nv", 1, "train")]
WANT = {"train": "train", "Train": "train", "TRAIN": "train", "val": "val",
        "Validation": "val", "test": "test", "Test": "test"}


def _noise(path: Path, seed: int) -> None:
    pixels = np.random.RandomState(seed).randint(0, 256, (10, 14, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_set(root: Path, lesions, *, first_seed: int = 0) -> tuple[Path, Path]:
    """Images + a HAM-like metadata CSV (lesion_id, image_id, dx, dx_type, age, split)."""
    images = root / "images"
    lines = ["lesion_id,image_id,dx,dx_type,age,split"]
    seed = first_seed
    for lesion, dx, n, split in lesions:
        for k in range(n):
            image_id = f"ISIC_{lesion}_{k}"
            _noise(images / f"{image_id}.jpg", seed)
            dx_type = "histo" if dx == "mel" or k == 0 else "follow_up"
            lines.append(f"{lesion},{image_id},{dx},{dx_type},{40 + seed},{split}")
            seed += 1
    csv_path = root / "meta.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return images, csv_path


def _opts(images: Path, csv_path: Path, dest: Path, **kwargs) -> PrepareOptions:
    kwargs.setdefault("resolution", 8)
    return PrepareOptions(source=images, dest=dest, normal=("nv",), labels=csv_path,
                          id_column="image_id", label_column="dx", group_column="lesion_id",
                          workers=1, **kwargs)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _split_of_group(manifest: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in _rows(manifest):
        assert out.setdefault(r["group"], r["split"]) == r["split"], r  # one split per group
    return out


# ----------------------------------------------------------------------------- --split-column


def test_split_column_gives_exactly_that_split(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS)
    summary = prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="split"))
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    by_image = {r["source"]: r["split"] for r in manifest}
    for lesion, _dx, n, value in LESIONS:
        for k in range(n):
            assert by_image[f"ISIC_{lesion}_{k}.jpg"] == WANT[value]
    assert summary.counts == {"train": {"nv": 8, "mel": 0}, "val": {"nv": 3, "mel": 1},
                              "test": {"nv": 3, "mel": 3}}
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert info["splits"] == {"made_by": "column", "num_new_groups": 0, "new_groups": []}
    # the split column is not copied as metadata: it is the manifest's split
    assert list(manifest[0]) == [*MANIFEST_COLUMNS, "dx_type", "age"]


def test_split_column_refuses_bad_values_and_split_groups(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS[:3] + [("L20", "nv", 1, "holdout")])
    with pytest.raises(UserError, match=r"meta.csv line 6: --split-column split is 'holdout'"):
        prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="split"))
    text = csv_path.read_text().replace("L01,ISIC_L01_1,nv,follow_up,42,Train",
                                        "L01,ISIC_L01_1,nv,follow_up,42,test")
    csv_path.write_text(text.replace("holdout", "val"))
    with pytest.raises(UserError, match=r"^Group L01 has images in both train and test"):
        prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="split"))
    with pytest.raises(UserError, match="has no column fold"):
        prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="fold"))


def test_split_column_puts_no_abnormal_image_in_train(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS[:4] + [("M1", "mel", 1, "train")])
    prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="split"))
    reasons = {r["source"]: r["reason"] for r in _rows(tmp_path / "out" / "rejected.csv")}
    assert reasons == {"ISIC_M1_0.jpg": "class mel is not normal; train.zip holds normal "
                                        "images only"}


# ----------------------------------------------------------------------------- --splits-from


def test_splits_from_reproduces_the_split_and_reports_new_groups(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS)
    first = prepare_dataset(_opts(images, csv_path, tmp_path / "a", seed=3, val=0.2, test=0.3))
    split_a = _split_of_group(tmp_path / "a" / "manifest.csv")
    assert first.splits == "seeded" and set(split_a.values()) == {"train", "val", "test"}
    # more lesions arrive; another seed would split the old ones differently
    new = [("N1", "nv", 1, ""), ("N2", "nv", 2, ""), ("N3", "mel", 1, ""), ("N4", "nv", 1, "")]
    images, csv_path = _write_set(tmp_path, LESIONS + new)
    again = prepare_dataset(_opts(images, csv_path, tmp_path / "b", seed=11, val=0.2, test=0.3,
                                  splits_from=tmp_path / "a" / "manifest.csv"))
    split_b = _split_of_group(tmp_path / "b" / "manifest.csv")
    assert {g: split_b[g] for g in split_a} == split_a  # exactly the earlier split
    assert again.splits == "file" and again.new_groups == ("N1", "N2", "N3", "N4")
    assert split_b["N3"] in ("val", "test")  # a new melanoma never goes to train
    info = json.loads((tmp_path / "b" / "prepare.json").read_text())
    assert info["splits"] == {"made_by": "file", "num_new_groups": 4,
                              "new_groups": ["N1", "N2", "N3", "N4"]}
    assert "4 groups were not in --splits-from" in format_summary(again)
    # the new groups follow the seeded rule as if they were all there was
    reseeded = prepare_dataset(_opts(images, csv_path, tmp_path / "c", seed=11, val=0.2,
                                     test=0.3,
                                     splits_from=_splits_csv(tmp_path / "old.csv", split_a)))
    assert _split_of_group(tmp_path / "c" / "manifest.csv") == split_b
    assert reseeded.new_groups == again.new_groups
    # a splits.csv (group,split) gives byte-identical outputs to the manifest it came from
    for name in ("train.zip", "val.zip", "test.zip", "manifest.csv"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def _splits_csv(path: Path, splits: dict[str, str]) -> Path:
    path.write_text("group,split\n" + "".join(f"{g},{s.upper()}\n" for g, s in splits.items()))
    return path


def test_new_groups_follow_assign_splits_alone(tmp_path):
    """The new groups get exactly the split that the seeded rule gives them on their own."""
    images, csv_path = _write_set(tmp_path, [(f"N{i:02d}", "nv", 1 + i % 2, "") for i in range(10)]
                                  + [("M0", "mel", 1, ""), ("M1", "mel", 2, "")])
    alone = prepare_dataset(_opts(images, csv_path, tmp_path / "alone", seed=5, val=0.2,
                                  test=0.3))
    empty = _splits_csv(tmp_path / "empty.csv", {"SOMETHING_ELSE": "train"})
    with_file = prepare_dataset(_opts(images, csv_path, tmp_path / "file", seed=5, val=0.2,
                                      test=0.3, splits_from=empty))
    assert alone.counts == with_file.counts and len(with_file.new_groups) == 12
    assert (_split_of_group(tmp_path / "alone" / "manifest.csv")
            == _split_of_group(tmp_path / "file" / "manifest.csv"))


def test_split_file_errors_are_one_sentence(tmp_path):
    bad = {"nocol.csv": "lesion,split\nA,train\n",
           "value.csv": "group,split\nA,train\nB,holdout\n",
           "twice.csv": "group,split\nA,train\nA,test\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match="has no column group"):
        read_split_file(tmp_path / "nocol.csv")
    with pytest.raises(UserError, match=r"line 3: group 'B' with split 'holdout'"):
        read_split_file(tmp_path / "value.csv")
    with pytest.raises(UserError, match="puts group A in both train and test"):
        read_split_file(tmp_path / "twice.csv")
    images, csv_path = _write_set(tmp_path, LESIONS[:2])
    (tmp_path / "ok.csv").write_text("group,split\nL00,train\n")
    with pytest.raises(UserError, match="both set the splits"):
        _opts(images, csv_path, tmp_path / "o", split_column="split",
              splits_from=tmp_path / "ok.csv")
    with pytest.raises(UserError, match="--splits-from .*missing.csv does not exist"):
        _opts(images, csv_path, tmp_path / "o", splits_from=tmp_path / "missing.csv")
    folders = tmp_path / "folders"
    _noise(folders / "train" / "nv" / "a.png", 1)
    with pytest.raises(UserError, match="train/val/test folders, which already give the splits"):
        prepare_dataset(PrepareOptions(source=folders, dest=tmp_path / "f", normal=("nv",),
                                       resolution=8, workers=1,
                                       splits_from=tmp_path / "ok.csv"))


# ----------------------------------------------------------------------------- records


def test_records_and_metadata_travel_with_the_images(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS)
    # a metadata column whose name clashes with a manifest column gets the prefix meta_
    text = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([text[0] + ",file"] + [f"{t},orig{k}" for k, t in
                                                         enumerate(text[1:])]) + "\n")
    prepare_dataset(_opts(images, csv_path, tmp_path / "out", seed=1))
    manifest = _rows(tmp_path / "out" / "manifest.csv")
    assert list(manifest[0]) == [*MANIFEST_COLUMNS, "dx_type", "age", "meta_split",
                                 "meta_file"]
    meta = {r["image_id"]: r for r in csv.DictReader(open(csv_path))}
    for r in manifest:
        row = meta[Path(r["source"]).stem]
        assert (r["dx_type"], r["age"], r["meta_split"], r["meta_file"]) == (
            row["dx_type"], row["age"], row["split"], row["file"])
    for split in ("train", "val", "test"):
        zip_path = tmp_path / "out" / f"{split}.zip"
        with zipfile.ZipFile(zip_path) as z:
            body = json.loads(z.read("dataset.json"))
        # each image's original id and group, under the key "anostyle"
        records = body["anostyle"]["images"]
        want = {r["file"]: {"image": Path(r["source"]).stem, "group": r["group"]}
                for r in manifest if r["split"] == split}
        assert records == want and len(records) == len(ImageDataset(zip_path))
        # the NVlabs part of dataset.json is unchanged: [name, label] pairs
        assert [name for name, _ in body["labels"]] == sorted(want)
    assert records["00000/img00000000.png"]["image"].startswith("ISIC_L")


# ----------------------------------------------------------------------------- --model


def _model_folder(folder: Path, *, network_policy: dict | None,
                  encoder_policy: dict | None = None, res: int = 16) -> Path:
    from encoder_helpers import tiny_encoder, tiny_networks

    from anomaly.model.encoder_io import save_encoder
    from stylegan.checkpoint import save_networks

    folder.mkdir(parents=True)
    G, D = tiny_networks(res)
    extra = {} if network_policy is None else {"preprocessing": network_policy}
    save_networks(folder / "network.safetensors", G=G, D=D, G_ema=G, extra=extra)
    if encoder_policy is not None:
        save_encoder(folder / "encoder.safetensors", tiny_encoder(G),
                     extra={"preprocessing": encoder_policy})
    (folder / "splits.csv").write_text("group,split\nL00,test\n")  # never applied by --model
    return folder


def test_prepare_with_model_uses_its_policy_and_refuses_contradictions(tmp_path):
    images, csv_path = _write_set(tmp_path, LESIONS)
    pad = Preprocessing(resolution=16, transform="pad", resize_filter="lanczos",
                        colour="shades-of-gray", colour_p=4.0, border="fill",
                        intensity="normalise", intensity_target=150.0)
    model = _model_folder(tmp_path / "model", network_policy=pad.to_dict())
    base = ["prepare", "--source", images, "--labels", csv_path, "--label-column", "dx",
            "--group-column", "lesion_id", "--normal", "nv", "--workers", 1, "--model", model]
    run = CliRunner().invoke
    ok = run(main, [str(a) for a in base + ["--dest", tmp_path / "a", "--colour-p", 4]])
    assert ok.exit_code == 0, ok.output
    info = json.loads((tmp_path / "a" / "prepare.json").read_text())
    assert info["preprocessing"] == pad.to_dict() and info["options"]["model"] == str(model)
    assert info["splits"]["made_by"] == "seeded"  # the model's splits.csv is not applied
    assert ImageDataset(tmp_path / "a" / "train.zip").resolution == 16
    bad = run(main, [str(a) for a in base + ["--dest", tmp_path / "b", "--resolution", 64,
                                             "--transform", "center-crop"]])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert ("was trained on images prepared with another policy: resolution 64 (the model's: "
            "16); transform center-crop (the model's: pad)") in bad.output
    assert not (tmp_path / "b").exists()
    # the library refuses the same (an API user who forgets a setting)
    with pytest.raises(UserError, match=r"resize-filter box \(the model's: lanczos\)"):
        _opts(images, csv_path, tmp_path / "c", model=model, resolution=16, transform="pad",
              colour="shades-of-gray", colour_p=4.0)


def test_model_policy_encoder_first_then_defaults(tmp_path):
    from anodata.modelpolicy import read_model_policy

    enc = Preprocessing(resolution=16, transform="resize")
    both = _model_folder(tmp_path / "both", network_policy=Preprocessing(
        resolution=16, transform="pad").to_dict(), encoder_policy=enc.to_dict())
    assert read_model_policy(both).policy == enc and read_model_policy(both).note is None
    bare = read_model_policy(_model_folder(tmp_path / "bare", network_policy=None))
    assert bare.policy == Preprocessing(resolution=16) and "records no preprocessing" in bare.note
    with pytest.raises(UserError, match="has no network.safetensors"):
        read_model_policy(tmp_path)


def test_a_cross_split_duplicate_says_which_split_kept_it_and_reasons_are_counted(tmp_path):
    """The same bytes in train and in test (an official split listing a file twice) are kept
    once, and the rejection says which split kept them; the summary counts rejections by kind."""
    from anodata.prepare import format_summary

    images, csv_path = _write_set(tmp_path, LESIONS)
    # ISIC_L06_0 (test) becomes a byte copy of ISIC_L00_0 (train)
    (images / "ISIC_L06_0.jpg").write_bytes((images / "ISIC_L00_0.jpg").read_bytes())
    (images / "stray.jpg").write_bytes((images / "ISIC_L01_0.jpg").read_bytes()[:10])
    summary = prepare_dataset(_opts(images, csv_path, tmp_path / "out", split_column="split"))
    reasons = {r["source"]: r["reason"] for r in _rows(tmp_path / "out" / "rejected.csv")}
    assert reasons["ISIC_L06_0.jpg"] == ("duplicate of ISIC_L00_0.jpg (kept in train; this "
                                         "copy was given test)")
    assert summary.counts["test"]["nv"] == 2
    assert summary.rejected_kinds == (("duplicate of … (kept in train; this copy was given "
                                       "test)", 1), ("no row for this image in …", 1))
    text = format_summary(summary)
    assert "2 inputs rejected" in text and "       1  no row for this image in …" in text


def test_train_anomalies_join_val_with_their_lesion(tmp_path):
    """--train-anomalies val: an abnormal image given train moves to val with every image of
    its lesion (a lesion never sits in two splits); test stays exactly as given."""
    lesions = LESIONS + [("L12", "mel", 2, "train")]
    images, csv_path = _write_set(tmp_path, lesions)
    rejected = prepare_dataset(_opts(images, csv_path, tmp_path / "r", split_column="split"))
    assert rejected.counts["val"]["mel"] == 1 and rejected.num_rejected == 2
    moved = prepare_dataset(_opts(images, csv_path, tmp_path / "m", split_column="split",
                                  train_anomalies="val"))
    assert moved.num_rejected == 0
    assert moved.counts["val"]["mel"] == 1 + 2 and moved.counts["test"] == rejected.counts["test"]
    assert moved.counts["train"] == rejected.counts["train"]
    assert _split_of_group(tmp_path / "m" / "manifest.csv")["L12"] == "val"
    with pytest.raises(UserError, match="--train-anomalies 'maybe' must be reject or val"):
        _opts(images, csv_path, tmp_path / "x", train_anomalies="maybe")
