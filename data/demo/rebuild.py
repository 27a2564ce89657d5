"""Rebuild the embedded HAM10000 demo subset (data/demo/) from ../shared/data/ham10000.

Picks whole lesions (lesion_id), so that a lesion is never split between the demo and the rest,
in a fixed pseudo-random order: lesions sorted by sha256("<SEED>:<lesion_id>"). The targets are
per diagnosis AND per split of the shipped model (models/ham64-cpu/splits.csv): the demo's train
naevi come only from the model's train lesions, its val and test images only from the model's
val and test lesions, so the demo never evaluates on what the model was trained on (prepare the
demo with --splits-from models/ham64-cpu/splits.csv). A lesion is taken when all its images still
fit under its (diagnosis, split) target. The original JPEGs are copied byte for byte;
metadata.csv keeps the original columns and row order, only the chosen rows.

Usage (from anywhere): python data/demo/rebuild.py [--ham DIR] [--splits CSV]
Standard library only, deterministic: running it twice gives identical files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parents[1]
DEFAULT_HAM = REPO.parent / "shared" / "data" / "ham10000"
DEFAULT_SPLITS = REPO / "models" / "ham64-cpu" / "splits.csv"
# Images per (diagnosis, split of the shipped model): 400 nv + 100 mel. Abnormal images never
# go to train; val:test is 1:2 as in `prepare --val 0.1 --test 0.2`.
TARGETS = {("nv", "train"): 220, ("nv", "val"): 60, ("nv", "test"): 120,
           ("mel", "val"): 33, ("mel", "test"): 67}
SEED = "anostyle-demo-0"


def read_splits(path: Path) -> dict[str, str]:
    """lesion_id -> split (train/val/test) of the shipped model (columns group,split)."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["group"]: row["split"] for row in csv.DictReader(f)}


def choose_lesions(rows: list[dict[str, str]], splits: dict[str, str]) -> set[str]:
    """lesion_ids of whole lesions filling each (dx, split) target (deterministic order)."""
    sizes: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        key = (row["dx"], splits[row["lesion_id"]])
        per_lesion = sizes.setdefault(key, {})
        per_lesion[row["lesion_id"]] = per_lesion.get(row["lesion_id"], 0) + 1
    chosen: set[str] = set()
    for key, target in TARGETS.items():
        lesions = sizes.get(key, {})
        order = sorted(lesions, key=lambda lesion: hashlib.sha256(
            f"{SEED}:{lesion}".encode()).hexdigest())
        count = 0
        for lesion in order:
            if count + lesions[lesion] <= target:
                chosen.add(lesion)
                count += lesions[lesion]
        if count != target:
            raise SystemExit(f"could only fill {count} of {target} {key} images")
    return chosen


def rebuild(ham: Path, splits_csv: Path) -> None:
    metadata = ham / "HAM10000_metadata.csv"
    with open(metadata, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    rows = list(csv.DictReader(lines))
    assert len(rows) == len(body), "metadata rows must be one per line"
    splits = read_splits(splits_csv)
    missing = sorted({row["lesion_id"] for row in rows} - set(splits))
    if missing:
        raise SystemExit(f"{splits_csv} has no split for {len(missing)} lesions, e.g. {missing[0]}")
    chosen = choose_lesions(rows, splits)
    keep = [(line, row) for line, row in zip(body, rows) if row["lesion_id"] in chosen]

    images = DEMO / "images"
    images.mkdir(exist_ok=True)
    wanted = {f"{row['image_id']}.jpg" for _, row in keep}
    for old in images.iterdir():
        if old.name not in wanted:
            old.unlink()
    for name in sorted(wanted):
        shutil.copyfile(ham / "images" / name, images / name)
    with open(DEMO / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        f.write(header + "".join(line for line, _ in keep))

    counts: dict[str, int] = {}
    for _, row in keep:
        key = f"{row['dx']}/{splits[row['lesion_id']]}"
        counts[key] = counts.get(key, 0) + 1
    size = sum(p.stat().st_size for p in images.iterdir())
    print(f"{len(keep)} images from {len(chosen)} lesions {counts}, {size / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ham", type=Path, default=DEFAULT_HAM,
                        help="HAM10000 folder with HAM10000_metadata.csv and images/")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS,
                        help="the shipped model's lesion split (group,split)")
    args = parser.parse_args()
    if not (args.ham / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"{args.ham}/HAM10000_metadata.csv not found; pass --ham DIR")
    if not args.splits.is_file():
        raise SystemExit(f"{args.splits} not found; pass --splits CSV")
    rebuild(args.ham, args.splits)


if __name__ == "__main__":
    main()
