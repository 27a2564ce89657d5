#!/usr/bin/env bash
# Step 8: one HTML page with every figure and the summary table.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 08 report -> $GRAPHICS/index.html"
anostyle report --graphics "$GRAPHICS"
