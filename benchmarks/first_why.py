"""How soon does a freshly started service answer its first "why"?

    python benchmarks/first_why.py --model MODEL_DIR --data DIR --csv ROWS.csv [--repeats 3]

For each explanation method (``occlusion``, the default, and ``gradients``) launches ``fuselabel serve MODEL
--explain-method M`` with its other defaults, waits for ``/health`` to answer, then does what the page does for
a person in a hurry: one ``/predict`` of a row (photo and caption) and, the moment it answers, one ``/explain``
of that row for the model's first label. Prints the seconds from launch to ``/health``, the seconds of that first
``/explain`` and when it ended (from launch), then a second ``/explain`` of another row (warm). The methods
alternate over ``--repeats`` launches and each figure is a median. Ends with lines ``WHY_<METHOD> ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from predict_limit import launch_service, service_health, why_seconds

from fuselabel.records import read_records, resolve_data

METHODS = ("occlusion", "gradients")


def one_launch(model, method: str, rows, image_dir: Path) -> dict:
    with launch_service(model, "--explain-method", method) as (proc, base, t0):
        service_health(proc, base, t0)
        health = time.perf_counter() - t0
        first = why_seconds(base, rows[0], image_dir)
        ended = time.perf_counter() - t0
        return {
            "health": health,
            "first": first,
            "ended": ended,
            "warm": why_seconds(base, rows[1], image_dir, predict=False),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--data", required=True, help="data folder (its images)")
    ap.add_argument("--csv", required=True, help="rows whose photos and captions to explain (the first two)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    image_dir, csv = resolve_data(args.data, args.csv)
    rows = [r for r in read_records(csv).records if (Path(image_dir) / r.image_id).is_file()][:2]
    if len(rows) < 2:
        raise SystemExit(f"{args.csv}: fewer than two rows with a photo in {image_dir}")
    # The first launch exports the model's ONNX copy into the cache if it is not there yet: not timed.
    one_launch(args.model, "occlusion", rows, Path(image_dir))
    runs = {m: [] for m in METHODS}
    for i in range(args.repeats):
        for method in METHODS if i % 2 == 0 else METHODS[::-1]:
            runs[method].append(one_launch(args.model, method, rows, Path(image_dir)))
            print(method, {k: round(v, 2) for k, v in runs[method][-1].items()}, flush=True)
    for method, got in runs.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        print(
            f"WHY_{method.upper()} /health {med['health']:.2f} s after launch; the first /explain (right after the "
            f"first /predict) {med['first']:.2f} s, answered {med['ended']:.2f} s after launch; warm {med['warm']:.2f}"
            f" s (medians of {len(got)} launches)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
