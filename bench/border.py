"""Robustness to a dermatoscope's field-of-view border, on the VALIDATION split only.

HAM10000 has no dark circular border around its images (after the 64 px centre crop, no image
of it has one: `prepare --border fill` leaves every one of them unchanged), while many other
dermoscopy collections do. This check paints a synthetic one (black outside a centred circle of
`--radius` times half the side, edge softened) on a seeded `--share` of the naevi AND of the
melanomas of a prepared split's raw images, and reports the AUC (normal vs `--anomaly`, with a
lesion-level 95% CI) of a model folder's tuned detector

- on the images as they are,
- with the border painted, fitted with the model's policy but `border: keep`,
- with the border painted, fitted with `border: fill` (`prepare --border fill`),

and, among the normals, how well the painted border alone is told from none
(`border_vs_none_auc`: 0.5 means the detector does not see it, 1.0 that it flags every border).
The decision (keep or fill) is made on validation; test is never read here.

Prints one JSON object. Usage: `.venv/bin/python bench/border.py [--model models/ham64-cpu]
[--prepared ham64-sog] [--images ../shared/data/ham10000/images] [--split val]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from anodata.policy import fit_image
from anomaly.detector import load_model_dir
from anomaly.metrics import bootstrap_cis, roc_auc
from stylegan.dataset import read_manifest

REPO = Path(__file__).resolve().parents[1]


def paint_border(img: Image.Image, radius: float) -> Image.Image:
    """Black (8, 6, 6) outside a centred circle of `radius` x half the side of the centre
    square, its edge blurred by 1% of the side, as a dermatoscope's field of view looks."""
    w, h = img.size
    side = min(w, h)
    r = radius * side / 2
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(side / 100))
    return Image.composite(img, Image.new(img.mode, (w, h), (8, 6, 6)), mask)


def score_images(scorer, model, rows, images: Path, painted: np.ndarray, radius: float,
                 border: str | None, batch: int = 64) -> np.ndarray:
    """Detector scores of the raw source images of `rows`, `painted` ones with the border,
    fitted by the model's policy with `border` (None: the model's own)."""
    policy = model.policy if border is None else dataclasses.replace(model.policy, border=border)
    out = []
    for i in tqdm(range(0, len(rows), batch), desc=f"border {border or 'as is'}", disable=None):
        fitted = []
        for row, paint in zip(rows[i:i + batch], painted[i:i + batch]):
            img = Image.open(images / row["source"]).convert("RGB")
            img = paint_border(img, radius) if paint else img
            fitted.append(np.asarray(fit_image(img, policy)).transpose(2, 0, 1))
        out.append(scorer.score_batch(torch.from_numpy(np.stack(fitted))))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "ham64-cpu"))
    parser.add_argument("--prepared", default="ham64-sog",
                        help="folder written by `anostyle prepare` (its manifest.csv)")
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "ham10000"
                                                 / "images"), help="the raw source images")
    parser.add_argument("--split", default="val", choices=["val"],
                        help="validation only: the decision is made here")
    parser.add_argument("--normal", default="nv")
    parser.add_argument("--anomaly", default="mel")
    parser.add_argument("--radius", type=float, default=1.0,
                        help="circle radius / half the side (1: touching the edges)")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, scorer = load_model_dir(args.model, device="cpu")
    rows = [r for r in read_manifest(args.prepared)
            if r["split"] == args.split and r["class"] in (args.normal, args.anomaly)]
    y = np.array([r["class"] == args.anomaly for r in rows], dtype=np.int64)
    groups = [r["group"] for r in rows]
    painted = np.random.default_rng(args.seed).random(len(rows)) < args.share
    conditions = {"as_is": (np.zeros_like(painted), None),
                  "border_kept": (painted, "keep"), "border_filled": (painted, "fill")}
    report = {"benchmark": "border", "model": args.model, "method": scorer.detector.method,
              "policy": dataclasses.asdict(model.policy), "split": args.split,
              "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum()),
              "radius": args.radius, "share": args.share, "conditions": {}}
    for name, (paint, border) in conditions.items():
        s = score_images(scorer, model, rows, Path(args.images), paint, args.radius, border)
        ci = bootstrap_cis(y, s, groups, n=args.bootstrap, seed=args.seed).get("auc")
        normal = y == 0
        report["conditions"][name] = {
            "auc": round(roc_auc(y, s), 4), "auc_ci": None if ci is None else
            [round(ci[0], 4), round(ci[1], 4)],
            "border_vs_none_auc": (round(roc_auc(paint[normal].astype(np.int64), s[normal]), 4)
                                   if paint[normal].any() and not paint[normal].all() else None)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
