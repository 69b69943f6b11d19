"""A prediction killed near its end, and its rerun: how much of the work the rerun keeps.

Runs ``fuselabel predict`` on ROWS course rows three times in one go: once whole (the baseline), once killed
(SIGKILL) after KILL_AT of its chunks were written, then the same command again, which reuses the finished
chunks. Prints the seconds of each, the rerun's share of the baseline, whether the outputs are byte for byte the
baseline's, and what was left beside the outputs.

    python benchmarks/predict_resume.py --model MODEL --data DATA [--rows 4096] [--chunk-size 256] [--kill-at 0.9]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuselabel.records import read_records
from fuselabel.writers import write_rows


def predict(model, data, table, out, proba, chunk_size, pause=None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "FUSELABEL_TEST_PAUSE_AT"}
    if pause:
        env["FUSELABEL_TEST_PAUSE_AT"] = pause
    cmd = [
        sys.executable,
        str(Path(__file__).parents[1] / "tests" / "pausing.py"),  # stops at the pause point asked for
        "-m",
        "fuselabel.cli",
        "predict",
        str(model),
        "--data",
        str(data),
        "--csv",
        str(table),
        "--out",
        str(out),
        "--proba",
        str(proba),
        "--chunk-size",
        str(chunk_size),
        "--quiet",
    ]
    t0 = time.time()
    if not pause:
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.time() - t0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while "paused at" not in proc.stderr.readline():
        if proc.poll() is not None:
            sys.exit("the run ended before it was killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="course data folder (train.csv, data/)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--kill-at", type=float, default=0.9, help="share of the chunks written before the kill")
    args = p.parse_args()
    data = Path(args.data)
    records = read_records(data / "train.csv")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_rows(records, range(min(args.rows, len(records))), tmp / "rows.csv")
        chunks = -(-min(args.rows, len(records)) // args.chunk_size)
        kill_after = max(1, int(chunks * args.kill_at))
        whole = predict(args.model, data, tmp / "rows.csv", tmp / "whole.csv", tmp / "whole-p.csv", args.chunk_size)
        killed = predict(
            args.model,
            data,
            tmp / "rows.csv",
            tmp / "sub.csv",
            tmp / "sub-p.csv",
            args.chunk_size,
            pause=f"predict-chunk:{kill_after}",
        )
        rerun = predict(args.model, data, tmp / "rows.csv", tmp / "sub.csv", tmp / "sub-p.csv", args.chunk_size)
        same = (tmp / "sub.csv").read_bytes() == (tmp / "whole.csv").read_bytes() and (
            tmp / "sub-p.csv"
        ).read_bytes() == (tmp / "whole-p.csv").read_bytes()
        left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("."))
    print(f"{'run':<34} {'seconds':>8}")
    print(f"{'whole (baseline)':<34} {whole:>8.1f}")
    print(f"{f'killed after {kill_after} of {chunks} chunks':<34} {killed:>8.1f}")
    print(f"{'rerun':<34} {rerun:>8.1f}   {rerun / whole:.0%} of the baseline")
    print(f"outputs byte for byte the baseline's: {same}; left beside them: {left or 'nothing'}")


if __name__ == "__main__":
    main()
