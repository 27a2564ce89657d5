"""How much of a model folder's detector signal is the lesion's size, on the VALIDATION split only.

For each image of a prepared split (normals `--normal` and anomalies `--anomaly`) the bench
decodes the raw source image, fits it with the model's policy and scores it with the tuned
detector (score s), and measures the lesion's extent in the photo as acquired: the side its
framing square asks for, in short sides of the photo (anodata.policy.wanted_side of the lesion
anodata.policy.framing_lesion finds with the policy's border; no lesion found: NaN). Lesion
framing makes the fitted lesion's size similar where the square fits in the photo; this extent
is what it cannot remove (a square cut down to the short side) and what a size-driven score
would follow.

Three scores are compared on every route (the naevi of one value of `--by`, e.g. dx_type, with
at least `--min-normals` of them, against all anomalies, as `tune --select worst:COLUMN`
counts routes; and "all"):
- `score`: the detector's score s;
- `side`: the extent alone (larger = more anomalous);
- `partialled`: t - b * log(side), with t = log(s) (s itself when a score is not > 0) and b the
  least-squares slope of t on log(side) over a seeded subset of `--fit-images` TRAINING naevi
  (their raw images, the same fitting and scoring): the score with the size it grows with among
  naevi taken out, fitted without a label. An image without a lesion found takes the training
  naevi's median log(side) (so its partialled score is t shifted by the same constant).

Per route: the AUC of each, with lesion-level 95% bootstrap CIs (groups = the manifest's
`group`), and the paired group bootstrap of AUC(score) - AUC(partialled). Per class: the Pearson r
of t and of the partialled score with log(side) (images with a lesion found). It answers one
question: can a score that does not follow the lesion's size keep the detector's AUC on every
route? Test is never read here.

Prints one JSON object. Usage: `.venv/bin/python bench/size.py [--model models/ham64-cpu]
[--prepared ham64-lesion] [--images ../shared/data/ham10000/images]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/size.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

from anodata.prepared import PreparedDataset  # noqa: E402
from anomaly.evaluation import protocol  # noqa: E402
from anomaly.evaluation.metrics import bootstrap_cis, paired_bootstrap, roc_auc  # noqa: E402
from anomaly.methods import detector_scores as ds  # noqa: E402
from anomaly.model.ano_model import AnoModel  # noqa: E402
from bench.acquisition import (decode_sources, fit_all, pearson_r, score_fitted,  # noqa: E402
                               validation_parser, wanted_sides)
from stylegan.errors import UserError, run_main  # noqa: E402

SCORES = ("score", "side", "partialled")


def transform_of(s: np.ndarray) -> str:
    """'log' when every score is > 0, else 'identity'."""
    return "log" if (np.asarray(s) > 0).all() else "identity"


def transformed(s: np.ndarray, transform: str) -> np.ndarray:
    """t of the module docstring: log(s) or s; a score <= 0 under 'log' is refused."""
    s = np.asarray(s, np.float64)
    if transform == "identity":
        return s
    if not (s > 0).all():
        raise UserError("The detector gave a score <= 0 on the validation split where the "
                        "training naevi's were all > 0; the log-linear size fit cannot take it.")
    return np.log(s)


def size_fit(s: np.ndarray, sides: np.ndarray) -> tuple[str, ds.AreaTrend]:
    """The transform of the training naevi's scores s and the trend of t on their sides
    (anomaly.methods.detector_scores.fit_log_trend, as izif-areafree fits its bank's)."""
    transform = transform_of(s)
    return transform, ds.fit_log_trend(transformed(s, transform), sides,
                                       fix="give a prepared folder with more training naevi")


def size_scores(s: np.ndarray, sides: np.ndarray, transform: str,
                trend: ds.AreaTrend) -> dict[str, np.ndarray]:
    """The three scores of the module docstring and t; missing sides take the trend's median
    (anomaly.methods.detector_scores.detrend)."""
    t = transformed(s, transform)
    return {"score": np.asarray(s, np.float64),
            "side": np.where(np.isfinite(sides), sides, np.exp(trend.median_log_area)),
            "partialled": ds.detrend(t, sides, trend), "t": t}


def routes(by: np.ndarray, y: np.ndarray, min_normals: int) -> dict[str, np.ndarray]:
    """'all' and each value of `by` with at least min_normals normals: the mask of its normals
    and all anomalies (anomaly.evaluation.protocol.subgroups, as tune counts routes)."""
    found = protocol.subgroups(np.asarray(by).astype(str), y, minimum=min_normals)
    return {"all": np.ones(len(y), dtype=bool),
            **{g.value: g.normals for g in found if g.counted}}


def correlations(scores: dict[str, np.ndarray], sides: np.ndarray, y: np.ndarray) -> dict:
    """Per class: Pearson r of t (log score) and of the partialled score with log(side)."""
    out = {}
    for name, cls in (("normal", 0), ("anomaly", 1)):
        keep = (y == cls) & np.isfinite(sides)
        out[name] = {"n": int(keep.sum()), **{
            f"r_{key}": round(pearson_r(scores[key][keep], np.log(sides[keep])), 4)
            for key in ("t", "partialled")}}
    return out


def route_table(scores: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray,
                masks: dict[str, np.ndarray], *, n: int, seed: int) -> dict:
    """Per route: sizes, the AUC and lesion-level CI of each score, and the paired bootstrap of
    AUC(score) - AUC(partialled)."""
    out = {}
    for route, m in masks.items():
        yy, gg = y[m], groups[m]
        row = {"n_normal": int((yy == 0).sum()), "n_anomaly": int((yy == 1).sum())}
        for key in SCORES:
            ci = bootstrap_cis(yy, scores[key][m], gg, n=n, seed=seed).get("auc")
            row[key] = {"auc": round(roc_auc(yy, scores[key][m]), 4),
                        "auc_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}
        if n > 0:
            p = paired_bootstrap(yy, scores["score"][m], scores["partialled"][m], gg, n=n,
                                 seed=seed)
            row["score_minus_partialled"] = {
                "difference": round(p.difference, 4),
                "ci": [round(p.ci_low, 4), round(p.ci_high, 4)], "p": round(p.p_value, 4),
                "test": p.test}
        out[route] = row
    return out


def parse_args() -> argparse.Namespace:
    parser = validation_parser(__doc__.splitlines()[0], "ham64-lesion")
    parser.add_argument("--by", default="dx_type", help="manifest column of the routes")
    parser.add_argument("--min-normals", type=int, default=20,
                        help="smallest route of normals that is reported")
    parser.add_argument("--fit-images", type=int, default=1000,
                        help="training naevi the size slope is fitted on (seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.fit_images < 3:
        raise SystemExit("Error: --fit-images must be at least 3.")
    torch.set_num_threads(args.threads)
    model = AnoModel.open(args.model, device="cpu")
    scorer = model.detector
    data = PreparedDataset.open(args.prepared)
    val = data.rows(args.split)
    val = val[val["class"].isin((args.normal, args.anomaly))]
    if args.by not in val.columns:
        raise SystemExit(f"Error: the manifest of {args.prepared} has no column {args.by!r}.")
    train = data.rows("train")
    train = train[train["class"] == args.normal]
    if train.empty or val.empty:
        raise SystemExit(f"Error: {args.prepared} has no training {args.normal} or no "
                         f"{args.split} {args.normal}/{args.anomaly} images.")
    train = train.sample(n=min(args.fit_images, len(train)), random_state=args.seed)

    def measure(rows: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
        raw = decode_sources(rows.to_dict("records"), args.images, args.prepared)
        return score_fitted(scorer, fit_all(model, raw, None), name), \
            wanted_sides(raw, model.policy)

    s_fit, sides_fit = measure(train, "training naevi")
    transform, trend = size_fit(s_fit, sides_fit)
    s, sides = measure(val, args.split)
    y = (val["class"] == args.anomaly).to_numpy(np.int64)
    scores = size_scores(s, sides, transform, trend)
    report = {"benchmark": "size", "model": args.model, "method": scorer.detector.method,
              "framing": model.policy.framing, "split": args.split, "by": args.by,
              "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum()),
              "no_lesion": {"normal": int((~np.isfinite(sides[y == 0])).sum()),
                            "anomaly": int((~np.isfinite(sides[y == 1])).sum())},
              "seed": args.seed,
              "fit": {"transform": transform, "slope": trend.slope,
                      "median_log_side": trend.median_log_area, "images": len(train),
                      "no_lesion": int((~np.isfinite(sides_fit)).sum())},
              "correlation_with_log_side": correlations(scores, sides, y),
              "routes": route_table(scores, y, val["group"].astype(str).to_numpy(),
                                    routes(val[args.by].fillna("").to_numpy(), y,
                                           args.min_normals),
                                    n=args.bootstrap, seed=args.seed)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)
