#!/usr/bin/env bash
# The fast-data-path benchmark. Runs ON the GPU machine, after the device calls that
# `python benchmarks/gpu_prepare.py` prints (they carry wheels, weights and the data into .gpu/):
#
#   1) trains --preset gpu-best (image_cache=memory: images decoded once, augmented on the GPU) on the
#      COMP5329 data with the carried EfficientNet-Lite2 / MiniLM weights, and times it;
#   2) predicts 10,000 rows end to end (files on disk -> submission CSV, model loading included) with
#      nvJPEG decoding on the GPU;
#   3) the same prediction with GPU decoding off (PIL in DataLoader workers), in the same run, and the ratio.
#
# Every figure is printed with the card's name. Expected wall time on one H100: about 5 minutes (< 8).
#
#   bash benchmarks/gpu.sh
#   GPU_SH_DRY_RUN=1 GPU_SH_DATA=DIR bash benchmarks/gpu.sh   # here, on a CPU: same Python steps, tiny subset
#
# Settings (environment): GPU_SH_DATA (data folder holding train.csv and data/, default .gpu/unpacked),
# GPU_SH_EPOCHS (default: the preset's 12), GPU_SH_PREDICT_ROWS (10000), GPU_SH_BATCH (prediction batch, 256),
# GPU_SH_WORK (scratch folder, default /tmp/fuselabel-gpu), GPU_SH_PYTHON (dry run's python, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu.sh: ERROR: $*" >&2; exit 2; }
HINT="run 'python benchmarks/gpu_prepare.py' on the workstation and make every device call it prints, back to back"
G=.gpu
DATA=${GPU_SH_DATA:-$G/unpacked}
W_IMG=$G/weights/tf_efficientnet_lite2.safetensors
W_TXT=$G/weights/minilm

[ -f "$W_IMG" ] || die "image weights $W_IMG were not carried ($HINT)"
[ -f "$W_TXT/config.json" ] && [ -f "$W_TXT/model.safetensors" ] || die "text weights $W_TXT/ were not carried ($HINT)"
[ -f "$DATA/train.csv" ] || die "$DATA/train.csv is missing: data chunk part-0 was not carried/unpacked ($HINT)"
[ -d "$DATA/data" ] || die "$DATA/data/ is missing: the data chunks were not unpacked ($HINT)"
if [ -f "$DATA/EXPECTED.json" ]; then
  want=$(sed -E 's/.*"images": *([0-9]+).*/\1/' "$DATA/EXPECTED.json")
  have=$(find "$DATA/data" -maxdepth 1 -type f | wc -l)
  [ "$have" -eq "$want" ] || die "only $have of $want images are in $DATA/data: a data chunk is missing ($HINT)"
fi

if [ -z "${GPU_SH_DRY_RUN:-}" ]; then
  ls $G/wheels/*.whl >/dev/null 2>&1 || die "no wheels in $G/wheels ($HINT)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $G/wheels/*.whl || die "installing the carried wheels failed"
  export PYTHONPATH=/tmp/site:$PWD/src
  PY=python3
  nvidia-smi --query-gpu=name,memory.total --format=csv || die "nvidia-smi failed: is this the GPU machine?"
else
  PY=${GPU_SH_PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD/src
  echo "gpu.sh: dry run on $(uname -n) with $PY (tiny subset, CPU)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

exec "$PY" - "$DATA" "$W_IMG" "$W_TXT" <<'PYEOF'
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

data, w_img, w_txt = (Path(a) for a in sys.argv[1:4])
dry = bool(os.environ.get("GPU_SH_DRY_RUN"))
work = Path(os.environ.get("GPU_SH_WORK", "/tmp/fuselabel-gpu"))
work.mkdir(parents=True, exist_ok=True)
warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities.*")

if not dry and not torch.cuda.is_available():
    sys.exit("gpu.sh: ERROR: PyTorch sees no GPU")
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "CPU dry run"
torch.backends.cudnn.benchmark = True    # fixed input sizes: let cuDNN pick its fastest kernels

import lightning, timm, torchvision, transformers  # noqa: E402
from fuselabel.config import build_config  # noqa: E402
from fuselabel.predict import predict  # noqa: E402
from fuselabel.records import read_records, write_rows  # noqa: E402
from fuselabel.train import fit  # noqa: E402

print(f"[{card}] torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"transformers {transformers.__version__}, lightning {lightning.__version__}; {os.cpu_count()} CPU cores")


def rows_of(path: Path) -> dict:
    with open(path) as f:
        next(f)
        return dict(line.rstrip("\n").split(",", 1) for line in f)


# 1) training -------------------------------------------------------------------------------------------------
images, csv_all = data / "data", data / "train.csv"
all_rows = read_records(csv_all)


def first_rows(rows: int, out: Path) -> int:
    """The header and the first ``rows`` rows of the CSV, byte for byte."""
    return write_rows(all_rows, range(min(rows, len(all_rows))), out)


overrides = dict(image_weights=str(w_img), text_model=str(w_txt), cache_dir=str(work / "cache"))
if os.environ.get("GPU_SH_EPOCHS"):
    overrides["epochs"] = int(os.environ["GPU_SH_EPOCHS"])
train_csv = csv_all
if dry:
    train_csv = work / "train-subset.csv"
    first_rows(int(os.environ.get("GPU_SH_ROWS", "64")), train_csv)
    overrides.update(image_size=64, text_config_overrides={"num_hidden_layers": 1}, epochs=1,
                     batch_size=16, accelerator="cpu", precision="32-true", num_workers=0)
config = build_config("gpu-best", **overrides)
print(f"[{card}] training: preset gpu-best, {config.image_model} + MiniLM, {config.epochs} epochs, batch "
      f"{config.batch_size}, precision {config.precision}, image_cache={config.image_cache}, "
      f"gpu_decode={config.gpu_decode}")
# A safety net for the 8-minute budget: Lightning reads Trainer defaults from PL_TRAINER_* variables, and fit()
# sets no max_time, so this stops training (keeping the best checkpoint so far) if it runs long.
cap = os.environ.setdefault("PL_TRAINER_MAX_TIME", os.environ.get("GPU_SH_MAX_TRAIN", "00:00:04:30"))
t0 = time.time()
result = fit(config, images, train_csv, work / "model", work_dir=work / "train", progress=False)
train_s = time.time() - t0
epochs_run = json.loads((work / "model" / "metrics.json").read_text()).get("epochs_run")
print(f"[{card}] GPU train: {train_s:.0f} s, validation mean F1 {result.report['mean_f1']:.4f} "
      f"(of which Lightning fit {result.timings['train_s']:.0f} s for {epochs_run} of {config.epochs} epochs, "
      f"{result.timings['train_s'] / max(epochs_run or 1, 1):.1f} s/epoch incl. validation; time cap {cap})")

# 2) + 3) prediction, nvJPEG vs PIL workers ---------------------------------------------------------------------
n = first_rows(int(os.environ.get("GPU_SH_PREDICT_ROWS", "64" if dry else "10000")), work / "predict.csv")
warm = first_rows(16 if dry else 512, work / "warm.csv")
batch = int(os.environ.get("GPU_SH_BATCH", "16" if dry else "256"))
workers = 0 if dry else None
on = "force" if dry else "1"        # 'force' runs the tensor path on a CPU, for the dry run only


def run(mode: str, csv_path: Path, out: Path) -> float:
    os.environ["FUSELABEL_GPU_DECODE"] = mode
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.time()
    predict(work / "model", images, csv_path, out, engine="torch", batch_size=batch, num_workers=workers,
            progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time() - t


for mode in (on, "0"):   # untimed warm-up of both paths: CUDA context, cuDNN autotuning, nvJPEG, page cache
    run(mode, work / "warm.csv", work / "warm-out.csv")
gpu_s = run(on, work / "predict.csv", work / "sub-gpu.csv")
pil_s = run("0", work / "predict.csv", work / "sub-pil.csv")
a, b = rows_of(work / "sub-gpu.csv"), rows_of(work / "sub-pil.csv")
agree = sum(a[k] == b.get(k) for k in a) / max(len(a), 1)
from fuselabel.data import default_workers  # noqa: E402

print(f"[{card}] GPU predict {n} pairs: {gpu_s:.1f} s ({n / gpu_s:.0f} rows/s) - nvJPEG decode + GPU resize, "
      f"batch {batch}, model loading included")
print(f"[{card}] baseline predict {n} pairs (PIL decoding in {default_workers(workers)} DataLoader workers): "
      f"{pil_s:.1f} s ({n / pil_s:.0f} rows/s)")
print(f"[{card}] GPU decoding speed-up: {pil_s / gpu_s:.2f}x; label sets agree on {100 * agree:.1f}% of rows")

# the image side alone (decode + resize + encoder; no model loading, no text encoder), same model for both
from fuselabel.bundle import load_bundle  # noqa: E402
from fuselabel.features import extract_image_features  # noqa: E402

bundle = load_bundle(work / "model")
rows = read_records(work / "predict.csv").records
device = "cuda" if torch.cuda.is_available() and not dry else "cpu"


def image_features(mode: str) -> float:
    os.environ["FUSELABEL_GPU_DECODE"] = mode
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    extract_image_features(bundle.net.image_encoder, bundle.preprocessing, rows, images, batch_size=batch,
                           num_workers=workers, engine="torch", device=device, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.time() - t


feat_gpu, feat_pil = image_features(on), image_features("0")
print(f"[{card}] image features only, {n} images: GPU decode {n / feat_gpu:.0f} images/s, PIL workers "
      f"{n / feat_pil:.0f} images/s ({feat_pil / feat_gpu:.2f}x)")
print(f"[{card}] SUMMARY train {train_s:.0f} s, val mean F1 {result.report['mean_f1']:.4f}; predict {n}: "
      f"GPU decode {n / gpu_s:.0f} rows/s vs PIL {n / pil_s:.0f} rows/s ({pil_s / gpu_s:.2f}x)")
PYEOF
