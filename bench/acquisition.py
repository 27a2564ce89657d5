"""Robustness to what differs between dermoscopes, on the VALIDATION split only.

HAM10000 comes from few devices. Differences that other collections show are simulated
(anodata/shifts.py) on a seeded `--share` of the naevi AND, independently, of the melanomas of a
prepared split's raw images:

- `--shift border`: a dermatoscope's dark circular field-of-view border (black outside a
  centred circle of `--radius` times half the side, edge softened). After the 64 px centre crop no
  HAM10000 image has one (`prepare --border fill` leaves every one of them unchanged).
- `--shift exposure`: the brightness times `--factor` (PIL ImageEnhance.Brightness).
- `--shift zoom`: a zoom about the centre by each of `--zoom` (default 0.75 and 1.33), one
  condition per factor, each on the same seeded halves: > 1 crops 1/factor of each side and
  enlarges it, < 1 shrinks the image and reflect-pads it (the margin is the image's own skin
  mirrored, no flat frame; anodata/shifts.py says why).
- `--shift all`: all of the above in one run (the images are decoded once).

It reports the AUC (normal vs `--anomaly`, lesion-level 95% CI) of a model folder's tuned
detector on the images as they are, on the shifted ones fitted with the model's policy with the
guard off (`border: keep` / `intensity: keep`), and with it on (`border: fill` / `intensity:
normalise`); zoom has no guard in the policy, so it is fitted with the model's policy as it is.
For each condition, among the normals, how well the shift alone is told from none
(`shifted_vs_not_auc`: 1.0 means it flags every shifted image; its value for the images as they
are, the same seeded halves with nothing shifted, is what "does not see it" reads as). And, per
class on the images as they are, the Pearson correlation of the score with the lesion's area
(the share of the fitted image's pixels in anodata.lesion.lesion_mask; images where no lesion is
found count with area 0 and are counted in `no_lesion`). When the policy frames by the lesion,
the fitted lesion's area is similar by design, so `acquired_area_correlation` also reports the
correlation with the area in the whole frame as acquired (fitted with `framing: frame`), and
`square_cut_down` the share of images (as they are, and the zoomed ones) whose lesion square asks
for more than the policy's `lesion_max_side`, where framing cannot fix the lesion's scale. Test
is never read here.

Prints one JSON object. Usage: `.venv/bin/python bench/acquisition.py
[--shift border|exposure|zoom|all] [--model models/ham64-cpu] [--prepared ham64-sog]
[--images ../shared/data/ham10000/images]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from stylegan.progress import progress
from stylegan.errors import run_main

from anodata.policy import fit_image
from anodata.prepared import PreparedDataset
from anodata.shifts import Shift, shifted_halves
from anodata.shifts import paint_border  # noqa: F401 (bench.paint_border, tests/test_border.py)
from anomaly.evaluation.metrics import bootstrap_cis, roc_auc
from anomaly.model.ano_model import AnoModel

REPO = Path(__file__).resolve().parents[1]
# shift kind -> (policy field of its guard, value off, value on); zoom has no guard
GUARDS = {"border": ("border", "keep", "fill"), "exposure": ("intensity", "keep", "normalise"),
          "zoom": None}


def requested_shifts(args) -> list[Shift]:
    kinds = ["border", "exposure", "zoom"] if args.shift == "all" else [args.shift]
    out = []
    for kind in kinds:
        if kind == "border":
            out.append(Shift("border", args.radius))
        elif kind == "exposure":
            out.append(Shift("exposure", args.factor))
        else:
            out += [Shift("zoom", f) for f in args.zoom]
    return out


def decode_sources(rows: list[dict], images: str, prepared: str) -> list[Image.Image]:
    """The raw source images (RGB) of manifest rows, from the folder `images`; a missing one
    ends the bench in one sentence."""
    paths = [Path(images) / r["source"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{len(missing)} source images of {prepared} are not in --images "
                         f"{images} (e.g. {missing[0].name}); give the folder they were "
                         f"prepared from.")
    return [Image.open(p).convert("RGB") for p in progress(paths, desc="decode")]


def fit_all(model, images: list[Image.Image], override: dict | None) -> np.ndarray:
    """uint8 [N, C, H, W]: decoded raw images fitted by the model's policy with `override`
    (field -> value) applied."""
    policy = dataclasses.replace(model.policy, **(override or {}))
    return np.stack([np.asarray(fit_image(img, policy)).reshape(
        policy.resolution, policy.resolution, -1).transpose(2, 0, 1) for img in images])


def score_fitted(scorer, fitted: np.ndarray, desc: str, batch: int = 64) -> np.ndarray:
    out = [scorer.score_batch(torch.from_numpy(fitted[i:i + batch]))
           for i in progress(range(0, len(fitted), batch), desc=desc)]
    return np.concatenate(out)


def lesion_areas(fitted: np.ndarray) -> np.ndarray:
    """Share of each fitted image's pixels [N, C, H, W] inside its lesion mask (0 if none)."""
    from anodata.lesion import lesion_mask

    return np.array([lesion_mask(img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]).mean()
                     for img in fitted], dtype=np.float64)


def wanted_sides(images: list[Image.Image], policy) -> np.ndarray:
    """The side, in short sides, that each decoded raw image's lesion square asks for
    (anodata.policy.framing_lesion with the policy's border, then wanted_side); NaN where no
    lesion is found."""
    from anodata.policy import framing_lesion, wanted_side

    masks = [framing_lesion(img, border=policy.border)[0] for img in images]
    return np.array([np.nan if m is None else wanted_side(m) for m in masks], dtype=np.float64)


def cut_down(images: list[Image.Image], policy, y: np.ndarray) -> dict:
    """Per class (normal, anomaly): the share of `images` (decoded raw) whose lesion square
    asks for more than the policy's lesion_max_side short sides, so that lesion framing cuts
    it down and the lesion's scale follows the photo's (anodata.policy.wanted_side; images
    without a lesion found are not counted), and the median side asked for."""
    sides = wanted_sides(images, policy)
    out = {"lesion_max_side": policy.lesion_max_side}
    for name, cls in (("normal", 0), ("anomaly", 1)):
        v = sides[(y == cls) & np.isfinite(sides)]
        out[name] = {"share": round(float((v > policy.lesion_max_side).mean()), 4) if len(v)
                     else None, "n": int(len(v)),
                     "median_side": round(float(np.median(v)), 3) if len(v) else None}
    return out


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of a and b [N]; NaN with fewer than 3 values or a constant one."""
    ok = len(a) > 2 and np.std(a) > 0 and np.std(b) > 0
    return float(np.corrcoef(a, b)[0, 1]) if ok else float("nan")


def area_correlation(s: np.ndarray, area: np.ndarray, y: np.ndarray) -> dict:
    """Per class (normal, anomaly): Pearson r of score and lesion area, n, images without a
    lesion, and the median area."""
    out = {}
    for name, cls in (("normal", 0), ("anomaly", 1)):
        a, v = area[y == cls], s[y == cls]
        out[name] = {"pearson_r": round(pearson_r(v, a), 4), "n": int(len(a)),
                     "no_lesion": int((a == 0).sum()),
                     "median_area": round(float(np.median(a)), 4) if len(a) else None}
    return out


def condition(y, s, groups, shifted, normal, args) -> dict:
    ci = bootstrap_cis(y, s, groups, n=args.bootstrap, seed=args.seed).get("auc")
    return {"auc": round(roc_auc(y, s), 4),
            "auc_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
            # as_is: the same seeded halves, nothing shifted: what "no difference" reads as
            "shifted_vs_not_auc": round(roc_auc(shifted[normal].astype(np.int64), s[normal]), 4)}


def validation_parser(description: str, prepared: str) -> argparse.ArgumentParser:
    """The options of a bench on a model folder and a prepared split's raw images, validation
    only (this one and bench/size.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(REPO / "models" / "ham64-cpu"))
    parser.add_argument("--prepared", default=prepared,
                        help="folder written by `anostyle prepare` (its manifest.csv)")
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "ham10000"
                                                 / "images"), help="the raw source images")
    parser.add_argument("--split", default="val", choices=["val"],
                        help="validation only: the decision is made here")
    parser.add_argument("--normal", default="nv")
    parser.add_argument("--anomaly", default="mel")
    return parser


def parse_args() -> argparse.Namespace:
    parser = validation_parser(__doc__.splitlines()[0], "ham64-sog")
    parser.add_argument("--shift", default="border", choices=[*sorted(GUARDS), "all"])
    parser.add_argument("--radius", type=float, default=1.0,
                        help="border: circle radius / half the side (1: touching the edges)")
    parser.add_argument("--factor", type=float, default=0.7, help="exposure: brightness factor")
    parser.add_argument("--zoom", type=float, nargs="+", default=[0.75, 1.33],
                        help="zoom: factors (> 1 in, < 1 out), one condition each")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-area", action="store_true",
                        help="skip the score-vs-lesion-area correlation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = AnoModel.open(args.model, device="cpu")
    scorer = model.detector
    rows = PreparedDataset.open(args.prepared).rows(args.split)
    rows = rows[rows["class"].isin((args.normal, args.anomaly))].to_dict("records")
    y = np.array([r["class"] == args.anomaly for r in rows], dtype=np.int64)
    groups = [r["group"] for r in rows]
    shifted = shifted_halves(y == 1, args.share, args.seed)
    shifts = requested_shifts(args)
    report = {"benchmark": "acquisition", "shift": args.shift, "model": args.model,
              "method": scorer.detector.method, "policy": dataclasses.asdict(model.policy),
              "split": args.split, "n_normal": int((y == 0).sum()),
              "n_anomaly": int((y == 1).sum()), "share": args.share, "seed": args.seed,
              "shifts": [s.name for s in shifts],
              **({"radius": args.radius} if args.shift in ("border", "all") else {}),
              **({"factor": args.factor} if args.shift in ("exposure", "all") else {}),
              **({"zoom": args.zoom} if args.shift in ("zoom", "all") else {}),
              "conditions": {}}
    normal = y == 0
    raw = decode_sources(rows, args.images, args.prepared)  # once for every condition
    as_is = fit_all(model, raw, None)
    s = score_fitted(scorer, as_is, "as is")
    report["conditions"]["as_is"] = condition(y, s, groups, shifted, normal, args)
    if not args.no_area:
        report["lesion_area_correlation"] = area_correlation(s, lesion_areas(as_is), y)
        if model.policy.framing != "frame":
            # lesion framing makes the fitted lesion's area similar by design; its area in the
            # image as acquired (the whole frame fitted) is what a size-driven score would follow
            acquired = lesion_areas(fit_all(model, raw, {"framing": "frame"}))
            report["acquired_area_correlation"] = area_correlation(s, acquired, y)
            report["square_cut_down"] = {"as_is": cut_down(raw, model.policy, y)}
    for shift in shifts:
        images = [shift.apply(img) if m else img for img, m in zip(raw, shifted)]
        guard = GUARDS[shift.kind]
        overrides = {shift.name: None} if guard is None else {
            f"{shift.name} {guard[0]}={value}": {guard[0]: value} for value in guard[1:]}
        for name, override in overrides.items():
            s = score_fitted(scorer, fit_all(model, images, override), name)
            report["conditions"][name] = condition(y, s, groups, shifted, normal, args)
        if shift.kind == "zoom" and "square_cut_down" in report:  # the shifted images alone
            report["square_cut_down"][shift.name] = cut_down(
                [img for img, m in zip(images, shifted) if m], model.policy, y[shifted])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)
