"""Prediction at scale: peak memory and throughput of ``fuselabel predict`` on a large CSV against a small one.

Builds a synthetic test set of ``--rows`` rows (default 200,000) that repeats the course photos under
new ids (symbolic links in a scratch folder) with their captions, then runs ``fuselabel predict`` in a
fresh process on the first ``--small`` rows (default 2,000) and on all of them, and prints each run's
peak resident memory (the kernel's maximum RSS of the process) and rows per second. It also checks
that streaming changes nothing: the small run's output equals a run of the small CSV in a single
chunk byte for byte, and its probabilities equal the big run's on the same leading rows.

    python benchmarks/predict_scale.py --model MODEL --data ../shared/data/comp5329 [--rows 200000]

``--caption-only`` leaves the photos out (no links: every row is predicted from its caption), which is how a
million rows are measured against ten thousand without a million links (the table is streamed: only the checking
pass keeps something a row, a 12-byte slot per id to find duplicates, and it ends before the model runs):

    python benchmarks/predict_scale.py --model MODEL --data ../shared/data/comp5329 --caption-only \
        --rows 1000000 --small 10000

``--reader`` measures the table reader alone, without a model: the peak memory of reading the built table
whole (``read_table``) and a batch at a time (``iter_table``, as ``predict`` streams it), on both sizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuselabel.records import read_records, resolve_data


def build(data: Path, csv: Path, rows: int, folder: Path, photos: bool = True) -> Path:
    """``rows`` rows cycling through the labelled ones; photo ``i.jpg`` links to the source photo (no photo at
    all without ``photos``)."""
    source = read_records(csv).records
    images = folder / "data"
    images.mkdir(parents=True)
    with open(folder / "test.csv", "w", encoding="utf-8", newline="") as f:
        f.write("ImageID,Caption\n")
        for i in range(rows):
            rec = source[i % len(source)]
            if photos:
                os.symlink((data / rec.image_id).resolve(), images / f"{i}.jpg")
            f.write(f'{i}.jpg,"{rec.caption}"\n')
    return folder / "test.csv"


def head(csv: Path, rows: int, out: Path) -> Path:
    with open(csv, encoding="utf-8") as src, open(out, "w", encoding="utf-8", newline="") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    return out


# VmHWM belongs to the reading process alone (ru_maxrss would start at this forking process's).
_READ = """
import sys
from pathlib import Path
from fuselabel.tables import iter_table, read_table
rows = len(read_table(sys.argv[1])) if sys.argv[2] == "whole" else sum(len(b) for b in iter_table(sys.argv[1]))
status = Path("/proc/self/status").read_text().splitlines()
print(rows, int(next(x for x in status if x.startswith("VmHWM:")).split()[1]) / 1024)
"""


def read_peak(csv: Path, mode: str) -> dict:
    """The table reader alone in its own process: rows read and peak RSS (MB)."""
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _READ, str(csv), mode], capture_output=True, text=True, check=True)
    rows, peak = done.stdout.split()
    return {"rows": int(rows), "peak_rss_mb": float(peak), "seconds": time.time() - start}


def reader_report(big_csv: Path, small_csv: Path) -> None:
    print(f"{'reader':>7} {'rows':>9} {'seconds':>9} {'peak RSS MB':>12}")
    for mode in ("whole", "stream"):
        for csv in (small_csv, big_csv):
            r = read_peak(csv, mode)
            print(f"{mode:>7} {r['rows']:>9} {r['seconds']:>9.1f} {r['peak_rss_mb']:>12.0f}")


def run(model: str, images: Path, csv: Path, out: Path, *extra: str) -> dict:
    """One ``fuselabel predict`` in its own process: wall seconds and peak RSS (the kernel's ru_maxrss)."""
    cmd = [
        sys.executable,
        "-m",
        "fuselabel.cli",
        "predict",
        model,
        "--data",
        str(images),
        "--csv",
        str(csv),
        "--out",
        str(out),
        "--proba",
        str(out.with_suffix(".proba.csv")),
        "--quiet",
        *extra,
    ]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or exported ONNX folder (not needed with --reader)")
    ap.add_argument("--data", required=True, help="the course data folder (train.csv and data/)")
    ap.add_argument("--csv", help="labelled CSV whose photos and captions are repeated (default DATA/train.csv)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--caption-only", action="store_true", help="rows without photos: predicted from captions")
    ap.add_argument("--reader", action="store_true", help="measure the table reader alone (no model)")
    args = ap.parse_args()
    if not args.model and not args.reader:
        ap.error("--model is needed unless --reader is given")
    images, csv = resolve_data(args.data, args.csv)
    with tempfile.TemporaryDirectory(prefix="predict-scale-", dir=args.work) as tmp:
        tmp = Path(tmp)
        big_csv = build(images, csv, args.rows, tmp / "set", photos=not args.caption_only)
        small_csv = head(big_csv, args.small, tmp / "small.csv")
        if args.reader:
            reader_report(big_csv, small_csv)
            return
        one_chunk = str(-(-args.small // 64) * 64)
        # The first run may also build the engine's cached graph: the single-chunk one, which is not compared.
        whole = run(args.model, tmp / "set" / "data", small_csv, tmp / "whole.out.csv", "--chunk-size", one_chunk)
        small = run(args.model, tmp / "set" / "data", small_csv, tmp / "small.out.csv")
        big = run(args.model, tmp / "set" / "data", big_csv, tmp / "big.out.csv")
        # Rows are computed in windows of 64; the small CSV's last window may be partial, the big one's is not.
        full = args.small // 64 * 64 + 1
        same_prefix = (tmp / "big.out.proba.csv").read_text().splitlines()[:full] == (
            tmp / "small.out.proba.csv"
        ).read_text().splitlines()[:full]
        same_whole = (tmp / "small.out.csv").read_bytes() == (tmp / "whole.out.csv").read_bytes() and (
            tmp / "small.out.proba.csv"
        ).read_bytes() == (tmp / "whole.out.proba.csv").read_bytes()
    print(f"model {args.model}")
    print(f"{'rows':>8} {'seconds':>9} {'rows/s':>8} {'peak RSS MB':>12}")
    for n, r in ((args.small, whole), (args.small, small), (args.rows, big)):
        print(f"{n:>8} {r['seconds']:>9.1f} {n / r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f}")
    # Against the small run with the same chunks (a single chunk of all the rows holds more at once).
    base = small["peak_rss_mb"]
    print(f"peak memory ratio {args.rows} / {args.small} rows: {big['peak_rss_mb'] / base:.2f}")
    # the table is streamed: the chunks' pass holds nothing a row (the checking pass's ids are gone by then)
    print(f"peak memory growth {args.rows} over {args.small} rows: {big['peak_rss_mb'] - base:+.1f} MB")
    print(
        f"small run equals the big run's first {full - 1} rows: {same_prefix}; "
        f"equals a single-chunk run byte for byte: {same_whole}"
    )
    print(big["stdout"])


if __name__ == "__main__":
    main()
