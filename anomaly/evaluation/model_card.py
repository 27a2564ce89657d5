"""The model card (README.md) of a model folder written by `anostyle adapt`."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

TOP_ROWS = 5  # validation configurations listed in the card


def _ci(value: Any, low: Any, high: Any) -> str:
    def fmt(x: Any) -> str:
        try:
            x = float(x)
        except (TypeError, ValueError):
            return "n/a"
        return f"{x:.3f}" if math.isfinite(x) else "n/a"
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _counts_table(counts: dict[str, dict[str, int]]) -> list[str]:
    classes = sorted({c for per in counts.values() for c in per})
    splits = [s for s in ("train", "val", "test") if s in counts]
    lines = ["| class | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in splits) + " |")
    return lines


def _tune_rows(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return ["(no tune.xlsx)"]
    top = table.sort_values("select", ascending=False, kind="stable").head(TOP_ROWS)
    lines = ["| configuration | selection value | validation AUC [95% CI, lesions] | chosen |",
             "| --- | --- | --- | --- |"]
    for _, row in top.iterrows():
        chosen = "**yes**" if bool(row.get("chosen", False)) else ""
        lines.append(f"| `{row['configuration']}` | {float(row['select']):.3f} | "
                     f"{_ci(row['auc'], row.get('auc_low'), row.get('auc_high'))} | {chosen} |")
    chosen_rows = table[table.get("chosen", False) == True]  # noqa: E712 (a pandas mask)
    if not chosen_rows.empty and chosen_rows.index[0] not in top.index:
        row = chosen_rows.iloc[0]
        lines.append(f"| `{row['configuration']}` | {float(row['select']):.3f} | "
                     f"{_ci(row['auc'], row.get('auc_low'), row.get('auc_high'))} | **yes** |")
    return lines


def adapt_card(record: dict[str, Any], tune_table: pd.DataFrame) -> str:
    """Markdown for DEST/README.md from adapt.json's record and the tune table."""
    opts, steps, parent = record["options"], record["steps"], record["parent"]
    name = opts["dest"].rstrip("/").split("/")[-1]
    tune = steps.get("tune", {})
    test = steps.get("test", {})
    lines = [f"# {name} — adapted from `{parent['folder']}` by `anostyle adapt`", "",
             "A detector for this collection: the parent model's networks "
             + ("fine-tuned on" if steps["gan"]["trained"] else "(GAN kept as it is")
             + (" the collection's training normals" if steps["gan"]["trained"] else ")")
             + ", its encoder "
             + ("warm-started from the parent's and trained on them (checkpoint chosen on the "
                "validation normals' loss)" if steps["encoder"]["trained"] else "kept as it is")
             + ", and the scoring configuration chosen on the collection's validation split "
               "with its training normals as the bank. Use it like any model folder: "
               "`anostyle score --model DIR`, `anostyle serve --model DIR`, or "
               "`anomaly.model.ano_model.AnoModel.open(DIR)` in Python.", "",
             "## Parent", "",
             f"- folder: `{parent['folder']}`",
             f"- network.safetensors sha256: `{parent['network_sha256']}`",
             f"- encoder.safetensors sha256: `{parent['encoder_sha256']}`",
             "- the preprocessing policy is the parent's (recorded in the encoder and in "
             "detector.json); prepare new images of this collection with "
             f"`anostyle prepare --model {opts['dest']}`", "",
             "## Data (images per split and class)", "",
             *_counts_table(steps["prepare"]["counts"]), "",
             "`splits.csv` lists the split of every group (lesion), so the same split can be "
             "prepared again with `--splits-from`."
             + (" Abnormal images that a given split put in train were moved to val with their "
                "lesion (`--train-anomalies val`): only normals are trained on, and test is "
                "as given." if opts.get("train_anomalies") == "val" else ""), "",
             "## Validation: the choice", "",
             f"Rule: `--select {tune.get('rule', {}).get('select')}`, tolerance "
             f"{opts['tolerance']}: the cheapest configuration within the tolerance of the best "
             "selection value is chosen (`anostyle tune`). Chosen: "
             f"`{tune.get('method')}`."]
    for note in tune.get("notes", []):
        lines.append(f"\nNote: {note}.")
    lines += ["", *_tune_rows(tune_table), "",
              "Every configuration tried is in `tune.xlsx`.", "", "## Test", ""]
    if test.get("read"):
        result = test.get("result", {})
        det = result.get("detector", {})
        base = result.get("baseline")
        lines += ["The test split was read **once**, after every choice above had been made "
                  "on validation (`score` + `evaluate --primary detector`; `evaluation/` holds "
                  "the report, ROC and summary.json).", "",
                  f"- detector (`{tune.get('method')}`), {det.get('comparison')}: AUC "
                  f"{_ci(det.get('auc'), det.get('auc_low'), det.get('auc_high'))} "
                  f"({int(det.get('n_normal') or 0)} normals, {int(det.get('n_anomaly') or 0)} "
                  f"anomalies; 95% CI by lesion bootstrap)"]
        if base:
            lines.append(f"- best baseline (`{base.get('method')}`, chosen on validation): AUC "
                         f"{_ci(base.get('auc'), base.get('auc_low'), base.get('auc_high'))}")
        if det.get("auc_diff") is not None:
            lines.append(f"- detector minus baseline, paired over the same lesions: "
                         f"{_ci(det.get('auc_diff'), det.get('auc_diff_low'), det.get('auc_diff_high'))}"
                         f", p = {det.get('p_value'):.3f}")
    else:
        lines.append(f"The test split was not read ({test.get('why', 'not run')}).")
    lines += ["", "## How it was made", "", "```", record.get("command") or "(Python API)",
              "```", "", "Time per step: " + ", ".join(
                  f"{step} {info.get('seconds', 0):.0f} s" for step, info in steps.items()) + ".",
              "", "Every option (`adapt.json` holds this and each step's record):", "", "```json",
              json.dumps(opts, indent=1, default=str), "```", "",
              "## Licence", "",
              "Derived from the parent model (see its README for the data it was trained on "
              "and that data's licence, e.g. HAM10000: CC BY-NC 4.0) and from this collection, "
              "whose licence applies too. Research use; not a medical device.", ""]
    return "\n".join(lines)
