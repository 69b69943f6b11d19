#!/usr/bin/env python
"""Photos a second of a model's image encoder in onnxruntime, by photos a run, with every core running it.

    python benchmarks/image_batch.py --model MODEL_DIR --data DIR [--csv TABLE] [--photos 256] [--batches 1 2 4 8 16 32]

Runs the model's exported copy (made once, before timing) as ``fuselabel predict`` does: one single-thread session
shared by one worker thread a core, each worker encoding its own share of the photos in runs of N. Every batch size
is timed ``--repeats`` times in turn (1, 2, 4, ..., then again), so a drift of the machine's speed reaches all of
them alike; the figure is the median. Prints one line a size, ``BATCH N: ... photos/s``, and the same encoder's
features compared across the sizes (a photo's features must not depend on the photos beside it).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_limit import engine_of

from fuselabel.encoding import read_photos_uint8, usable_cores
from fuselabel.images import normalise, pixel_table
from fuselabel.records import read_records, resolve_data


def encode(engine, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([engine.image_features(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--csv")
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv).records[: args.photos]
    engine, _ = engine_of(args.model)
    pixels, _ = read_photos_uint8([r.image_id for r in records], images, engine.data_config, workers=1)
    x = normalise(np.stack([p for p in pixels if p is not None]), pixel_table(engine.data_config))
    cores = usable_cores()
    shares = np.array_split(x, cores)
    print(f"{len(x)} photos of {csv}, {cores} cores, one single-thread session a worker; {engine.name}")
    encode(engine, x[:32], 32)  # the session's first run sets up its memory: not timed
    rates: dict[int, list[float]] = {b: [] for b in args.batches}
    features: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(args.repeats):
            for batch in args.batches:
                t0 = time.perf_counter()
                out = list(pool.map(lambda share, b=batch: encode(engine, share, b), shares))
                rates[batch].append(len(x) / (time.perf_counter() - t0))
                features[batch] = np.concatenate(out)
    first = args.batches[0]
    for batch in args.batches:
        same = np.array_equal(features[batch], features[first])
        print(
            f"BATCH {batch}: {np.median(rates[batch]):.1f} photos/s (runs {', '.join(f'{r:.1f}' for r in rates[batch])});"
            f" features identical to batch {first}'s: {same}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
