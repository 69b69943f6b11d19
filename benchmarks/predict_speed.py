"""How much faster is prediction with onnxruntime encoders than with eager PyTorch, over the same model?

    python benchmarks/predict_speed.py --model MODEL_DIR --data DIR [--csv FILE] --rows 200

Both runs go through the one prediction path, ``runtime.Predictor`` (the same photo reading,
chunks, fusion and thresholds as ``fuselabel predict``); only the engine differs:

(a) ``engine_for_bundle(bundle, engine="onnx")``: the encoders in onnxruntime, the heads in
    PyTorch (what ``fuselabel predict`` uses on a CPU);
(b) ``engine_for_bundle(bundle, engine="torch")``: encoders and heads in eager PyTorch.

Both timings include loading the model folder. The one-off ONNX exports that (a) caches per
weights digest are done by an untimed warm-up on a few rows and reported separately. Prints
samples/s of both, the ratio and the share of rows whose label sets agree, ending with a line
``RATIO onnx/torch = 6.3x, agreement 99.8%``.
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

from fuselabel.bundle import load_bundle
from fuselabel.engines import engine_for_bundle
from fuselabel.labels import matrix_to_labels
from fuselabel.records import read_records, resolve_data
from fuselabel.runtime import Prediction, Predictor
from fuselabel.writers import write_submission


def timed_predict(
    model_dir, engine: str, records, image_dir, *, cache_dir=None, batch_size: int = 16, workers: int | None = None
) -> tuple[Prediction, float, str]:
    """Load the folder, build the engine and predict ``records`` chunk by chunk: (prediction, seconds, engine name)."""
    t0 = time.time()
    bundle = load_bundle(model_dir)
    predictor = Predictor(
        engine_for_bundle(bundle, engine=engine, device="cpu", cache_dir=cache_dir),
        bundle.labels,
        bundle.threshold_vector,
        bundle.thresholds.get("ensure_nonempty", True),
        batch_size=batch_size,
        workers=workers,
    )
    chunks = list(predictor.iter_predict(((r.image_id, r.caption) for r in records), image_dir=image_dir))
    return Prediction.concat(chunks), time.time() - t0, predictor.engine.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="image folder, or a folder with data/ and train.csv")
    parser.add_argument("--csv", help="CSV (default DATA/train.csv)")
    parser.add_argument("--rows", type=int, default=200, help="first N rows of the CSV")
    parser.add_argument("--batch-size", type=int, default=16, help="photos per encoder call (divides 64)")
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
    common = dict(cache_dir=args.cache_dir, batch_size=args.batch_size, workers=args.num_workers)

    t = time.time()
    timed_predict(args.model, "onnx", records[:4], images, **common)
    print(f"warm-up (one-off ONNX exports, cached by weights digest): {time.time() - t:.1f}s")

    fast, fast_s, fast_name = timed_predict(args.model, "onnx", records, images, **common)
    print(f"(a) Predictor, {fast_name}: {fast_s:.1f}s -> {n / fast_s:.1f} samples/s")
    eager, eager_s, eager_name = timed_predict(args.model, "torch", records, images, **common)
    print(f"(b) Predictor, {eager_name}: {eager_s:.1f}s -> {n / eager_s:.1f} samples/s")

    known = ~np.isnan(eager.probs).any(1)
    print(f"max |p_onnx - p_torch| = {np.abs(fast.probs[known] - eager.probs[known]).max(initial=0.0):.2e}")
    agreement = (fast.predicted == eager.predicted).all(1).mean() if n else float("nan")
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        labels, ids = load_bundle(args.model).labels, [r.image_id for r in records]
        for name, pred in (("onnx", fast), ("torch", eager)):
            write_submission(keep / f"{name}_submission.csv", ids, matrix_to_labels(pred.predicted, labels))
        print(f"submissions kept in {keep}")
    print(f"RATIO onnx/torch = {eager_s / fast_s:.1f}x, agreement {100 * agreement:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
