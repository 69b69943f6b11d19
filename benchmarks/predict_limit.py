"""How close does `fuselabel predict` come to what the CPU allows?

    python benchmarks/predict_limit.py --model MODEL_DIR --data DIR --csv ROWS.csv [--rows 1000]
                                       [--baseline-src OLD_CHECKOUT/src]

Times every stage of prediction alone, in CPU seconds of one thread (so outside load inflates them
little): decoding and the evaluation resize, the uint8 -> float look-up, the image encoder, the text
encoder, heads and fusion. Rows are independent, so the limit is ``cores / CPU seconds a row``. Cores share
caches and memory, so each stage is timed a second way too, on every core at once (``LIMIT_BUSY``): what the CPU
allows when all of it works, which the command can reach and the first limit, on most machines, cannot. Then
runs the whole command (`fuselabel predict`, a fresh process) on the same rows, and on one row, and
the training feature loop (``encoding.encode_images``, decoding and the image encoder) on the same
photos. Prints the limits, the achieved rows/s with and without start-up and the fractions.

The command is run ``--repeats`` times (3) and the stages are measured before the first run and after each, so
every run lies between two measurements of the limits and is compared with their mean: a shared machine's speed
drifts by several per cent within minutes. The headline fraction is the median of the runs' fractions; the figures
are medians. Each source tree is byte-compiled first, so a command starts as an installed package's does.

A model folder runs from its exported copy in the cache, as `fuselabel predict` does (exported once,
before anything is timed). ``--baseline-src`` also runs the command from another source tree (an
older fuselabel) on the same rows in the same run, and says whether its files are byte-identical.
``evaluate`` and ``inspect`` are timed on one row too, ``evaluate`` on all the rows (when the table has labels),
and the service (``fuselabel serve`` with its defaults) from launch to its first answer and over the rows from
one client, in ``/predict/batch`` requests of 32. Ends with lines ``LIMIT ...``, ``LIMIT_BUSY ...``, ``PREDICT ...``,
``ONE_ROW ...``,
``START ...``, ``EVALUATE ...``, ``SERVICE ...``, ``WHY ...``, ``FEATURES ...``.
"""

from __future__ import annotations

import argparse
import base64
import compileall
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import fuselabel
from fuselabel import FuseLabel
from fuselabel.encoding import WINDOW, encode_images, read_photos_uint8, usable_cores
from fuselabel.export import export_cached
from fuselabel.images import normalise, pixel_table
from fuselabel.onnx_folder import is_onnx_folder
from fuselabel.records import read_records, resolve_data
from fuselabel.writers import write_rows


def cpu(fn):
    """(result, CPU seconds of this thread) of ``fn()`` (the sessions run on their caller's thread)."""
    t0 = time.thread_time()
    out = fn()
    return out, time.thread_time() - t0


def stages(engine, predictor, records, image_dir) -> dict:
    """CPU seconds a row of each stage, each alone on one thread, in the batches prediction uses."""
    batch = predictor.batch_size
    n = len(records)
    (pixels, _), decode = cpu(
        lambda: read_photos_uint8([r.image_id for r in records], image_dir, engine.data_config, workers=1)
    )
    table = pixel_table(engine.data_config)
    ok = [p for p in pixels if p is not None]
    lookup = image_s = 0.0
    image_feat = []
    for i in range(0, len(ok), batch):  # one batch of floats at a time, as prediction holds them
        x, s = cpu(lambda: normalise(np.stack(ok[i : i + batch]), table))
        lookup += s

        def encode():
            f = engine.image_features(x)
            if engine.tta_flip:
                f = (f + engine.image_features(np.ascontiguousarray(x[..., ::-1]))) / 2
            return f

        f, s = cpu(encode)
        image_s += s
        image_feat.append(f)
    image_feat = np.concatenate(image_feat)
    captions = [r.caption for r in records]
    text_feat, text_s = cpu(
        lambda: np.concatenate([engine.text_features(captions[lo : lo + WINDOW]) for lo in range(0, n, WINDOW)])
    )
    present = np.ones(n, bool)
    _, heads_s = cpu(
        lambda: predictor.predict_features({"image_feat": image_feat, "text_feat": text_feat}, present, present)
    )
    return {
        "decode and resize": decode / n,
        "uint8 -> float": lookup / n,
        "image encoder": image_s / n,
        "text encoder": text_s / n,
        "heads and fusion": heads_s / n,
    }


def stages_busy(engine, predictor, records, image_dir, cores: int) -> dict:
    """CPU seconds a row of each stage with every core running it at once: ``stages`` on ``cores`` threads, each
    over every ``cores``-th window of rows. Cores that share caches and memory slow each other, so this is what
    the CPU allows when all of it works, as prediction makes it."""
    shares = [[r for i, r in enumerate(records) if (i // WINDOW) % cores == k] for k in range(cores)]
    shares = [share for share in shares if share]  # fewer windows than cores: the idle ones have nothing to time
    with ThreadPoolExecutor(cores) as pool:
        parts = list(pool.map(lambda share: stages(engine, predictor, share, image_dir), shares))
    return {k: sum(p[k] * len(share) for p, share in zip(parts, shares)) / len(records) for k in parts[0]}


def bracketed(per_measurement: list[dict], repeat: int, cores: int) -> float:
    """Rows/s the stages allow during ``repeat``: from the mean CPU a row of the measurements before and after it."""
    either_side = per_measurement[repeat : repeat + 2]
    return cores / float(np.mean([sum(m.values()) for m in either_side]))


def engine_of(path):
    """(engine, predictor) of a model folder's exported copy (made now, before anything is timed) or of an
    exported folder, on one thread: what ``fuselabel predict`` runs on a CPU."""
    folder = path if is_onnx_folder(path) else export_cached(path)
    predictor = FuseLabel.from_pretrained(folder, num_workers=1).predictor()
    return predictor.engine, predictor


def compiled(src: Path) -> None:
    """Byte-compile a fuselabel source tree, so its commands start as an installed package's do (an install writes
    the bytecode; a tree run with PYTHONDONTWRITEBYTECODE would compile every module at every start)."""
    compileall.compile_dir(str(src), quiet=1)


def command(src: str | None, model, data, csv, out: Path) -> tuple[float, float, str, float]:
    """(wall seconds with start-up, seconds of prediction alone as the command reports it, its output line,
    CPU seconds the command used)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuselabel.cli",
            "predict",
            str(model),
            "--data",
            str(data),
            "--csv",
            str(csv),
            "--out",
            str(out),
            "--proba",
            str(out.with_suffix(".proba.csv")),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(done.stderr)
    line = next(x for x in done.stdout.splitlines() if x.startswith("wrote"))
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, float(re.search(r"rows in ([0-9.]+)s", line).group(1)), line, used


def start_times(model, data, one_csv: Path) -> dict:
    """Wall seconds of the other commands that start on one row, each a fresh process: ``evaluate`` (from the
    exported copy, as on any CPU; only when the table has labels) and ``inspect``."""
    runs = {"inspect": ["-m", "fuselabel.cli", "inspect", "--data", str(data), "--csv", str(one_csv)]}
    if read_records(one_csv).labelled:
        runs["evaluate"] = ["-m", "fuselabel.cli", "evaluate", str(model), "--data", str(data), "--csv", str(one_csv)]
    out = {}
    for name, args in runs.items():
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        out[name] = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(done.stderr)
    return out


def evaluate_wall(model, data, csv: Path) -> float:
    """Wall seconds of ``fuselabel evaluate`` over the rows, a fresh process, start-up included."""
    t0 = time.perf_counter()
    args = ["-m", "fuselabel.cli", "evaluate", str(model), "--data", str(data), "--csv", str(csv)]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return time.perf_counter() - t0


def why_seconds(base: str, row, image_dir, predict: bool = True) -> float:
    """Seconds of one /explain of ``row``'s first label (after one /predict of it, as a user of the page would)."""
    import httpx

    photo = (Path(image_dir) / row.image_id).read_bytes()
    files = {"image": (row.image_id, photo, "image/jpeg")}
    label = httpx.get(base + "/labels").json()["labels"][0]["id"]
    if predict:
        httpx.post(base + "/predict", data={"caption": row.caption}, files=files, timeout=120).raise_for_status()
    t0 = time.perf_counter()
    answer = httpx.post(base + "/explain", data={"caption": row.caption, "label": label}, files=files, timeout=300)
    answer.raise_for_status()
    return time.perf_counter() - t0


@contextlib.contextmanager
def launch_service(model, *flags: str):
    """``fuselabel serve MODEL`` with its defaults (but ``flags``) on a free port, stopped (SIGTERM) when the block
    ends: (process, base URL, launch time)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "fuselabel.cli", "serve", str(model), "--port", str(port), *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc, f"http://127.0.0.1:{port}", t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def service_health(proc, base: str, t0: float) -> dict:
    """/health's answer, once the service gives one (asked every 20 ms)."""
    while True:
        try:
            return json.loads(urllib.request.urlopen(base + "/health", timeout=2).read())
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit(f"the service did not start ({' '.join(proc.args)})") from None
            time.sleep(0.02)


def warm_timeline(model, rows, image_dir) -> tuple[float, float]:
    """(seconds from launching the service until /health says its explaining model is ready, seconds of the first
    /explain after a /predict once it is): a person's first "why" on the page."""
    with launch_service(model) as (proc, base, t0):
        while service_health(proc, base, t0).get("explainer") == "loading":
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        return ready, why_seconds(base, rows[2], image_dir)


def service_rate(model, rows, image_dir, batch: int = 32) -> tuple[float, float]:
    """(seconds from launching ``fuselabel serve`` with its defaults until /health answers, rows/s of one client
    sending the rows as /predict/batch requests of ``batch`` rows, one after another)."""
    with launch_service(model) as (proc, base, t0):
        service_health(proc, base, t0)
        start = time.perf_counter() - t0
        first_why = why_seconds(base, rows[0], image_dir)
        bodies = []
        for lo in range(0, len(rows), batch):
            items = []
            for r in rows[lo : lo + batch]:
                photo = Path(image_dir) / r.image_id
                data = base64.b64encode(photo.read_bytes()).decode() if photo.is_file() else None
                items.append({"caption": r.caption, "image_base64": data})
            bodies.append(json.dumps(items).encode())
        headers = {"Content-Type": "application/json"}
        t1 = time.perf_counter()
        for body in bodies:
            request = urllib.request.Request(base + "/predict/batch", data=body, headers=headers)
            urllib.request.urlopen(request, timeout=600).read()
        rate = len(rows) / (time.perf_counter() - t1)
        print(
            f"WHY the first /explain after the first /predict: {first_why:.2f} s; another after the batches: "
            f"{why_seconds(base, rows[1], image_dir, predict=False):.2f} s"
        )
        return start, rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder or exported ONNX folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--csv", help="table (default DATA/train.csv); its first --rows rows are used")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--baseline-src", help="another fuselabel's src folder, run on the same rows for comparison")
    ap.add_argument(
        "--other-model",
        help="a second model (say, --preset cpu-int8) timed the same way in the same "
        "run, with the ratio of its rows/s to the first's",
    )
    ap.add_argument("--skip-features", action="store_true", help="leave out the training feature loop")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="times the command is run, each between two measurements of the stages (the figures are medians: "
        "a shared machine's speed drifts by several per cent within minutes)",
    )
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    records = read_records(csv)
    work = Path(tempfile.mkdtemp(prefix="fuselabel-limit-"))
    rows_csv, one_csv = work / "rows.csv", work / "one.csv"
    write_rows(records, range(min(args.rows, len(records.records))), rows_csv)
    write_rows(records, [0], one_csv)
    rows = read_records(rows_csv).records
    image_dir = images if (Path(images) / rows[0].image_id).exists() else Path(args.data)
    for r in rows:  # read once, so every timed run finds the photos in the page cache, the first as the last
        photo = Path(image_dir) / r.image_id
        if photo.is_file():
            photo.read_bytes()
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(rows)} rows, {cores} usable cores, load average {load:.2f} at start")

    compiled(Path(fuselabel.__file__).parent)
    if args.baseline_src:
        compiled(Path(args.baseline_src))
    models = [("model", args.model)] + ([("other", args.other_model)] if args.other_model else [])
    engines = {label: engine_of(path) for label, path in models}
    runs = (
        [("new", None, args.model)]
        + ([("baseline", args.baseline_src, args.model)] if args.baseline_src else [])
        + ([("other", None, args.other_model)] if args.other_model else [])
    )
    # The stages' CPU a row, alone on one thread and with every core running them at once, measured before the
    # first repeat's commands and after each repeat's: every command lies between two measurements of the limits,
    # and is compared with their mean (the machine's speed drifts by several per cent within minutes).
    measured: dict = {label: [] for label, _ in models}
    busy: dict = {label: [] for label, _ in models}
    timed: dict = {name: [] for name, _, _ in runs}  # per repeat: (wall, alone, one row, CPU used, line)
    for repeat in range(args.repeats + 1):
        for label, _ in models:
            measured[label].append(stages(*engines[label], rows, image_dir))
            busy[label].append(stages_busy(*engines[label], rows, image_dir, cores))
            for name, src, p in runs:
                if (name == "other") != (label == "other"):
                    continue
                if repeat:  # the repeat before this one is bracketed now
                    wall, alone = timed[name][-1][:2]
                    limit, limit_busy = (bracketed(m[label], repeat - 1, cores) for m in (measured, busy))
                    print(
                        f"  repeat {repeat} {name}: limit {limit:.1f} rows/s (all cores busy {limit_busy:.1f}), "
                        f"command {len(rows) / wall:.1f} rows/s with start-up ({100 * len(rows) / wall / limit:.0f} %; "
                        f"{100 * len(rows) / wall / limit_busy:.0f} % busy), {len(rows) / alone:.1f} without "
                        f"({100 * len(rows) / alone / limit:.0f} %; {100 * len(rows) / alone / limit_busy:.0f} % busy)",
                        flush=True,
                    )
                if repeat < args.repeats:
                    wall, alone, line, used = command(src, p, args.data, rows_csv, work / f"{name}.csv")
                    one_wall = command(src, p, args.data, one_csv, work / f"{name}-one.csv")[0]
                    timed[name].append((wall, alone, one_wall, used, line))

    def medians(per_repeat: list[dict]) -> dict:
        return {k: float(np.median([m[k] for m in per_repeat])) for k in per_repeat[0]}

    limits, limits_busy = {}, {}
    for label, path in models:
        per_row, per_row_busy = medians(measured[label]), medians(busy[label])
        total, total_busy = sum(per_row.values()), sum(per_row_busy.values())
        print(f"{label} {path} (medians of {args.repeats + 1} measurements; alone on one thread, all cores busy):")
        for name, s in per_row.items():
            print(f"  {name:18s} {1e3 * s:7.2f} {1e3 * per_row_busy[name]:7.2f} ms CPU a row")
        limits[label], limits_busy[label] = cores / total, cores / total_busy
        print(f"LIMIT {label} {limits[label]:.1f} rows/s ({cores} cores / {1e3 * total:.1f} ms CPU a row, each alone)")
        print(
            f"LIMIT_BUSY {label} {limits_busy[label]:.1f} rows/s ({cores} cores / {1e3 * total_busy:.1f} ms CPU a "
            f"row, every core running the stages)"
        )
        if label == "model":
            first = engines[label][0], per_row
    engine, per_row = first

    results = {}
    for name, _, _ in runs:
        label = "other" if name == "other" else "model"
        wall, alone, one_wall, used = (float(np.median([t[i] for t in timed[name]])) for i in range(4))
        line = timed[name][-1][4]
        results[name] = (wall, alone, one_wall)
        limit, limit_busy = limits[label], limits_busy[label]
        # Each repeat's fraction against its own limits, beside the fraction of the medians.
        fractions = [len(rows) / t[0] / bracketed(measured[label], i, cores) for i, t in enumerate(timed[name])]
        fractions_busy = [len(rows) / t[0] / bracketed(busy[label], i, cores) for i, t in enumerate(timed[name])]
        # Outside load shows as fewer cores used; the pipeline's own overhead as CPU beyond the stages' sum.
        print(
            f"CPU {name}: {used:.1f} s for {len(rows)} rows ({used / wall:.2f} cores busy on average; "
            f"{len(rows) * cores / limit_busy / used * 100:.0f} % of it the stages' own CPU with all cores busy, "
            f"{len(rows) * cores / limit / used * 100:.0f} % of their CPU alone)"
        )
        rate, rate_alone = len(rows) / wall, len(rows) / alone

        def pct(values):
            return ", ".join(f"{100 * f:.0f} %" for f in values)

        print(
            f"PREDICT {name}: {rate:.1f} rows/s with start-up: {100 * np.median(fractions):.0f} % of the limit "
            f"measured either side, the median of repeats {pct(fractions)} ({100 * rate / limit:.0f} % of the "
            f"median limit); {100 * np.median(fractions_busy):.0f} % of the all-cores-busy limit (repeats "
            f"{pct(fractions_busy)}); {rate_alone:.1f} rows/s without ({100 * rate_alone / limit:.0f} %; "
            f"{100 * rate_alone / limit_busy:.0f} %); start-up {wall - alone:.2f} s  [{line}]"
        )
        print(f"ONE_ROW {name}: {one_wall:.2f} s")
    if not is_onnx_folder(args.model):  # evaluate and the service take a model folder
        for name, s in start_times(args.model, args.data, one_csv).items():
            print(f"START {name}: {s:.2f} s")
        predicted, limit = results["new"][0], limits["model"]
        if read_records(rows_csv).labelled:
            wall = evaluate_wall(args.model, args.data, rows_csv)
            print(
                f"EVALUATE {len(rows) / wall:.1f} rows/s with start-up ({predicted / wall:.2f}x predict's "
                f"{len(rows) / predicted:.1f}; {100 * len(rows) / wall / limit:.0f} % of the limit)"
            )
        start, rate = service_rate(args.model, rows, image_dir)
        print(f"START serve (until /health answers): {start:.2f} s")
        ready, why = warm_timeline(args.model, rows, image_dir)
        print(f"WHY explaining model ready {ready:.2f} s after launch; the first /explain after that: {why:.2f} s")
        print(
            f"SERVICE one client, /predict/batch of 32: {rate:.1f} rows/s ({rate * results['new'][1] / len(rows):.2f}x "
            f"predict without start-up; {100 * rate / limit:.0f} % of the limit)"
        )
    if "baseline" in results:
        for suffix in (".csv", ".proba.csv"):
            same = (work / f"new{suffix}").read_bytes() == (work / f"baseline{suffix}").read_bytes()
            print(f"  {suffix[1:]} byte-identical to the baseline's: {same}")
        if (work / "new.proba.csv").read_bytes() != (work / "baseline.proba.csv").read_bytes():
            a = np.genfromtxt(work / "new.proba.csv", delimiter=",", skip_header=1)[:, 1:-1]
            b = np.genfromtxt(work / "baseline.proba.csv", delimiter=",", skip_header=1)[:, 1:-1]
            print(f"  largest probability difference {np.nanmax(np.abs(a - b)):.2e}")
        print(
            f"SPEED-UP new/baseline: {results['baseline'][0] / results['new'][0]:.2f}x with start-up, "
            f"{results['baseline'][1] / results['new'][1]:.2f}x without"
        )

    if "other" in results:
        print(
            f"RATIO other/model rows/s: {results['new'][0] / results['other'][0]:.2f}x with start-up, "
            f"{results['new'][1] / results['other'][1]:.2f}x without; limits {limits['other'] / limits['model']:.2f}x"
        )
    limit = limits["model"]
    if not args.skip_features:
        image_limit = cores / (per_row["decode and resize"] + per_row["uint8 -> float"] + per_row["image encoder"])
        t0 = time.perf_counter()
        encode_images(engine, [r.image_id for r in rows], image_dir)
        rate = len(rows) / (time.perf_counter() - t0)
        print(
            f"FEATURES {rate:.1f} photos/s on {cores} workers, limit {image_limit:.1f} "
            f"({100 * rate / image_limit:.0f} %)"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
