#!/usr/bin/env bash
# Step 6: anomaly scores of the validation and test images -> one Excel sheet per method, and
# detector.xlsx for the configuration tune chose (step 4).
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 06 score: $METHODS + the tuned detector -> $SCORES"
anostyle score --network "$network" --encoder "$encoder" --detector "$TUNED/detector.json" \
  --data "$DATASET/val.zip" --data "$DATASET/test.zip" --methods "$METHODS" --outdir "$SCORES" \
  --heatmaps "$GRAPHICS/heatmaps" --device "$DEVICE"
