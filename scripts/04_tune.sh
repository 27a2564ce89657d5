#!/usr/bin/env bash
# Step 4: choose the scoring configuration on the VALIDATION split only (test is never read):
# tune.xlsx (one row per configuration), detector.json + bank.safetensors (the chosen one).
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 04 tune: $DATASET/val.zip -> $TUNED (select $SELECT)"
anostyle tune --network "$network" --encoder "$encoder" --data "$DATASET/val.zip" \
  --train "$DATASET/train.zip" --outdir "$TUNED" --select "$SELECT" --anomaly-class "$ANOMALY" \
  --bootstrap "$BOOTSTRAP" --device "$DEVICE" ${BY:+--by "$BY"}
