#!/usr/bin/env bash
# Step 3: train the izif encoder against the newest generator (G and D frozen).
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
echo "== 03 train-encoder: $network -> $ENCODER_DIR ($ENCODER_KIMG kimg)"
anostyle train-encoder --network "$network" --data "$DATASET/train.zip" --outdir "$ENCODER_DIR" \
  --kimg "$ENCODER_KIMG" --workers "$WORKERS" --device "$DEVICE"
