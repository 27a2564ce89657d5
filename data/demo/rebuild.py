"""Rebuild the embedded HAM10000 demo subset (data/demo/) from ../shared/data/ham10000.

Picks whole lesions (lesion_id), so that a lesion is never split between the demo and the rest,
in a fixed pseudo-random order: lesions sorted by sha256("<SEED>:<lesion_id>"). A lesion is taken
when all its images still fit under the class target. The original JPEGs are copied byte for
byte; metadata.csv keeps the original columns and row order, only the chosen rows.

Usage (from anywhere): python data/demo/rebuild.py [--ham DIR]
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
TARGETS = {"nv": 400, "mel": 100}  # images per diagnosis (dx)
SEED = "anostyle-demo-0"


def choose_lesions(rows: list[dict[str, str]]) -> set[str]:
    """lesion_ids of whole lesions filling each class target (deterministic order)."""
    chosen: set[str] = set()
    for dx, target in TARGETS.items():
        sizes: dict[str, int] = {}
        for row in rows:
            if row["dx"] == dx:
                sizes[row["lesion_id"]] = sizes.get(row["lesion_id"], 0) + 1
        order = sorted(sizes, key=lambda lesion: hashlib.sha256(
            f"{SEED}:{lesion}".encode()).hexdigest())
        count = 0
        for lesion in order:
            if count + sizes[lesion] <= target:
                chosen.add(lesion)
                count += sizes[lesion]
        if count != target:
            raise SystemExit(f"could only fill {count} of {target} {dx} images")
    return chosen


def rebuild(ham: Path) -> None:
    metadata = ham / "HAM10000_metadata.csv"
    with open(metadata, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    rows = list(csv.DictReader(lines))
    assert len(rows) == len(body), "metadata rows must be one per line"
    chosen = choose_lesions(rows)
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
        counts[row["dx"]] = counts.get(row["dx"], 0) + 1
    size = sum(p.stat().st_size for p in images.iterdir())
    print(f"{len(keep)} images from {len(chosen)} lesions {counts}, {size / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ham", type=Path, default=DEFAULT_HAM,
                        help="HAM10000 folder with HAM10000_metadata.csv and images/")
    args = parser.parse_args()
    if not (args.ham / "HAM10000_metadata.csv").is_file():
        raise SystemExit(f"{args.ham}/HAM10000_metadata.csv not found; pass --ham DIR")
    rebuild(args.ham)


if __name__ == "__main__":
    main()
