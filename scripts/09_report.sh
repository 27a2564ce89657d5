#!/usr/bin/env bash
# Step 9: one HTML page with every figure and the summary table.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 09 report -> $GRAPHICS/index.html"
anostyle report --graphics "$GRAPHICS"
