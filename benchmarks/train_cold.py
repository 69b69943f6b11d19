#!/usr/bin/env python
"""Cold start to a trained model: `fuselabel train` from an empty cache, each stage against what the CPU allows.

    python benchmarks/train_cold.py --data DATA [--preset NAME] [--set KEY=VALUE ...] [--sample 300]

Runs the README's command, ``fuselabel train --data DATA --out MODEL``, as a fresh process with an empty feature
cache (``--cache-dir`` a new folder), and times it whole. The run records the seconds of each of its stages
(``metrics.json``: decoding photos and each encoder as seconds of work summed over the worker threads; the int8
calibration, training the heads, calibrating the decision rule and saving as wall seconds). Then, on ``--sample`` of
the same rows, it measures the seconds a row of decoding, the image encoder and the text encoder, each alone on one
thread, with the trained model's own engine (``predict_limit.stages``), and sets each stage's recorded work beside
that cost over every row. Rows are independent, so the features' limit on N cores is that work over N. Ends with the line
``COLD total ... s`` and the five-minute target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_limit import engine_of, stages

from fuselabel.encoding import usable_cores
from fuselabel.records import resolve_data
from fuselabel.tables import read_table

TARGET_S = 300.0


def train(data: str, csv: str | None, out: Path, cache: Path, preset: str | None, sets: list[str]) -> float:
    """Wall seconds of ``fuselabel train`` in a fresh process, start-up included."""
    args = [sys.executable, "-m", "fuselabel.cli", "train", "--data", data, "--out", str(out), "--quiet"]
    args += ["--cache-dir", str(cache)] + (["--csv", csv] if csv else []) + (["--preset", preset] if preset else [])
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no summary line)")
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the table")
    ap.add_argument("--csv", help="the table (default DATA/train.csv)")
    ap.add_argument("--preset", help="a preset (default: the default settings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sample", type=int, default=300, help="rows whose stages are timed alone")
    ap.add_argument("--out", help="keep the model here (default: a temporary folder)")
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    rows = read_table(csv).records
    work = Path(tempfile.mkdtemp(prefix="fuselabel-cold-"))
    out = Path(args.out) if args.out else work / "model"
    cores = usable_cores()
    load = os.getloadavg()[0]
    print(f"{len(rows)} rows of {csv}; {cores} usable cores, load average {load:.2f} at start; empty cache")
    wall = train(args.data, args.csv, out, work / "cache", args.preset, args.set)
    metrics = json.loads((out / "metrics.json").read_text())
    timings = metrics.get("timings") or metrics.get("run", {}).get("timings") or {}
    config = json.loads((out / "config.json").read_text())
    config = config.get("model", config)
    print(
        f"model: {config.get('image_model')} ({config.get('image_quant')}) + {config.get('text_model')} "
        f"({config.get('text_quant')}), weights {config.get('save_dtype')}"
    )

    engine, predictor = engine_of(out)
    image_dir = images if (Path(images) / rows[0].image_id).exists() else Path(args.data)
    per_row = stages(engine, predictor, rows[: args.sample], image_dir)
    n = len(rows)
    # Seconds of work a stage needs over every row, each row's cost measured alone on one thread
    work = {
        "decode_s": n * per_row["decode and resize"],
        "image_encoder_s": n * (per_row["uint8 -> float"] + per_row["image encoder"]),
        "text_encoder_s": n * per_row["text encoder"],
    }
    print("stage              recorded   alone  share   (seconds of work, summed over the worker threads)")
    for stage, alone in work.items():
        seconds = timings.get(stage, 0.0)
        print(f"{stage:18s} {seconds:8.1f} {alone:7.1f} {100 * alone / max(seconds, 1e-9):5.0f}%")
    print("stage              seconds (wall)")
    for stage in ("int8_calibration_s", "train_s", "calibrate_s", "save_s", "setup_s"):
        print(f"{stage:18s} {timings.get(stage, 0.0):8.1f}")
    limit = sum(work.values()) / cores
    # The int8 calibration runs beside the text encoder (its wall seconds overlap the features'), so the features
    # stage is set against the CPU's limit with the calibration's work left in it.
    features = timings.get("features_s", 0.0)
    print(
        f"features (decode, both encoders and the int8 calibration beside the text encoder): {features:.1f} s wall "
        f"against a limit of {limit:.1f} s for the encoders and decoding alone ({cores} cores: "
        f"{100 * limit / max(features, 1e-9):.0f} % of the CPU's limit)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    val_f1 = metrics.get("validation", {}).get("mean_f1", float("nan"))
    verdict = "met" if wall <= TARGET_S else "missed"
    print(f"COLD total {wall:.0f} s for {n} rows (validation mean F1 {val_f1:.4f}; target {TARGET_S:.0f} s {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
