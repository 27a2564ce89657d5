#!/usr/bin/env bash
# Step 7: ROC/AUC with CIs, thresholds from validation, confusion matrices, violins, reports.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 07 evaluate: $SCORES -> $GRAPHICS ($NORMAL vs $ANOMALY, plus the k-NN pixel baseline)"
anostyle evaluate --scores "$SCORES" --outdir "$GRAPHICS" --prepared "$DATASET" \
  --normal-class "$NORMAL" --anomaly-class "$ANOMALY" --bootstrap "$BOOTSTRAP"
