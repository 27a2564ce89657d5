"""The embedded demo (data/demo) never evaluates the shipped model (models/ham64-cpu) on a lesion
it was trained on: its val/test lesions are the model's val/test lesions, and preparing the demo
with --splits-from the model's splits.csv (as scripts/01_prepare_data.sh does) gives them."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from anodata.prepare import PrepareOptions, prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SPLITS = ROOT / "models" / "ham64-cpu" / "splits.csv"
SETTINGS = ROOT / "scripts" / "settings.sh"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _model_split() -> dict[str, str]:
    return {r["group"]: r["split"] for r in _read(SPLITS)}


def test_model_split_file_is_one_sorted_row_per_lesion():
    rows = _read(SPLITS)
    groups = [r["group"] for r in rows]
    assert list(rows[0]) == ["group", "split"]
    assert groups == sorted(set(groups))  # sorted, unique
    # the HAM10000 lesion split of the model's README command (seed 0, val 0.1, test 0.2)
    assert Counter(r["split"] for r in rows) == {"train": 3775, "val": 1241, "test": 2454}


def test_no_demo_val_or_test_lesion_is_in_the_model_training_split():
    model = _model_split()
    demo = _read(DEMO / "metadata.csv")
    lesions = {r["lesion_id"] for r in demo}
    assert lesions <= set(model), "every demo lesion has a split in the model's splits.csv"
    by_dx = Counter((r["dx"], model[r["lesion_id"]]) for r in demo)
    assert by_dx == {("nv", "train"): 220, ("nv", "val"): 60, ("nv", "test"): 120,
                     ("mel", "val"): 33, ("mel", "test"): 67}  # as data/demo/README.md says
    assert len({p.name for p in (DEMO / "images").iterdir()}) == len(demo) == 500


def test_preparing_the_demo_with_splits_from_gives_the_model_split(tmp_path):
    options = PrepareOptions(source=DEMO / "images", dest=tmp_path / "demo",
                             labels=DEMO / "metadata.csv", id_column="image_id",
                             label_column="dx", group_column="lesion_id", normal=("nv",),
                             resolution=8, workers=1, splits_from=SPLITS)
    summary = prepare_dataset(options)
    assert summary.num_rejected == 0 and summary.new_groups == ()
    model = _model_split()
    manifest = _read(tmp_path / "demo" / "manifest.csv")
    assert len(manifest) == 500
    assert all(r["split"] == model[r["group"]] for r in manifest)
    evaluated = {r["group"] for r in manifest if r["split"] in ("val", "test")}
    assert evaluated and not any(model[g] == "train" for g in evaluated)
    assert summary.counts == {"train": {"nv": 220, "mel": 0}, "val": {"nv": 60, "mel": 33},
                              "test": {"nv": 120, "mel": 67}}
    # the numbered scripts (make demo) prepare with this file by default
    assert "SPLITS_FROM=${SPLITS_FROM-$ROOT/models/ham64-cpu/splits.csv}" in SETTINGS.read_text()


def test_model_split_is_the_seeded_rule_on_all_of_ham10000(full_ham_metadata):
    """splits.csv is what `prepare --seed 0 --val 0.1 --test 0.2` gives on HAM10000 (the
    command in models/ham64-cpu/README.md), minus the two byte-identical duplicate files it
    drops; only the metadata is read."""
    from anodata.prepare import _Item, assign_splits, make_class_map
    from anodata.sources import Candidate

    duplicates = {"ISIC_0029861", "ISIC_0029938"}  # of ISIC_0024366 and ISIC_0024777
    rows = sorted(_read(full_ham_metadata), key=lambda r: r["image_id"])
    items = [_Item(Candidate(f"{r['image_id']}.jpg", r["dx"], r["lesion_id"]), "", 0, 0)
             for r in rows if r["image_id"] not in duplicates]
    class_map = make_class_map(sorted({r["dx"] for r in rows}), ("nv",), source=full_ham_metadata.parent)
    out = assign_splits(items, class_map, [], val=0.1, test=0.2, seed=0)
    assert {it.candidate.group: it.split for it in out} == _model_split()
