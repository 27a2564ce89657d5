#!/usr/bin/env bash
# Step 5: anomaly scores of the validation and test images -> one Excel sheet per method.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 05 score: $METHODS -> $SCORES"
anostyle score --network "$network" --encoder "$encoder" --data "$DATASET/val.zip" \
  --data "$DATASET/test.zip" --methods "$METHODS" --outdir "$SCORES" \
  --heatmaps "$GRAPHICS/heatmaps" --device "$DEVICE"
