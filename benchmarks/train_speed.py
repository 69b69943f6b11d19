#!/usr/bin/env python
"""Time to a given validation F1: the default CPU training against an eager-PyTorch baseline, in one run.

Both runs train the same default model (frozen features, late fusion) on the same rows from an
empty feature cache; they differ only in the runtime that computes the frozen features:
``feature_engine=onnx`` (the default on a CPU) against ``feature_engine=torch`` (eager PyTorch).
For each it prints the seconds from the start of ``fit`` to the first validation epoch whose
mean F1 (tuned global threshold) reaches ``--target``, the feature-extraction seconds, the
whole run, and the best F1; the last line is the ratio.

    python benchmarks/train_speed.py --data DATA --rows 3000 --target 0.80
    python benchmarks/train_speed.py --data DATA --rows 20000 --target 0.87   # the full data: about an hour on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fuselabel.cli import _kv
from fuselabel.config import build_config
from fuselabel.records import read_records, resolve_data
from fuselabel.train import fit
from fuselabel.writers import write_rows


def time_to(history: list[dict], target: float) -> float | None:
    return next((h["seconds"] for h in history if h["val_f1"] >= target), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    ap.add_argument("--csv")
    ap.add_argument("--rows", type=int, default=3000, help="first N rows of the CSV (0 = all)")
    ap.add_argument("--target", type=float, default=0.80, help="validation mean F1 to reach")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", type=_kv, default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv)
    work = Path(tempfile.mkdtemp(prefix="fuselabel-train-speed-"))
    if args.rows:
        sub = work / "rows.csv"
        write_rows(records, range(min(args.rows, len(records))), sub)
        csv = sub
    results = {}
    for engine in ("onnx", "torch"):
        config = build_config(
            args.preset, **dict(args.set), feature_engine=engine, cache_dir=str(work / f"cache-{engine}")
        )  # empty cache: extraction is timed
        t0 = time.time()
        result = fit(config, images, csv, work / f"model-{engine}", progress=False)
        total = time.time() - t0
        reached = time_to(result.history, args.target)
        results[engine] = (reached, result, total)
        best = max(h["val_f1"] for h in result.history)
        print(
            f"{engine:5s}: features {result.timings['features_s']:.1f}s, to F1 {args.target}: "
            f"{'never' if reached is None else f'{reached:.1f}s'}, whole run {total:.1f}s, best val F1 {best:.4f}"
        )
    fast, slow = results["onnx"][0], results["torch"][0]
    if fast and slow:
        print(f"RATIO time to F1 {args.target}: eager/onnx = {slow / fast:.2f}x ({slow:.1f}s vs {fast:.1f}s)")
    else:
        print(f"RATIO unavailable: a run did not reach F1 {args.target} (lower --target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
