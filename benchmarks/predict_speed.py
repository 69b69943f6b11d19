"""How much faster is ``fuselabel predict`` than a plain eager PyTorch loop over the same model?

    python benchmarks/predict_speed.py --model MODEL_DIR --data DIR [--csv FILE] --rows 200

(a) ``fuselabel.predict.predict``, end to end: model folder + CSV + images -> submission CSV
    (encoders over all rows, images through onnxruntime on a CPU, then the head).
(b) A plain eager-PyTorch baseline: load the model folder, then for each batch of 32 rows decode
    and transform every image with PIL, tokenise the captions and call ``net(batch)`` on pixels
    and tokens (no ONNX, no feature caching, no DataLoader workers); same thresholds.

Both timings include loading the model folder. The one-off ONNX exports that (a) caches per
weights digest are done by an untimed warm-up on a few rows and reported separately. Prints
samples/s of both, the ratio and the share of rows whose label sets agree, ending with a line
``RATIO predict/eager = 6.3x, agreement 99.8%``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def read_submission(path: Path) -> dict[str, frozenset]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return {row[0]: frozenset(row[1].split()) for row in reader}


@torch.inference_mode()
def eager_baseline(model_dir: Path, images: Path, csv_path: Path, out: Path, batch_size: int = 32) -> dict:
    """Load the folder, then PIL decode + transform per image and ``net(batch)`` per batch; writes a submission."""
    from fuselabel.bundle import load_bundle
    from fuselabel.data import build_transform, load_rgb
    from fuselabel.predict import decide
    from fuselabel.labels import matrix_to_labels
    from fuselabel.records import read_records
    from fuselabel.writers import write_submission

    t0 = time.time()
    bundle = load_bundle(model_dir)
    net, cfg = bundle.net.eval(), bundle.config
    records = read_records(csv_path).records
    transform = build_transform(bundle.preprocessing, train=False) if net.image_encoder is not None else None
    probs = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = {}
        if transform is not None:
            batch["pixels"] = torch.stack([transform(load_rgb(images / r.image_id)) for r in chunk])
            batch["image_present"] = torch.ones(len(chunk))
            if cfg.tta_flip:  # what the model was tuned with: features averaged over the flipped image
                x = batch.pop("pixels")
                batch["image_feat"] = (net.image_encoder(x) + net.image_encoder(x.flip(-1))) / 2
        if bundle.tokenizer is not None:
            tok = bundle.tokenizer([r.caption for r in chunk], padding=True, truncation=True,
                                   max_length=cfg.text_max_length, return_tensors="pt")
            batch["input_ids"], batch["attention_mask"] = tok["input_ids"], tok["attention_mask"]
        logits = net(batch)
        probs.append(net.probabilities(logits, batch.get("image_present")).numpy())
    pred = decide(bundle, np.concatenate(probs))
    write_submission(out, [r.image_id for r in records], matrix_to_labels(pred, bundle.labels))
    return {"rows": len(records), "seconds": time.time() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="image folder, or a folder with data/ and train.csv")
    parser.add_argument("--csv", help="CSV (default DATA/train.csv)")
    parser.add_argument("--rows", type=int, default=200, help="first N rows of the CSV")
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "onnx"), help="for predict")
    parser.add_argument("--batch-size", type=int, help="predict's image batch size (default: predict's own)")
    parser.add_argument("--eager-batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, help="predict's DataLoader workers (default: CPU cores)")
    parser.add_argument("--keep", help="keep the two submissions in this folder")
    args = parser.parse_args(argv)

    from fuselabel.records import resolve_data
    from fuselabel.predict import predict
    from fuselabel.records import read_records
    from fuselabel.writers import write_rows

    images, csv_path = resolve_data(args.data, args.csv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="predict-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    rows_csv = work / "rows.csv"
    all_rows = read_records(csv_path)
    n = write_rows(all_rows, range(min(args.rows, len(all_rows))), rows_csv)
    warm_csv = work / "warm.csv"
    write_rows(all_rows, range(min(4, n)), warm_csv)
    print(f"model {args.model}; {n} rows of {csv_path}; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPU cores")

    common = dict(engine=args.engine, batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
    t = time.time()
    predict(args.model, images, warm_csv, work / "warm_submission.csv", **common)
    print(f"warm-up (one-off ONNX exports, cached by weights digest): {time.time() - t:.1f}s")

    t = time.time()
    result = predict(args.model, images, rows_csv, work / "predict_submission.csv", **common)
    predict_s = time.time() - t
    print(f"(a) fuselabel.predict.predict (engine {args.engine}): {predict_s:.1f}s incl. {result['load_s']:.1f}s "
          f"loading -> {n / predict_s:.1f} samples/s")

    t = time.time()
    eager_baseline(Path(args.model), images, rows_csv, work / "eager_submission.csv", args.eager_batch_size)
    eager_s = time.time() - t
    print(f"(b) eager PyTorch loop (PIL + transform per image, net(batch) per {args.eager_batch_size}): "
          f"{eager_s:.1f}s -> {n / eager_s:.1f} samples/s")

    a, b = read_submission(work / "predict_submission.csv"), read_submission(work / "eager_submission.csv")
    agreement = np.mean([a[k] == b.get(k) for k in a]) if a else float("nan")
    if args.keep:
        print(f"submissions kept in {work}")
    print(f"RATIO predict/eager = {eager_s / predict_s:.1f}x, agreement {100 * agreement:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
