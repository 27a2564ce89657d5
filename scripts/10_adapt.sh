#!/usr/bin/env bash
# Step 10: your own collection. One command turns the model folder PARENT into a model folder
# tuned for the collection in SOURCE (+ LABELS): prepare it with the parent's preprocessing,
# optionally fine-tune (ADAPT_KIMG, ADAPT_ENCODER_KIMG), choose the scoring configuration on its
# validation split, write ADAPTED (network, encoder, detector.json, model card) and read its
# test split once into ADAPTED/evaluation. Run again after an interruption: it continues.
set -euo pipefail
source "$(dirname "$0")/settings.sh"
if [ -e "$ADAPTED" ]; then
  echo "== 10 adapt: $ADAPTED exists already; remove it (or set ADAPTED) to adapt again"
  exit 0
fi
echo "== 10 adapt: $PARENT + $SOURCE -> $ADAPTED"
anostyle adapt --model "$PARENT" --dest "$ADAPTED" --source "$SOURCE" \
  ${LABELS:+--labels "$LABELS" --id-column "$ID_COLUMN" --label-column "$LABEL_COLUMN"} \
  ${LABELS:+${GROUP_COLUMN:+--group-column "$GROUP_COLUMN"}} \
  ${SPLIT_COLUMN:+--split-column "$SPLIT_COLUMN"} ${SPLITS_FROM:+--splits-from "$SPLITS_FROM"} \
  --normal "$NORMAL" --anomaly-class "$ANOMALY" --select "$SELECT" ${BY:+--by "$BY"} \
  --kimg "$ADAPT_KIMG" --encoder-kimg "$ADAPT_ENCODER_KIMG" --bootstrap "$BOOTSTRAP" \
  --device "$DEVICE"
