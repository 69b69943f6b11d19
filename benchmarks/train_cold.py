#!/usr/bin/env python
"""Cold start to a trained model: `fuselabel train` from an empty cache, each stage against what the CPU allows.

    python benchmarks/train_cold.py --data DATA [--preset NAME] [--set KEY=VALUE ...] [--sample 300]

Runs the README's command, ``fuselabel train --data DATA --out MODEL``, as a fresh process with an empty feature
cache (``--cache-dir`` a new folder), and times it whole. The run records the seconds of each of its stages
(``metrics.json``: decoding photos, the image encoder, the text encoder, training the heads, calibrating, saving).
Then, on ``--sample`` of the same rows, it measures the CPU seconds a row of decoding, the image encoder and the
text encoder, each alone on one thread, with the trained model's own engine (``predict_limit.stages``). Rows are
independent, so a stage's limit over R rows on N cores is R x its CPU seconds a row / N. Ends with the line
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

from fuselabel.records import resolve_data
from fuselabel.runtime import usable_cores
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
    limits = {
        "decode_s": n * (per_row["decode and resize"]) / cores,
        "image_encoder_s": n * (per_row["uint8 -> float"] + per_row["image encoder"]) / cores,
        "text_encoder_s": n * per_row["text encoder"] / cores,
    }
    print(f"{'stage':18s} {'seconds':>8s} {'limit':>8s} {'share':>6s}")
    for stage in ("decode_s", "image_encoder_s", "text_encoder_s", "train_s", "calibrate_s", "save_s"):
        seconds = timings.get(stage)
        limit = limits.get(stage)
        shown = "-" if seconds is None else f"{seconds:8.1f}"
        share = f"{100 * limit / seconds:5.0f}%" if limit and seconds else "     -"
        print(f"{stage:18s} {shown:>8s} {'-' if limit is None else f'{limit:8.1f}':>8s} {share}")
    features = sum(timings.get(k, 0.0) for k in limits)
    print(
        f"features: {features:.1f} s against a limit of {sum(limits.values()):.1f} s "
        f"({100 * sum(limits.values()) / max(features, 1e-9):.0f} % of the CPU's limit)"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    val_f1 = metrics.get("validation", {}).get("mean_f1", float("nan"))
    verdict = "met" if wall <= TARGET_S else "missed"
    print(f"COLD total {wall:.0f} s for {n} rows (validation mean F1 {val_f1:.4f}; target {TARGET_S:.0f} s {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
