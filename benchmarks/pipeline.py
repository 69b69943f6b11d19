#!/usr/bin/env python
"""The pipeline benchmark: what each model kind scores, and what the CPU default costs, on the machine it runs on.

On the COMP5329 data (--data, and --csv for another CSV) with the CPU default, frozen
EfficientNet-Lite2 + MiniLM features (preset ``cpu``: every other setting at its default), it trains

    late fusion, weighted   <- first: exactly the default ``fuselabel train`` (kind late, weighted, seed 42)
    image-only, text-only, early fusion, late fusion union

and reports, for each, validation mean F1 with global and with per-class thresholds (both from the same
trained model: threshold rules are tuned after training, see fuselabel.experiment), plus wall times:

* feature extraction, cold: paid by the first run, which finds an empty feature cache (by default a fresh
  temporary --cache-dir, so the number is honest); every later run loads the cached features;
* training per run (heads on cached features);
* end to end, the default ``fuselabel train``: the first run's fit() from reading the CSV to the saved model
  folder, cold features included (interpreter start and imports are printed separately).

It finishes with a baseline on the same validation rows (the seed's own stratified split): predict the most
frequent training label for every row (label 1, "person", on COMP5329) and score it with
fuselabel.metrics.mean_f1.

    python benchmarks/pipeline.py --data DATA                       # full data: long on 2 CPU cores
    python benchmarks/pipeline.py --data DATA --csv FEW.csv --cache-dir CACHE --epochs 3
    python benchmarks/pipeline.py --data DATA --seeds 42 0 1 --out runs/pipeline-benchmark   # mean ± std
    python benchmarks/pipeline.py --data DATA --set image_size=0 --set image_crop_pct=0   # other settings

The trainings go through fuselabel.experiment.run_experiment, so --out also holds the study's
results.csv / results.md / results.png under OUT/experiment/.
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import fuselabel.train  # noqa: E402,F401  (the import cost of `fuselabel train`, measured below)
from fuselabel.cli import _kv  # noqa: E402
from fuselabel.config import Config, build_config  # noqa: E402
from fuselabel.data import stratified_split  # noqa: E402
from fuselabel.experiment import run_experiment  # noqa: E402
from fuselabel.labels import find_label_names, label_vocabulary, labels_to_matrix  # noqa: E402
from fuselabel.metrics import mean_f1  # noqa: E402
from fuselabel.records import read_records, resolve_data  # noqa: E402

IMPORT_S = time.time() - _T_IMPORT

# (row name, settings); the first is the default `fuselabel train` and must stay first (it pays the cold features).
MODELS = [
    ("late fusion, weighted", {"kind": "late", "late_combine": "weighted"}),
    ("image-only", {"kind": "image"}),
    ("text-only", {"kind": "text"}),
    ("early fusion", {"kind": "early"}),
    ("late fusion, union", {"kind": "late", "late_combine": "union"}),
]
TABLE_ORDER = ["image-only", "text-only", "early fusion", "late fusion, weighted", "late fusion, union"]
METHODS = ("global", "per_class")


def _model_name(row: dict) -> str:
    for name, settings in MODELS:
        if row.get("kind") == settings["kind"] and settings.get("late_combine", row.get("late_combine")) == row.get(
            "late_combine"
        ):
            return name
    raise KeyError(row.get("kind"))


def _stat(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def _fmt(stat, digits=4) -> str:
    if stat is None:
        return "failed"
    mean, std = stat
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _feature_files(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "features").glob("*.npz")} if (cache_dir / "features").is_dir() else set()


def baseline(csv: Path, seed: int, val_fraction: float) -> dict:
    """Most frequent training label for every validation row of the seed's split, scored with mean_f1."""
    records = read_records(csv)
    vocab = label_vocabulary(records.label_sets)
    labels = labels_to_matrix(records.label_sets, vocab).astype(np.uint8)
    train_idx, val_idx = stratified_split(labels.astype(np.float32), val_fraction, seed)
    top = int(labels[train_idx].sum(0).argmax())
    pred = np.zeros_like(labels[val_idx])
    pred[:, top] = 1
    names, _ = find_label_names(None, [Path(csv).parent])
    return {
        "label": vocab[top],
        "name": names.get(vocab[top], vocab[top]),
        "seed": seed,
        "mean_f1": mean_f1(labels[val_idx], pred),
        "val_labels": labels[val_idx],
        "val_rows": int(len(val_idx)),
        "train_rows": int(len(train_idx)),
        "rows": len(records),
    }


def build_grid(cache_dir: str, seeds: list[int], epochs: int | None) -> dict:
    base = {"preset": "cpu", "cache_dir": cache_dir}
    if epochs is not None:
        base["epochs"] = epochs
    return {
        "name": "pipeline-benchmark",
        "base": base,
        "runs": [dict(s) for _, s in MODELS],
        "grid": {"threshold_method": list(METHODS)},
        "seeds": seeds,
        "keep_models": False,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder, or a folder with data/ and the CSV")
    p.add_argument("--csv", help="labelled CSV (default DATA/train.csv)")
    p.add_argument(
        "--cache-dir",
        help="feature cache; default a fresh temporary folder (so the cold extraction "
        "time is measured), removed afterwards",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs (default: the config default, {Config.epochs}, "
        f"with early stopping after {Config.patience})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[Config.seed],
        help=f"seeds (each also draws the validation split); default {Config.seed}, the default's own",
    )
    p.add_argument("--out", help="write results.json and results.md here (and the study under OUT/experiment)")
    p.add_argument("--verbose", action="store_true", help="show each fit's own output and progress bars")
    p.add_argument(
        "--set",
        action="append",
        type=_kv,
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every run, after preset cpu's (e.g. --set image_size=0)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    images, csv = resolve_data(args.data, args.csv)
    temp_cache = args.cache_dir is None
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="flcache-bench-"))
    out = Path(args.out) if args.out else None
    study_dir = out / "experiment" if out else Path(tempfile.mkdtemp(prefix="fuselabel-bench-"))
    before = _feature_files(cache_dir)
    first: dict = {}
    val_labels: dict[tuple, np.ndarray] = {}

    def on_result(run_id, config, result):
        if not first:
            first.update(
                run_id=run_id,
                new_features=sorted(_feature_files(cache_dir) - before),
                timings=dict(result.timings),
                kind=config.kind,
                late_combine=config.late_combine,
                seed=config.seed,
            )
        val_labels[(run_id, config.seed)] = result.val_labels

    # what every run shares (preset cpu: frozen encoders)
    config = build_config("cpu", epochs=args.epochs, **dict(args.set))
    print(
        f"pipeline benchmark: {csv} ({images}); image {config.image_model}, text {config.text_model}, regime "
        f"frozen; seeds {args.seeds}; cache {cache_dir}{' (fresh)' if not before else ' (already holds features)'}"
    )
    t_read = time.perf_counter()
    n_rows = len(read_records(csv))
    print(f"reading the CSV: {n_rows} rows in {time.perf_counter() - t_read:.2f} s")
    try:
        rows = run_experiment(
            build_grid(str(cache_dir), args.seeds, args.epochs),
            study_dir,
            images,
            csv,
            overrides=dict(args.set),
            verbose=args.verbose,
            on_result=on_result,
        )
    finally:
        if temp_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)

    # The baseline, on exactly the validation rows each run scored.
    base_by_seed = {s: baseline(csv, s, config.val_fraction) for s in args.seeds}
    for (run_id, seed), labels in val_labels.items():
        if not np.array_equal(labels, base_by_seed[seed]["val_labels"]):
            raise SystemExit(f"benchmark: run {run_id} validated on other rows than the baseline's split")

    ok = [r for r in rows if r["status"] == "ok"]
    table = []
    for name in TABLE_ORDER:
        mine = [r for r in ok if _model_name(r) == name]
        entry = {"model": name, "n_seeds": len({r["seed"] for r in mine})}
        for m in METHODS:
            vals = [r["val_mean_f1"] for r in mine if r["threshold_method"] == m]
            entry[f"mean_f1_{m}"] = _stat(vals) if vals else None
        per_run = {r["run_id"]: r for r in mine}.values()  # one row per training for the timings
        for col in ("features_s", "train_s", "total_s", "size_mb"):
            vals = [r[col] for r in per_run if r[col] is not None]
            entry[col] = _stat(vals) if vals else None
        entry["errors"] = sorted({r["error"] for r in rows if r["status"] != "ok" and _model_name(r) == name})
        table.append(entry)

    b0 = base_by_seed[args.seeds[0]]
    n_val = b0["val_rows"]
    print()
    print(
        f"validation mean F1 on {n_val} held-out rows of {b0['rows']} (seed {args.seeds[0]}'s stratified split"
        f"{'; mean ± std over seeds ' + str(args.seeds) if len(args.seeds) > 1 else ''}); frozen "
        f"{config.image_model} + {config.text_model}, {args.epochs or Config.epochs} epochs max"
    )
    header = (
        f"{'model':<24} {'global thr':>17} {'per-class thr':>17} {'features s':>10} {'train s':>8} "
        f"{'total s':>8} {'MB':>6}"
    )
    print(header)
    print("-" * len(header))
    for e in table:

        def num(key, d=1):
            return f"{e[key][0]:.{d}f}" if e[key] else "-"

        print(
            f"{e['model']:<24} {_fmt(e['mean_f1_global']):>17} {_fmt(e['mean_f1_per_class']):>17} "
            f"{num('features_s'):>10} {num('train_s'):>8} {num('total_s'):>8} {num('size_mb'):>6}"
        )
        for err in e["errors"]:
            print(f"{'':<24} failed: {err[:200]}")
    print()

    timing: dict = {"import_s": IMPORT_S, "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if first:
        t = first["timings"]
        new = first["new_features"]
        timing.update(
            first_run=first["run_id"],
            first_features_s=t.get("features_s"),
            first_total_s=t.get("total_s"),
            first_train_s=t.get("train_s"),
            cold=len(new) >= 2,
            new_feature_files=len(new),
        )
        if len(new) >= 2:
            print(
                f"feature extraction, cold (first run, images + captions, {b0['rows']} rows): {t['features_s']:.1f} s"
            )
        elif new:
            print(f"feature extraction, partly cold (one of the two feature sets was cached): {t['features_s']:.1f} s")
        else:
            print(
                f"feature extraction: not measured, --cache-dir already held these features "
                f"(first run loaded them in {t['features_s']:.1f} s); use a fresh --cache-dir for the cold time"
            )
        later = [r for r in {r["run_id"]: r for r in ok}.values() if r["run_id"] != first["run_id"]]
        if later:
            fs = [r["features_s"] for r in later]
            print(f"feature loading, cached (later runs): {min(fs):.1f}-{max(fs):.1f} s")
        print("training per run (heads on frozen features):")
        for r in {r["run_id"]: r for r in ok}.values():
            print(f"  {_model_name(r):<24} seed {r['seed']:<4} train {r['train_s']:.1f} s, total {r['total_s']:.1f} s")
        default_first = first["kind"] == "late" and first["late_combine"] == "weighted"
        print(
            f"end to end, default `fuselabel train` ({'late/weighted, ' if default_first else ''}first run"
            f"{', cold features' if len(new) >= 2 else ''}): {t['total_s']:.1f} s "
            f"(+ {IMPORT_S:.1f} s interpreter imports)"
        )
    else:
        print("no run finished; no timings")
    print(
        f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )

    base_mean = float(np.mean([b["mean_f1"] for b in base_by_seed.values()]))
    default = next(e for e in table if e["model"] == "late fusion, weighted")["mean_f1_global"]
    default_text = f"{default[0]:.3f}" if default else "failed"
    final = (
        f'BASELINE always-"{b0["name"]}" mean F1 = {base_mean:.3f} on the same validation rows; '
        f"default late fusion = {default_text}"
    )
    print(final)

    if out:
        out.mkdir(parents=True, exist_ok=True)
        summary = {
            "csv": str(csv),
            "images": str(images),
            "seeds": args.seeds,
            "epochs": args.epochs or Config.epochs,
            "image_model": config.image_model,
            "text_model": config.text_model,
            "val_rows": n_val,
            "models": table,
            "timing": timing,
            "baseline": {
                "label": b0["label"],
                "name": b0["name"],
                "mean_f1": base_mean,
                "per_seed": {s: b["mean_f1"] for s, b in base_by_seed.items()},
            },
            "default_late_fusion_mean_f1": default[0] if default else None,
            "summary_line": final,
        }
        (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        md = [
            "# Pipeline benchmark",
            "",
            f"`{csv}`, {n_val} validation rows, seeds {args.seeds}, frozen {config.image_model} + {config.text_model}.",
            "",
            "| model | mean F1, global thr | mean F1, per-class thr | features s | train s | total s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for e in table:
            md.append(
                f"| {e['model']} | {_fmt(e['mean_f1_global'])} | {_fmt(e['mean_f1_per_class'])} | "
                + " | ".join(f"{e[k][0]:.1f}" if e[k] else "-" for k in ("features_s", "train_s", "total_s"))
                + " |"
            )
        md += [
            "",
            f"Cold feature extraction (first run): "
            f"{timing.get('first_features_s', float('nan')):.1f} s"
            f"{'' if timing.get('cold') else ' (not cold: features were cached)'}; end to end default train: "
            f"{timing.get('first_total_s', float('nan')):.1f} s on {os.cpu_count()} CPU cores.",
            "",
            final,
            "",
        ]
        (out / "results.md").write_text("\n".join(md))
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    else:
        shutil.rmtree(study_dir, ignore_errors=True)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
