"""How close is prediction to what the CPU allows, and how much faster than eager PyTorch, over the same model?

    python benchmarks/predict_speed.py --model MODEL_DIR --data DIR [--csv FILE] --rows 1000

Both runs go through the one prediction path, ``runtime.Predictor`` (the same photo reading,
chunks, fusion and thresholds as ``fuselabel predict``); only the engine differs:

(a) ``FuseLabel.from_pretrained(MODEL, exported=True)``: the model's exported ONNX copy (what
    ``fuselabel predict`` runs on a CPU, int8 encoders where the model has them);
(b) ``FuseLabel.from_pretrained(MODEL, feature_engine="torch")``: encoders and heads in eager PyTorch.

Both timings include loading the model. The limit is what the CPU allows: the usable cores over the CPU
seconds a row of every stage, each timed alone on one thread (``predict_limit.stages``). Prints rows/s of
both against the limit, and the share of rows whose label sets agree, ending with a line
``LIMIT 99.6 rows/s; exported 91.0 (91 %), eager 12.0 (12 %); agreement 99.8%``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_limit import engine_of, stages

from fuselabel import FuseLabel
from fuselabel.encoding import usable_cores
from fuselabel.labels import matrix_to_labels
from fuselabel.records import read_records, resolve_data
from fuselabel.runtime import Prediction
from fuselabel.writers import write_submission


def timed_predict(model_dir, engine: str, records, image_dir, *, cache_dir=None, workers=None):
    """Load the model, build the engine and predict ``records`` chunk by chunk: (prediction, seconds, engine name)."""
    t0 = time.time()
    if engine == "onnx":
        model = FuseLabel.from_pretrained(model_dir, exported=True, cache_dir=cache_dir, num_workers=workers)
    else:
        model = FuseLabel.from_pretrained(model_dir, feature_engine="torch", cache_dir=cache_dir, num_workers=workers)
    predictor = model.predictor()
    chunks = list(predictor.iter_predict(((r.image_id, r.caption) for r in records), image_dir=image_dir))
    return Prediction.concat(chunks), time.time() - t0, predictor.engine.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="image folder, or a folder with data/ and train.csv")
    parser.add_argument("--csv", help="CSV (default DATA/train.csv)")
    parser.add_argument("--rows", type=int, default=200, help="first N rows of the CSV")
    parser.add_argument("--num-workers", type=int, help="threads reading photos (default: up to 8 cores)")
    parser.add_argument("--cache-dir", help="where the exported encoder graphs are kept (default ~/.cache/fuselabel)")
    parser.add_argument("--keep", help="write the two submissions into this folder")
    args = parser.parse_args(argv)

    images, csv_path = resolve_data(args.data, args.csv)
    records = read_records(csv_path).records[: args.rows]
    n = len(records)
    print(
        f"model {args.model}; {n} rows of {csv_path}; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPU cores"
    )
    common = dict(cache_dir=args.cache_dir, workers=args.num_workers)
    image_dir = images if (Path(images) / records[0].image_id).exists() else Path(args.data)

    t = time.time()
    timed_predict(args.model, "onnx", records[:4], image_dir, **common)
    print(f"warm-up (one-off ONNX exports, cached by weights digest): {time.time() - t:.1f}s")

    fast, fast_s, fast_name = timed_predict(args.model, "onnx", records, image_dir, **common)
    print(f"(a) Predictor, {fast_name}: {fast_s:.1f}s -> {n / fast_s:.1f} samples/s")
    eager, eager_s, eager_name = timed_predict(args.model, "torch", records, image_dir, **common)
    print(f"(b) Predictor, {eager_name}: {eager_s:.1f}s -> {n / eager_s:.1f} samples/s")

    known = ~np.isnan(eager.probs).any(1)
    print(f"max |p_onnx - p_torch| = {np.abs(fast.probs[known] - eager.probs[known]).max(initial=0.0):.2e}")
    agreement = (fast.predicted == eager.predicted).all(1).mean() if n else float("nan")
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        labels, ids = FuseLabel.from_pretrained(args.model).labels_, [r.image_id for r in records]
        for name, pred in (("onnx", fast), ("torch", eager)):
            write_submission(keep / f"{name}_submission.csv", ids, matrix_to_labels(pred.predicted, labels))
        print(f"submissions kept in {keep}")
    engine, predictor = engine_of(args.model)
    per_row = sum(stages(engine, predictor, records, image_dir).values())
    limit = usable_cores() / per_row
    print(f"limit: {usable_cores()} cores / {1e3 * per_row:.1f} ms CPU a row (every stage alone on one thread)")
    print(f"RATIO exported/eager = {eager_s / fast_s:.1f}x")
    print(
        f"LIMIT {limit:.1f} rows/s; exported {n / fast_s:.1f} ({100 * n / fast_s / limit:.0f} %), eager "
        f"{n / eager_s:.1f} ({100 * n / eager_s / limit:.0f} %); agreement {100 * agreement:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
