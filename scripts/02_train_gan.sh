#!/usr/bin/env bash
# Step 2: train (or fine-tune from $RESUME) the StyleGAN2-ADA generator on the normal images.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
echo "== 02 train-gan: --cfg $CFG, $KIMG kimg, resume: ${RESUME:-none}"
resume_args=()
if [ -n "$RESUME" ]; then resume_args=(--resume "$RESUME"); fi
anostyle train-gan --outdir "$RUNS" --cfg "$CFG" --data "$DATASET/train.zip" --gpus "$GPUS" \
  --kimg "$KIMG" --tick "${TICK:-1}" --snap "${SNAP:-5}" --mirror 1 --workers "$WORKERS" \
  --device "$DEVICE" "${resume_args[@]}"
