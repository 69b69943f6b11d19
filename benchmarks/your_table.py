"""The course rows as a user keeps them: same model quality, same predictions, labels by name.

Rewrites the first ROWS labelled course rows as a standard CSV (pandas, ``""`` escapes) with renamed and
reordered columns and labels spelled as names ("traffic light"), as JSON Lines and as Parquet, and the
prediction rows also as a spreadsheet keeps them (a ``;`` CSV with a byte-order mark and CRLF line ends, as
Excel and LibreOffice write it in much of Europe, a JSON array and an ``.xlsx`` workbook); then

1. trains the default model on the course file and on the rewritten CSV (same settings and seed) and prints
   both validation mean F1 figures as recorded in the model folders and as ``evaluate --split val`` gives them,
   and each model's label names;
2. predicts the last PREDICT rows with the course model from the course file and from each rewriting and
   checks that the predicted rows are byte for byte the same (the header names the user's columns).

    python benchmarks/your_table.py --data DATA [--rows 20000] [--predict 2000] [--preset cpu] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from fuselabel.cli import main as cli
from fuselabel.labels import read_label_names
from fuselabel.records import read_records
from fuselabel.writers import write_rows


def run(args_list):
    code = cli(args_list)
    if code:
        sys.exit(f"fuselabel {' '.join(args_list[:1])} failed with status {code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="course data folder (train.csv, data/, label_names.csv)")
    p.add_argument("--rows", type=int, default=20000, help="labelled rows used for training")
    p.add_argument("--predict", type=int, default=2000, help="rows predicted from each rewriting")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--cache-dir", help="feature cache (default: fuselabel's own)")
    args = p.parse_args()
    data = Path(args.data)
    course = read_records(data / "train.csv")
    names = read_label_names(data / "label_names.csv")
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = min(args.rows, len(course))
        write_rows(course, range(n), tmp / "course.csv")
        rows = course.records[:n]
        frame = pd.DataFrame(
            {
                "description": [r.caption for r in rows],
                "objects": ["|".join(names[t] for t in r.labels) for r in rows],
                "photo": [r.image_id for r in rows],
            }
        )
        frame.to_csv(tmp / "user.csv", index=False)
        figures = {}
        named = ["--image-col", "photo", "--text-col", "description", "--label-col", "objects"]
        for name, table, extra in (
            ("course CSV", tmp / "course.csv", []),
            ("user CSV, named labels", tmp / "user.csv", named),
        ):
            out = tmp / name.split()[0]
            t0 = time.time()
            run(
                [
                    "train",
                    "--data",
                    str(data),
                    "--csv",
                    str(table),
                    "--out",
                    str(out),
                    "--preset",
                    args.preset,
                    "--quiet",
                    *cache,
                    *extra,
                ]
            )
            seconds = time.time() - t0
            metrics = json.loads((out / "metrics.json").read_text())["validation"]
            labels = json.loads((out / "labels.json").read_text())["labels"]
            # What the folder records against what its predictions give on the same validation rows.
            run(
                [
                    "evaluate",
                    str(out),
                    "--data",
                    str(data),
                    "--csv",
                    str(table),
                    "--split",
                    "val",
                    "--quiet",
                    "--json",
                    str(tmp / f"{out.name}-val.json"),
                    *cache,
                    *extra,
                ]
            )
            evaluated = json.loads((tmp / f"{out.name}-val.json").read_text())["mean_f1"]
            figures[name] = (metrics["mean_f1"], evaluated, seconds, labels)
        print(f"\n{'training table':<26} {'recorded val F1':>15} {'evaluate --split val':>20} {'seconds':>8}  labels")
        for name, (f1, evaluated, seconds, labels) in figures.items():
            print(f"{name:<26} {f1:>15.4f} {evaluated:>20.4f} {seconds:>8.0f}  {', '.join(labels[:4])} ...")

        # Prediction: the last rows of the file, which no training above saw.
        held = course.records[-args.predict :]
        write_rows(course, range(len(course) - len(held), len(course)), tmp / "test.csv")
        test = pd.DataFrame({"text": [r.caption for r in held], "photo": [r.image_id for r in held]})
        test.to_csv(tmp / "test-user.csv", index=False)
        test.to_json(tmp / "test.jsonl", orient="records", lines=True)
        test.to_parquet(tmp / "test.parquet")
        europe = test.to_csv(index=False, sep=";", lineterminator="\r\n").encode("utf-8")
        (tmp / "test-europe.csv").write_bytes(b"\xef\xbb\xbf" + europe)
        test.to_json(tmp / "test.json", orient="records", force_ascii=False)
        test.to_excel(tmp / "test.xlsx", index=False)
        model = tmp / "course"
        outputs = {}
        for name in (
            "test.csv",
            "test-user.csv",
            "test.jsonl",
            "test.parquet",
            "test-europe.csv",
            "test.json",
            "test.xlsx",
        ):
            out = tmp / f"pred-{name}.csv"
            run(
                [
                    "predict",
                    str(model),
                    "--data",
                    str(data),
                    "--csv",
                    str(tmp / name),
                    "--out",
                    str(out),
                    "--quiet",
                    *cache,
                ]
            )
            outputs[name] = out.read_text().split("\n", 1)
        print(f"\n{'prediction input':<16} {'header':<16} same rows as the course file")
        for name, (header, body) in outputs.items():
            print(f"{name:<16} {header:<16} {body == outputs['test.csv'][1]}")


if __name__ == "__main__":
    main()
