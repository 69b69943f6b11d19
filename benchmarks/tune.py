#!/usr/bin/env python
"""Tuning benchmark: the default model and `fuselabel tune`'s best, both scored on rows no tuning has touched.

A search picks settings by their validation mean F1, so its best validation figure flatters more than a
single training's. As in `benchmarks/heldout.py`, a stratified share of the table (default 10 %) is set
aside byte for byte as released; the default trains on the rest, `fuselabel tune` searches on the same
rest (the same validation split inside it, the default as its first trial) within the stated budget, and
both models are scored on the untouched rows.

    python benchmarks/tune.py --data DATA --trials 40 --timeout 3600 --cache-dir CACHE
    python benchmarks/tune.py --data DATA --rows 600 --trials 3           # a quick check of the script

Ends with lines `HELDOUT default mean F1 = ...` and `HELDOUT tuned mean F1 = ...` (with their validation
figures and the search's budget and trial counts).
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
from fuselabel.config import TuneSettings, build_config
from fuselabel.data import stratified_split
from fuselabel.estimator import FuseLabel
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.records import read_records, resolve_data
from fuselabel.train import fit
from fuselabel.tune import search
from fuselabel.writers import write_rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    ap.add_argument("--csv")
    ap.add_argument("--rows", type=int, help="use a random subset of this many rows (a quick check)")
    ap.add_argument("--trials", type=int, default=40, help="trials of the search, the default's included")
    ap.add_argument("--timeout", type=float, help="seconds the search may take (default: no limit)")
    ap.add_argument(
        "--preset",
        default="default",
        help="the settings the default trains with and the search starts from ('default': no preset)",
    )
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--split-seed", type=int, default=2026)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", help="keep models and write results.json here (default: a temporary folder)")
    ap.add_argument("--set", action="append", type=_kv, default=[], metavar="KEY=VALUE")
    return ap


def _split(args, out: Path) -> tuple[Path, Path, Path]:
    """(image folder, development table, held-out table), the tables written byte for byte under ``out``."""
    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv)
    rows = np.arange(len(records))
    if args.rows and args.rows < len(rows):
        rows = np.sort(np.random.default_rng(args.split_seed).choice(rows, args.rows, replace=False))
    y = labels_to_matrix([records.label_sets[i] for i in rows], label_vocabulary(records.label_sets))
    dev, held = stratified_split(y, args.holdout, args.split_seed)
    write_rows(records, rows[dev], out / "dev.csv")
    write_rows(records, rows[held], out / "heldout.csv")
    print(f"{len(dev)} development rows, {len(held)} held-out rows")
    return images, out / "dev.csv", out / "heldout.csv"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fuselabel-tune-"))
    out.mkdir(parents=True, exist_ok=True)
    images, dev_csv, held_csv = _split(args, out)
    overrides = dict(args.set)
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    config = build_config(None if args.preset == "default" else args.preset, **overrides)
    runtime = {"cache_dir": args.cache_dir} if args.cache_dir else {}

    t0 = time.time()
    default = fit(config, images, dev_csv, out / "default", progress=False)
    default_s = time.time() - t0
    t1 = time.time()
    tuned = search(config, images, dev_csv, out / "tuned", TuneSettings(trials=args.trials, timeout=args.timeout))
    tune_s = time.time() - t1

    results = {
        "rows": {"development": len(read_records(dev_csv)), "heldout": len(read_records(held_csv))},
        "budget": {"trials": args.trials, "timeout_s": args.timeout},
        "trials": tuned.trials,
        "best_settings": tuned.best_settings,
        "default": {"val_mean_f1": default.report["mean_f1"], "seconds": default_s},
        "tuned": {"val_mean_f1": tuned.model_value, "search_best_val_mean_f1": tuned.best_value, "seconds": tune_s},
    }
    for name in ("default", "tuned"):
        model = FuseLabel.from_pretrained(out / name, **runtime)
        results[name]["heldout_mean_f1"] = model.evaluate(held_csv, images=images)["mean_f1"]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    print()
    for name in ("default", "tuned"):
        r = results[name]
        print(
            f"HELDOUT {name} mean F1 = {r['heldout_mean_f1']:.4f} (validation {r['val_mean_f1']:.4f}, "
            f"{r['seconds']:.0f} s)"
        )
    budget = f"{args.trials} trials" + (f" or {args.timeout:g} s" if args.timeout else "")
    print(
        f"search: {budget}; {tuned.trials['complete']} complete, {tuned.trials['pruned']} pruned; best settings "
        f"{json.dumps(tuned.best_settings, default=str)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
