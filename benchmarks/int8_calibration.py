#!/usr/bin/env python
"""How many photos the int8 image encoder's ranges need: the calibration's seconds against the int8 features' fidelity.

    python benchmarks/int8_calibration.py --data DATA [--photos 8 16 32 64] [--test 192]

For each count N, measures the activation ranges on N training photos spread evenly over the table, as training
does (``engines.calibrate_image_int8``, a fresh cache each time so nothing is reused), builds the static int8 image
encoder from them, and compares its features with the float32 encoder's on ``--test`` other photos (every 97th row
from the 8th, calibration photos left out): the mean and the lowest cosine similarity. Ends with one line
``CALIBRATION N photos: S s, cosine mean M (lowest L)`` a count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fuselabel.config import Config
from fuselabel.encoders import PooledImageEncoder, create_image_encoder, image_data_config
from fuselabel.encoding import read_photos_uint8
from fuselabel.engines import calibrate_image_int8, image_session
from fuselabel.images import normalise, pixel_table
from fuselabel.records import read_records, resolve_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder, or a folder with data/ and the table")
    ap.add_argument("--csv", help="the table (default DATA/train.csv)")
    ap.add_argument("--photos", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--test", type=int, default=192, help="photos the features are compared on")
    args = ap.parse_args(argv)

    images, csv = resolve_data(args.data, args.csv)
    rows = read_records(csv).records
    config = Config()  # the default image encoder and input size
    backbone = create_image_encoder(config.image_model).eval()
    encoder = PooledImageEncoder(backbone)
    data_config = image_data_config(backbone, config.image_size, config.image_crop_pct)
    shape = tuple(data_config["input_size"])
    # Photos none of the calibrations use (they take every (rows // N)-th row from the first, N of them).
    calibrating = {r.image_id for n in args.photos for r in rows[:: max(1, len(rows) // n)][:n]}
    test = [r.image_id for r in rows[7::97] if r.image_id not in calibrating][: args.test]
    pixels, _ = read_photos_uint8(test, images, data_config, workers=None)
    x = normalise(np.stack([p for p in pixels if p is not None]), pixel_table(data_config)).astype(np.float32)
    print(f"{len(rows)} rows; {config.image_model} at {shape[-1]} px; features compared on {len(x)} other photos")
    with tempfile.TemporaryDirectory(prefix="fuselabel-calibration-") as tmp:
        reference = image_session(encoder, shape, Path(tmp) / "float").run(None, {"pixels": x})[0]
        for n in args.photos:
            cache = Path(tmp) / f"n{n}"
            image_session(encoder, shape, cache)  # the float graph exported first: only the calibration is timed
            t0 = time.perf_counter()
            calibration = calibrate_image_int8(
                encoder, data_config, [r.image_id for r in rows], images, cache, photos=n
            )
            seconds = time.perf_counter() - t0
            int8 = image_session(encoder, shape, cache, int8=calibration["ranges"]).run(None, {"pixels": x})[0]
            cos = (int8 * reference).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(reference, axis=1)
            print(
                f"CALIBRATION {calibration['photos']} photos: {seconds:.1f} s, cosine mean {cos.mean():.4f} "
                f"(lowest {cos.min():.4f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
