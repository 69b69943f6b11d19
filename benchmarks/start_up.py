"""How long does a command take to start, and its onnxruntime sessions to build?

    python benchmarks/start_up.py --model MODEL_DIR --data DIR --csv ROWS.csv [--runs 8] [--baseline-src OLD/src]

Two measurements, each a fresh process a run, alternating so that the machine's drift falls on both sides alike:

- ``SESSIONS``: the model's three onnxruntime sessions (image encoder, text encoder, heads) built side by side, as
  ``fuselabel predict`` builds them, once from the exported graphs as onnxruntime builds them by default (every
  optimisation at load) and once through ``fuselabel.sessions`` (from the copies optimised once; made before
  anything is timed);
- ``ONE_ROW``: ``fuselabel predict`` on the table's first row, the whole command from launch to exit, from this
  source tree and, with ``--baseline-src``, from another one (an older fuselabel).

Prints the medians and every run.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fuselabel
from fuselabel.export import export_cached
from fuselabel.onnx_folder import MANIFEST, is_onnx_folder
from fuselabel.records import read_records
from fuselabel.writers import write_rows

# A fresh process builds the folder's sessions side by side and prints the seconds it took.
BUILD = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import onnxruntime as ort
folder, how = sys.argv[1], sys.argv[2]
files = [folder + "/" + f["path"] for f in json.load(open(folder + "/{manifest}"))["files"].values()]
if how == "optimised":
    from fuselabel.sessions import session as build
else:
    def build(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
t0 = time.perf_counter()
with ThreadPoolExecutor(len(files)) as pool:
    list(pool.map(build, files))
print(time.perf_counter() - t0)
""".replace("{manifest}", MANIFEST)


def fresh(code_or_args: list[str], env: dict | None = None) -> tuple[float, str]:
    """(wall seconds, standard output) of a fresh Python process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr)
    return wall, done.stdout


def show(name: str, runs: dict[str, list[float]]) -> None:
    parts = [f"{k} {statistics.median(v):.3f} s (runs {', '.join(f'{x:.3f}' for x in v)})" for k, v in runs.items()]
    print(f"{name}: " + "; ".join(parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder or exported ONNX folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--csv", help="table (default DATA/train.csv); its first row is predicted")
    ap.add_argument("--runs", type=int, default=8, help="fresh processes of each kind (alternating)")
    ap.add_argument("--baseline-src", help="another fuselabel's src folder, timed on the same row")
    args = ap.parse_args(argv)

    folder = Path(args.model) if is_onnx_folder(args.model) else export_cached(args.model)
    fresh(["-c", BUILD, str(folder), "optimised"])  # the optimised copies, made once before anything is timed
    sessions: dict[str, list[float]] = {"from the graphs": [], "from the optimised copies": []}
    for _ in range(args.runs):
        for how, key in (("graphs", "from the graphs"), ("optimised", "from the optimised copies")):
            sessions[key].append(float(fresh(["-c", BUILD, str(folder), how])[1]))
    show("SESSIONS", sessions)

    csv = args.csv or str(Path(args.data) / "train.csv")
    work = Path(tempfile.mkdtemp(prefix="fuselabel-start-"))
    one = work / "one.csv"
    write_rows(read_records(csv), [0], one)
    trees = {"this": None} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    for src in [Path(fuselabel.__file__).parent, *([Path(args.baseline_src)] if args.baseline_src else [])]:
        compileall.compile_dir(str(src), quiet=1)  # as an installed package starts
    command = ["-m", "fuselabel.cli", "predict", str(args.model), "--data", args.data, "--csv", str(one)]
    one_row: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, src in trees.items():
            env = dict(os.environ, PYTHONPATH=src) if src else None
            one_row[name].append(fresh([*command, "--out", str(work / f"{name}.csv")], env)[0])
    show("ONE_ROW", one_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
