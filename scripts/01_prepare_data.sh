#!/usr/bin/env bash
# Step 1: raw images + metadata -> train.zip (normal only), val.zip, test.zip, manifest.csv.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 01 prepare: $SOURCE -> $DATASET ($RES px, normal class: $NORMAL)"
label_args=()
if [ -n "$LABELS" ]; then
  label_args=(--labels "$LABELS" --id-column "$ID_COLUMN" --label-column "$LABEL_COLUMN"
              --group-column "$GROUP_COLUMN")
fi
split_args=()
if [ -n "$SPLITS_FROM" ]; then
  split_args=(--splits-from "$SPLITS_FROM")
fi
# Fine-tuning a model folder's network (the default RESUME): prepare the data with the
# preprocessing that model records (e.g. its colour constancy), or the later steps refuse it.
model_args=()
if [ -n "$RESUME" ] && [ -f "$(dirname "$RESUME")/network.safetensors" ]; then
  model_args=(--model "$(dirname "$RESUME")")
fi
anostyle prepare --source "$SOURCE" "${label_args[@]}" "${split_args[@]}" "${model_args[@]}" \
  --normal "$NORMAL" --dest "$DATASET" --resolution "$RES" --seed 0
