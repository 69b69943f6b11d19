"""What does a 12-megapixel phone photo cost against a course photo, now that photos are decoded for the
size the model uses?

    python benchmarks/photo_size.py --model MODEL_DIR --data DATA [--csv FILE] [--rows 100] [--skip 0]

Makes 12-megapixel copies (4032 x 3024, or 3024 x 4032 for portrait photos; JPEG quality 90) of the
photos of N rows (after the first ``--skip``, e.g. the rows the model was trained on) in a temporary folder, then in one run times:

(a) decoding + the evaluation preprocessing alone, one thread: every pixel decoded (as before) against
    ``images.load_rgb(path, size=data_config)`` (JPEG DCT scaling), photos/s;
(b) ``FuseLabel.predict_details`` rows/s (model loading and a warm-up excluded) on the course photos, on
    the 12-megapixel copies, and on the copies with every pixel decoded (as before: the baseline), and
    the share of rows whose label sets agree with those of the course photos.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from PIL import Image

from fuselabel import FuseLabel, runtime
from fuselabel.images import eval_pixels, load_rgb, open_image
from fuselabel.records import read_records, resolve_data

PHONE = (4032, 3024)


def phone_copies(paths: list[Path], folder: Path) -> list[Path]:
    """12-megapixel JPEG copies of ``paths`` in ``folder``, turned as each photo is."""
    out = []
    for path in paths:
        img = load_rgb(path)
        size = PHONE if img.width >= img.height else PHONE[::-1]
        copy = folder / f"{path.stem}.jpg"
        img.resize(size, Image.BICUBIC).save(copy, "JPEG", quality=90)
        out.append(copy)
    return out


def decode_rate(paths: list[Path], data_config: dict, target) -> float:
    """Photos/s of decoding + evaluation preprocessing on one thread."""
    t0 = time.perf_counter()
    for path in paths:
        eval_pixels(load_rgb(path, size=target), data_config)
    return len(paths) / (time.perf_counter() - t0)


def predict_rate(model: FuseLabel, paths: list[Path], captions: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    pred = model.predict_details(images=[str(p) for p in paths], captions=captions)
    return len(paths) / (time.perf_counter() - t0), pred.predicted


def every_pixel(item, image_dir=None, *, size=None):
    """``images.open_image`` as it was: the target is ignored, every pixel is decoded."""
    return open_image(item, image_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="image folder, or a folder with data/ and train.csv")
    parser.add_argument("--csv", help="CSV (default DATA/train.csv)")
    parser.add_argument("--rows", type=int, default=100, help="rows of the CSV to predict")
    parser.add_argument("--skip", type=int, default=0, help="rows to pass over first")
    args = parser.parse_args(argv)

    image_dir, csv = resolve_data(args.data, args.csv)
    records = read_records(csv).records[args.skip : args.skip + args.rows]
    course = [image_dir / r.image_id for r in records]
    captions = [r.caption for r in records]
    model = FuseLabel.from_pretrained(args.model)
    data_config = model.bundle_.preprocessing
    side = data_config["input_size"][-1]
    print(
        f"{len(records)} rows; model {Path(args.model).name}: {model.config.image_model} at {side} px "
        f"(crop_pct {data_config.get('crop_pct')}); {os.cpu_count()} cores",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        phone = phone_copies(course, Path(tmp))
        mb = sum(p.stat().st_size for p in phone) / len(phone) / 1e6
        print(
            f"made {len(phone)} copies of {PHONE[0]} x {PHONE[1]} ({mb:.1f} MB each) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )

        decode = {
            "course, every pixel": decode_rate(course, data_config, None),
            "12 MP, every pixel": decode_rate(phone, data_config, None),
            "12 MP, for the model's size": decode_rate(phone, data_config, data_config),
        }

        model.predict_details(images=[str(p) for p in phone[:16]], captions=captions[:16])  # warm-up
        course_rate, course_sets = predict_rate(model, course, captions)
        phone_rate, phone_sets = predict_rate(model, phone, captions)
        original = runtime.open_image
        runtime.open_image = every_pixel
        try:
            full_rate, full_sets = predict_rate(model, phone, captions)
        finally:
            runtime.open_image = original

    def agree(sets: np.ndarray) -> str:
        return f"{100 * np.mean((sets == course_sets).all(axis=1)):.0f}%"

    print("\n(a) decoding + evaluation preprocessing, one thread")
    print(f"| {'photos':<28} | {'photos/s':>8} |\n|{'-' * 30}|{'-' * 9}:|")
    for name, rate in decode.items():
        print(f"| {name:<28} | {rate:8.1f} |")
    print("\n(b) predict_details, rows/s (loading excluded); label sets as on the course photos")
    print(f"| {'photos':<40} | {'rows/s':>6} | {'vs course':>9} | {'same labels':>11} |")
    print(f"|{'-' * 42}|{'-' * 7}:|{'-' * 10}:|{'-' * 12}:|")
    for name, rate, sets in (
        ("course photos", course_rate, course_sets),
        ("12 MP copies, every pixel (baseline)", full_rate, full_sets),
        ("12 MP copies, decoded for the model", phone_rate, phone_sets),
    ):
        print(f"| {name:<40} | {rate:6.1f} | {course_rate / rate:8.2f}x | {agree(sets):>11} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
