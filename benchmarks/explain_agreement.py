"""Do the two ways of explaining agree, and what does each cost?

    python benchmarks/explain_agreement.py --model MODEL_DIR --data DIR --csv ROWS.csv [--rows 50]

For each of the first ``--rows`` rows with a photo, explains the model's most probable label twice: by occlusion
(the default: the model that predicts, int8 in onnxruntime on a CPU) and by gradients (Grad-CAM and integrated
gradients on the floating-point PyTorch weights). Prints, over the rows: the correlation of the two heatmaps
(pixel by pixel), how often their hottest cells of a 7 x 7 grid fall within one cell of each other, how often both
name the same top word, the rank correlation of the word scores, the logits each names against the prediction's,
and the median seconds of each (after one warm-up explanation each). Ends with a line ``AGREEMENT ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fuselabel import FuseLabel
from fuselabel.records import read_records, resolve_data


def _hot_cell(heat: np.ndarray, grid: int = 7) -> tuple[int, int]:
    """(row, column) of the hottest cell of a ``grid`` x ``grid`` split of the heatmap."""
    rows, cols = (np.array_split(np.arange(n), grid) for n in heat.shape)
    means = np.array([[heat[np.ix_(r, c)].mean() for c in cols] for r in rows])
    return divmod(int(means.argmax()), grid)


def _ranks(x: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--rows", type=int, default=50)
    args = ap.parse_args(argv)
    image_dir, csv = resolve_data(args.data, args.csv)
    rows = [r for r in read_records(csv).records if (Path(image_dir) / r.image_id).is_file()][: args.rows]
    model = FuseLabel.from_pretrained(args.model, exported=True)
    first = Image.open(Path(image_dir) / rows[0].image_id).convert("RGB")
    for method in ("occlusion", "gradients"):  # warm-ups: sessions, imports, the PyTorch weights
        model.explain(0, first, rows[0].caption, method=method)
    corr, near, same_word, word_rank, secs = [], [], [], [], {"occlusion": [], "gradients": []}
    logit_gap = {"occlusion": [], "gradients": []}
    for row in rows:
        photo = Image.open(Path(image_dir) / row.image_id).convert("RGB")
        pred = model.predict_details([photo], [row.caption])
        label = int(pred.probs[0].argmax())
        got = {}
        for method in secs:
            t0 = time.perf_counter()
            got[method] = model.explain(label, photo, row.caption, method=method)
            secs[method].append(time.perf_counter() - t0)
            p = float(np.clip(pred.parts["image"][0, label], 2**-24, 1 - 2**-24)) if "image" in pred.parts else None
            if p is not None and got[method].heatmap_logit is not None:
                logit_gap[method].append(abs(got[method].heatmap_logit - np.log(p / (1 - p))))
        a, b = got["occlusion"], got["gradients"]
        if a.heatmap is not None and a.heatmap.std() > 0 and b.heatmap.std() > 0:
            corr.append(float(np.corrcoef(a.heatmap.ravel(), b.heatmap.ravel())[0, 1]))
            (r1, c1), (r2, c2) = _hot_cell(a.heatmap), _hot_cell(b.heatmap)
            near.append(abs(r1 - r2) <= 1 and abs(c1 - c2) <= 1)
        sa = [w["score"] for w in a.words or [] if w["score"] is not None]
        sb = [w["score"] for w in b.words or [] if w["score"] is not None]
        if len(sa) == len(sb) and len(sa) > 1:
            same_word.append(int(np.argmax(sa)) == int(np.argmax(sb)))
            word_rank.append(float(np.corrcoef(_ranks(sa), _ranks(sb))[0, 1]))
    n = len(rows)
    print(f"{n} rows of {csv}, each row's most probable label, model {args.model}")
    print(f"heatmaps: correlation median {statistics.median(corr):.2f} over {len(corr)} rows; hottest cells within one")
    print(f"  cell of each other on {sum(near)} of {len(near)} rows")
    print(f"words: the same top word on {sum(same_word)} of {len(same_word)} rows; rank correlation median")
    print(f"  {statistics.median(word_rank):.2f}")
    for method, gaps in logit_gap.items():
        if gaps:
            print(f"{method}: photo-head logit named vs predicted, median gap {statistics.median(gaps):.4f}")
    print(
        f"AGREEMENT heatmap correlation {statistics.median(corr):.2f}, hottest cells near {sum(near)}/{len(near)}, "
        f"same top word {sum(same_word)}/{len(same_word)}; seconds a row: occlusion "
        f"{statistics.median(secs['occlusion']):.2f}, gradients {statistics.median(secs['gradients']):.2f} (medians)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
