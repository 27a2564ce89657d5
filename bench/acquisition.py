"""Robustness to what differs between dermoscopes, on the VALIDATION split only.

HAM10000 comes from few devices. Two differences that other collections show are simulated on a
seeded `--share` of the naevi AND of the melanomas of a prepared split's raw images:

- `--shift border`: a dermatoscope's dark circular field-of-view border (black outside a centred
  circle of `--radius` times half the side, edge softened). After the 64 px centre crop no
  HAM10000 image has one (`prepare --border fill` leaves every one of them unchanged).
- `--shift exposure`: the brightness times `--factor` (PIL ImageEnhance.Brightness).

It reports the AUC (normal vs `--anomaly`, lesion-level 95% CI) of a model folder's tuned
detector on the images as they are, on the shifted ones fitted with the model's policy with the
guard off (`border: keep` / `intensity: keep`), and with it on (`border: fill` / `intensity:
normalise`); and, among the normals, how well the shift alone is told from none
(`shifted_vs_not_auc`: 1.0 means it flags every shifted image; its value for the images as they
are, the same seeded halves with nothing shifted, is what "does not see it" reads as). Test is
never read here.

Prints one JSON object. Usage: `.venv/bin/python bench/acquisition.py [--shift border|exposure]
[--model models/ham64-cpu] [--prepared ham64-sog] [--images ../shared/data/ham10000/images]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
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


GUARDS = {"border": ("border", "keep", "fill"), "exposure": ("intensity", "keep", "normalise")}


def shift_image(img: Image.Image, args) -> Image.Image:
    if args.shift == "border":
        return paint_border(img, args.radius)
    return ImageEnhance.Brightness(img).enhance(args.factor)


def score_images(scorer, model, images: list[Image.Image], override: dict | None,
                 batch: int = 64) -> np.ndarray:
    """Detector scores of decoded raw images, fitted by the model's policy with `override`
    (field -> value) applied."""
    policy = dataclasses.replace(model.policy, **(override or {}))
    out = []
    for i in tqdm(range(0, len(images), batch), desc=str(override or "as is"), disable=None):
        fitted = [np.asarray(fit_image(img, policy)).transpose(2, 0, 1)
                  for img in images[i:i + batch]]
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
    parser.add_argument("--shift", default="border", choices=sorted(GUARDS))
    parser.add_argument("--radius", type=float, default=1.0,
                        help="border: circle radius / half the side (1: touching the edges)")
    parser.add_argument("--factor", type=float, default=0.7, help="exposure: brightness factor")
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
    shifted = np.random.default_rng(args.seed).random(len(rows)) < args.share
    field, off, on = GUARDS[args.shift]
    conditions = {"as_is": (np.zeros_like(shifted), None),
                  f"shifted_{field}_{off}": (shifted, {field: off}),
                  f"shifted_{field}_{on}": (shifted, {field: on})}
    report = {"benchmark": "acquisition", "shift": args.shift, "model": args.model,
              "method": scorer.detector.method, "policy": dataclasses.asdict(model.policy),
              "split": args.split, "n_normal": int((y == 0).sum()),
              "n_anomaly": int((y == 1).sum()), "share": args.share,
              **({"radius": args.radius} if args.shift == "border" else {"factor": args.factor}),
              "conditions": {}}
    normal = y == 0
    paths = [Path(args.images) / r["source"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} source images of {args.prepared} are not in "
                         f"--images {args.images} (e.g. {missing[0].name}); give the folder "
                         f"they were prepared from.")
    raw = [Image.open(p).convert("RGB") for p in paths]  # decoded once for every condition
    shifted_raw = [shift_image(img, args) if s else img for img, s in zip(raw, shifted)]
    for name, (shift, override) in conditions.items():
        s = score_images(scorer, model, shifted_raw if shift.any() else raw, override)
        ci = bootstrap_cis(y, s, groups, n=args.bootstrap, seed=args.seed).get("auc")
        report["conditions"][name] = {
            "auc": round(roc_auc(y, s), 4), "auc_ci": None if ci is None else
            [round(ci[0], 4), round(ci[1], 4)],
            # as_is: the same seeded halves, nothing shifted: what "no difference" reads as
            "shifted_vs_not_auc": round(roc_auc(shifted[normal].astype(np.int64), s[normal]), 4)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
