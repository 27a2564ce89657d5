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
anostyle prepare --source "$SOURCE" "${label_args[@]}" "${split_args[@]}" --normal "$NORMAL" \
  --dest "$DATASET" --resolution "$RES" --seed 0
