"""How model folders' detectors do on one prepared collection, class pair by class pair.

For a collection from another source (e.g. PH2: common naevi, atypical naevi, melanomas), this
scores one split of a prepared folder with each `--model` folder's tuned detector
(`AnoModel.open(DIR).detector.score_batch`, as `score --model` does) and reports, for each
`--pairs` entry NORMAL:ANOMALY, the AUC with a 95% CI by lesion bootstrap, and the paired
difference of every model with the first one (the same images, paired bootstrap). The models
must share the prepared folder's preprocessing policy (prepare it with `anostyle prepare
--model` of the first; an adapted folder records its parent's policy).

Prints one JSON object. Usage: `.venv/bin/python bench/transfer.py --prepared DIR --model A
--model B [--pairs common_nevus:melanoma,atypical_nevus:melanoma] [--split test]`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from anodata.prepared import PreparedDataset
from anomaly.methods.detector import check_data_policy
from anomaly.evaluation.metrics import bootstrap_cis, paired_comparison, roc_auc
from anomaly.model.ano_model import AnoModel
from stylegan.dataset import ImageDataset, iterate_batches
from stylegan.errors import run_main


def scores_of(model_dir: str, data: str, *, batch: int = 64) -> pd.DataFrame:
    """file -> detector score of every image of a prepared zip."""
    model = AnoModel.open(model_dir, device="cpu")
    check_data_policy(model, data)
    dataset = ImageDataset(data)
    rows = []
    for images, _labels, names in iterate_batches(dataset, batch):
        rows += list(zip(names, model.detector.score_batch(images).tolist()))
    return pd.DataFrame(rows, columns=["file", "score"])


def pair_figures(table: pd.DataFrame, normal: str, anomaly: str, models: list[str], *,
                 n: int, seed: int) -> dict:
    rows = table[table["class"].isin([normal, anomaly])]
    y = (rows["class"] == anomaly).to_numpy(np.int64)
    groups = rows["group"].where(rows["group"] != "", "image:" + rows["file"]).to_numpy()
    out: dict = {"n_normal": int((y == 0).sum()), "n_anomaly": int(y.sum()), "models": {}}
    for k, m in enumerate(models):
        s = rows[f"score_{k}"].to_numpy(np.float64)
        lo, hi = bootstrap_cis(y, s, groups, n=n, seed=seed).get("auc", (np.nan, np.nan))
        entry = {"auc": roc_auc(y, s), "auc_ci": [lo, hi]}
        if k > 0:
            res = paired_comparison(y, s, rows["score_0"].to_numpy(np.float64), groups, n=n,
                                    seed=seed)
            entry["minus_first"] = {"difference": res.difference,
                                    "ci": [res.ci_low, res.ci_high], "p_value": res.p_value}
        out["models"][m] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", required=True, help="a folder written by `prepare`")
    parser.add_argument("--model", action="append", required=True, help="model folder (repeat)")
    parser.add_argument("--pairs", default="common_nevus:melanoma,atypical_nevus:melanoma")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    table = PreparedDataset.open(args.prepared).rows(args.split)[["file", "class", "group"]]
    for k, m in enumerate(args.model):
        scored = scores_of(m, f"{args.prepared}/{args.split}.zip")
        table = table.merge(scored.rename(columns={"score": f"score_{k}"}), on="file")
    result = {"prepared": args.prepared, "split": args.split, "models": args.model,
              "bootstrap": args.bootstrap, "pairs": {}}
    for pair in args.pairs.split(","):
        normal, anomaly = pair.split(":")
        result["pairs"][pair] = pair_figures(table, normal, anomaly, args.model,
                                             n=args.bootstrap, seed=args.seed)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
