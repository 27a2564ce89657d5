"""`anostyle prepare` throughput on this machine: all of HAM10000 (10,015 images) at 64 px.

Target: under 60 s with 2 workers. Prints one JSON object (seconds, images/s, counts).
Usage: `.venv/bin/python bench/prepare.py [--ham DIR] [--resolution 64] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from anodata.prepare import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HAM = REPO.parent / "shared" / "data" / "ham10000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ham", type=Path, default=DEFAULT_HAM, help="HAM10000 folder")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resize-filter", default="box", choices=["box", "lanczos"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        options = PrepareOptions(
            source=args.ham / "images", dest=Path(tmp), normal=("nv",),
            labels=args.ham / "HAM10000_metadata.csv", id_column="image_id", label_column="dx",
            group_column="lesion_id", resolution=args.resolution, workers=args.workers,
            resize_filter=args.resize_filter)
        start = time.perf_counter()
        summary = prepare_dataset(options)
        seconds = time.perf_counter() - start
        zip_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.zip")) / 1e6
    print(json.dumps({
        "images": summary.num_images,
        "rejected": summary.num_rejected,
        "seconds": round(seconds, 2),
        "images_per_second": round(summary.num_images / seconds, 1),
        "resolution": args.resolution,
        "resize_filter": args.resize_filter,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "zip_megabytes": round(zip_mb, 1),
        "counts": summary.counts,
        "target_seconds": 60,
    }, indent=2))


if __name__ == "__main__":
    main()
