"""How far the device image path's pixels are from the PIL path's, photo by photo.

    python benchmarks/device_pixels.py --data DATA [--rows 500] [--device cuda] [--size 260 --crop-pct 0.89]

Runs the device decoder's code (``gpu_decode.iter_uint8`` with the tensor path: torchvision's JPEG decoder on
``--device``, nvJPEG on CUDA, then the shared resize and crop) and the PIL path (``images.load_rgb`` +
``images.eval_uint8``) over the first ``--rows`` photos of the table, with EfficientNet-Lite2's preprocessing
by default, and prints how many photos come out byte for byte the same, the largest difference in grey levels,
and the mean absolute difference in uint8 levels over all pixels. Not a timing.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from fuselabel.gpu_decode import iter_uint8
from fuselabel.images import eval_uint8, load_rgb
from fuselabel.preprocess import Preprocess
from fuselabel.records import read_records, resolve_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=260)
    parser.add_argument("--crop-pct", type=float, default=0.89)
    args = parser.parse_args()
    os.environ["FUSELABEL_GPU_DECODE"] = (
        "force" if args.device == "cpu" else os.environ.get("FUSELABEL_GPU_DECODE", "1")
    )
    image_dir, table = resolve_data(args.data, None)
    records = read_records(table).records[: args.rows]
    pp = Preprocess(size=args.size, crop_pct=args.crop_pct, mean=(0.5,) * 3, std=(0.5,) * 3)
    same, worst, total, count = 0, 0, 0.0, 0
    for pos, pixels, _ in iter_uint8(records, image_dir, pp, device=args.device, gpu_decode=True, num_workers=2):
        for k, row in enumerate(pos.tolist()):
            want = eval_uint8(load_rgb(image_dir / records[row].image_id), pp).astype(np.int16)
            diff = np.abs(pixels[k].cpu().numpy().astype(np.int16) - want)
            same += int(diff.max() == 0)
            worst = max(worst, int(diff.max()))
            total, count = total + float(diff.sum()), count + diff.size
    print(
        f"{len(records)} photos on {args.device}: {same} byte for byte the same; largest difference {worst} "
        f"grey levels; mean absolute difference {total / count:.4f} levels"
    )


if __name__ == "__main__":
    main()
