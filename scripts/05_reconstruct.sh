#!/usr/bin/env bash
# Step 5: reconstruct the test images (same file names) with residual maps beside them.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 05 reconstruct: $DATASET/test.zip -> $RECON_DIR"
anostyle reconstruct --network "$network" --encoder "$encoder" --source "$DATASET/test.zip" \
  --outdir "$RECON_DIR" --residual --device "$DEVICE"
