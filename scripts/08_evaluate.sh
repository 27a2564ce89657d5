#!/usr/bin/env bash
# Step 8: ROC/AUC with CIs, thresholds from validation, confusion matrices, violins, reports.
# The tuned detector (detector.xlsx, chosen on validation in step 4) is the primary method.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 08 evaluate: $SCORES -> $GRAPHICS ($NORMAL vs $ANOMALY, primary: the tuned detector)"
anostyle evaluate --scores "$SCORES" --outdir "$GRAPHICS" --prepared "$DATASET" \
  --normal-class "$NORMAL" --anomaly-class "$ANOMALY" --bootstrap "$BOOTSTRAP" \
  --primary detector ${BY:+--by "$BY"}
