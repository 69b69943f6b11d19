#!/usr/bin/env bash
# GPU benchmark: run it on any machine with a CUDA GPU and fuselabel installed (`pip install -e .`).
#
#   bash benchmarks/gpu.sh DATA        # DATA: the course data folder (train.csv and data/)
#
# What it measures, each figure printed with the card's name:
#   1) `fuselabel train --preset gpu-best` (fine-tuning; every photo decoded once and augmented on the GPU) on 90 %
#      of the rows: wall time, and mean F1 on the other 10 %, held out (stratified, split seed 2026, as in
#      benchmarks/heldout.py), scored with `fuselabel evaluate`;
#   2) `fuselabel predict` of 10,000 rows end to end (files on disk -> submission CSV, start-up and model loading
#      included), encoders and heads on the GPU.
#
# Settings (environment): GPU_SH_WORK (scratch folder; default a new temporary folder), GPU_SH_EPOCHS (default:
# the preset's), GPU_SH_PREDICT_ROWS (10000), PYTHON (default python3).
# GPU_SH_DRY_RUN=1 runs the same steps on a CPU, with tiny settings and a few rows, to check the script itself.
set -euo pipefail

DATA=${1:?usage: bash benchmarks/gpu.sh DATA   (a folder holding train.csv and data/)}
PY=${PYTHON:-python3}
WORK=${GPU_SH_WORK:-$(mktemp -d)}
DRY=${GPU_SH_DRY_RUN:-}
mkdir -p "$WORK"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
fl() { "$PY" -m fuselabel.cli "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }

if [ -z "$DRY" ]; then
  CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
  [ -n "$CARD" ] || { echo "gpu.sh: error: PyTorch sees no CUDA GPU (GPU_SH_DRY_RUN=1 checks the script on a CPU)" >&2; exit 2; }
  ROWS=0; PREDICT_ROWS=${GPU_SH_PREDICT_ROWS:-10000}; WARM_ROWS=512
  TRAIN_EXTRA=(); PREDICT_EXTRA=()
else
  CARD="CPU dry run"
  ROWS=${GPU_SH_ROWS:-80}; PREDICT_ROWS=${GPU_SH_PREDICT_ROWS:-48}; WARM_ROWS=16
  TRAIN_EXTRA=(--image-size 64 --epochs 1 --batch-size 16 --accelerator cpu --precision 32-true --num-workers 0
               --set "text_config_overrides={num_hidden_layers: 1}")
  PREDICT_EXTRA=(--num-workers 0)
fi
[ -n "${GPU_SH_EPOCHS:-}" ] && TRAIN_EXTRA+=(--epochs "$GPU_SH_EPOCHS")
"$PY" -c "import torch, torchvision, timm, transformers, lightning, os; print(f'[$CARD] torch {torch.__version__}, \
torchvision {torchvision.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, \
lightning {lightning.__version__}; {os.cpu_count()} CPU cores')"

# The held-out split and the prediction rows, each row copied byte for byte from train.csv.
IMAGES=$("$PY" - "$DATA" "$WORK" "$ROWS" "$PREDICT_ROWS" "$WARM_ROWS" <<'PYEOF'
import sys
from pathlib import Path

from fuselabel.data import stratified_split
from fuselabel.records import resolve_data
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.records import read_records
from fuselabel.writers import write_rows

data, work = sys.argv[1], Path(sys.argv[2])
rows, predict_rows, warm_rows = (int(a) for a in sys.argv[3:6])
images, csv = resolve_data(data, None)
records = read_records(csv)
n = min(rows or len(records.records), len(records.records))
y = labels_to_matrix(records.label_sets[:n], label_vocabulary(records.label_sets[:n]))
dev, held = stratified_split(y, 0.1, 2026)
write_rows(records, sorted(dev), work / "dev.csv")
write_rows(records, sorted(held), work / "heldout.csv")
write_rows(records, range(min(predict_rows, len(records.records))), work / "predict.csv")
write_rows(records, range(min(warm_rows, len(records.records))), work / "warm.csv")
print(images)
PYEOF
)
echo "[$CARD] data $DATA; scratch folder $WORK"

# 1) training and held-out mean F1
t0=$(now)
fl train --preset gpu-best --data "$IMAGES" --csv "$WORK/dev.csv" --out "$WORK/model" "${TRAIN_EXTRA[@]}"
TRAIN_S=$(since "$t0")
fl evaluate "$WORK/model" --data "$IMAGES" --csv "$WORK/heldout.csv" --json "$WORK/heldout.json" --engine torch \
  "${PREDICT_EXTRA[@]}" > "$WORK/heldout.txt"
F1=$("$PY" -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['mean_f1']:.4f}\")" "$WORK/heldout.json")
echo "[$CARD] gpu-best training: $TRAIN_S s wall (fuselabel train, start to saved model); held-out mean F1 $F1"

# 2) prediction end to end: encoders and heads on the GPU, photos decoded by threads on the CPU
predict() {  # csv out -> seconds
  local t
  t=$(now)
  fl predict "$WORK/model" --data "$IMAGES" --csv "$1" --out "$2" --engine torch --quiet "${PREDICT_EXTRA[@]}" \
    > /dev/null
  since "$t"
}
predict "$WORK/warm.csv" "$WORK/warm-sub.csv" > /dev/null   # untimed: page cache and CUDA start-up
PRED_S=$(predict "$WORK/predict.csv" "$WORK/sub.csv")
N=$(($(wc -l < "$WORK/sub.csv") - 1))
"$PY" -c "import sys; c, n, s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]); \
print(f'[{c}] predict {n} rows end to end: {s:.1f} s ({n / s:.0f} rows/s)')" "$CARD" "$N" "$PRED_S"
echo "[$CARD] SUMMARY gpu-best train $TRAIN_S s, held-out mean F1 $F1; predict $N rows: $PRED_S s"
