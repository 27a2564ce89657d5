#!/usr/bin/env bash
# The whole pipeline, step by step. Override any setting from the environment (see settings.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for step in 01_prepare_data 02_train_gan 03_train_encoder 04_tune 05_reconstruct 06_score \
            07_tsne 08_evaluate 09_report 10_adapt; do
  bash "$here/$step.sh"
done
source "$here/settings.sh"
echo "Done. Open $GRAPHICS/index.html; score sheets are in $SCORES; the adapted model folder"
echo "is $ADAPTED (its README.md and evaluation/)."
