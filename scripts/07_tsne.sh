#!/usr/bin/env bash
# Step 7: t-SNE of the encoder's latent codes, coloured by class.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 07 tsne -> $GRAPHICS/tsne.png"
anostyle tsne --network "$network" --encoder "$encoder" --data "$DATASET/val.zip" \
  --data "$DATASET/test.zip" --outdir "$GRAPHICS" --device "$DEVICE"
