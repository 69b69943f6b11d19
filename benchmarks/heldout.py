#!/usr/bin/env python
"""Held-out benchmark: train presets on part of the data, score them on rows no tuning has touched.

A model's validation figure is tuned on its validation rows (early stopping, fusion weight,
thresholds), so it flatters. This benchmark first sets aside a stratified share of the CSV
(default 10 %), byte for byte as released; each preset trains on the rest (with its own validation
split inside it), then the untouched rows are scored. The baseline, in the same run
and on the same rows, answers every row with the most frequent training label ("person").

    python benchmarks/heldout.py --data DATA                              # the default model
    python benchmarks/heldout.py --data DATA --preset default cpu         # ... and the fp32 one
    python benchmarks/heldout.py --data DATA --preset cpu cpu-best --out runs/heldout
    python benchmarks/heldout.py --data DATA --preset cpu --set kind=early --set decoder=query

Prints one block per preset and ends with lines `HELDOUT <preset> mean F1 = ... (validation ...,
train ... s); baseline = ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fuselabel.cli import _kv
from fuselabel.config import build_config
from fuselabel.data import stratified_split
from fuselabel.estimator import FuseLabel
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.metrics import evaluate as evaluate_sets
from fuselabel.metrics import mean_f1
from fuselabel.records import read_records, resolve_data
from fuselabel.runtime import Prediction
from fuselabel.thresholds import apply_thresholds
from fuselabel.train import fit
from fuselabel.writers import write_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    ap.add_argument("--csv")
    ap.add_argument("--preset", nargs="+", default=["default"], help="presets to train ('default': no preset)")
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--split-seed", type=int, default=2026)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", help="keep models and write results.json here (default: a temporary folder)")
    ap.add_argument("--set", action="append", type=_kv, default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv)
    vocab = label_vocabulary(records.label_sets)
    y = labels_to_matrix(records.label_sets, vocab)
    dev_idx, test_idx = stratified_split(y, args.holdout, args.split_seed)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fuselabel-heldout-"))
    out.mkdir(parents=True, exist_ok=True)
    dev_csv, test_csv = out / "dev.csv", out / "heldout.csv"
    write_rows(records, dev_idx, dev_csv)
    write_rows(records, test_idx, test_csv)

    top = y[dev_idx].sum(0).argmax()
    baseline_pred = np.zeros_like(y[test_idx])
    baseline_pred[:, top] = 1
    baseline = mean_f1(y[test_idx], baseline_pred)
    print(
        f"{len(dev_idx)} development rows, {len(test_idx)} held-out rows; baseline (always label "
        f"{vocab[top]}) held-out mean F1 = {baseline:.4f}"
    )

    results = []
    runtime = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    for preset in args.preset:
        overrides = dict(args.set)
        if args.cache_dir:
            overrides["cache_dir"] = args.cache_dir
        config = build_config(None if preset == "default" else preset, **overrides)
        t0 = time.time()
        result = fit(config, images, dev_csv, out / f"model-{preset}", progress=False)
        train_s = time.time() - t0
        t1 = time.time()
        model = FuseLabel.from_pretrained(out / f"model-{preset}", **runtime)
        bundle = model.bundle_
        held = read_records(test_csv)
        rows = ((r.image_id, r.caption) for r in held.records)
        pred = Prediction.concat(list(model.predictor().iter_predict(rows, image_dir=images)))
        probs = pred.probs
        eval_s = time.time() - t1
        truth = labels_to_matrix(held.label_sets, bundle.labels)
        report = evaluate_sets(truth, pred.predicted, bundle.labels)
        # Every rule tuned on validation, scored on the untouched rows: which tuning holds up.
        by_method = {
            m: mean_f1(truth, apply_thresholds(probs, np.asarray(alt["thresholds"])))
            for m, alt in bundle.thresholds["alternatives"].items()
        }
        row = {
            "preset": preset,
            "settings": overrides,
            "heldout_mean_f1": report["mean_f1"],
            "heldout_micro_f1": report["micro_f1"],
            "heldout_macro_f1": report["macro_f1"],
            "heldout_by_threshold_method": by_method,
            "val_mean_f1": result.report["mean_f1"],
            "val_alternatives": {k: v["val_mean_f1"] for k, v in result.thresholds["alternatives"].items()},
            "train_s": train_s,
            "timings": result.timings,
            "predict_heldout_s": eval_s,
            "model_mb": result.size_bytes / 1e6,
            "baseline_mean_f1": baseline,
        }
        results.append(row)
        print(json.dumps(row, indent=2))
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    for r in results:
        print(
            f"HELDOUT {r['preset']} mean F1 = {r['heldout_mean_f1']:.4f} (validation {r['val_mean_f1']:.4f}, "
            f"train {r['train_s']:.0f} s, {r['model_mb']:.1f} MB); baseline = {r['baseline_mean_f1']:.4f} "
            f"(+{r['heldout_mean_f1'] - r['baseline_mean_f1']:.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
