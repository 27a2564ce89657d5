#!/usr/bin/env bash
# Step 3: train the izif encoder against the newest generator (G and D frozen).
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
outdir=$(encoder_run_dir "$network")
resume_args=()  # a second run for the same network continues its encoder
if ls "$outdir"/encoder-*.state.pt >/dev/null 2>&1; then resume_args=(--resume latest); fi
echo "== 03 train-encoder: $network -> $outdir ($ENCODER_KIMG kimg)"
anostyle train-encoder --network "$network" --data "$DATASET/train.zip" --outdir "$outdir" \
  --val "$DATASET/val.zip" --kimg "$ENCODER_KIMG" --snap "$ENCODER_SNAP" --workers "$WORKERS" \
  --device "$DEVICE" \
  "${resume_args[@]}"
