"""What an explanation of one label holds, and how it is drawn: shared by both ways of explaining.

``occlusion`` (the default) covers parts of the inputs and runs the model that predicts, in its own
runtime (int8 onnxruntime on a CPU); ``explain`` (``gradients``) follows the gradients of the PyTorch
weights with Captum. Both give an ``Explanation``: a heatmap over the photo as given and a score per
caption word. Torch-free, so a service explains by occlusion without loading PyTorch.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import ExplainMethod
from .preprocess import Preprocess

MAX_HEATMAP_SIDE = 768  # the page shows the photo smaller than this; the overlay stretches to fit it


@dataclass
class Explanation:
    """What explaining one label found; a side is None when its input is missing or unread.

    ``method``: ``occlusion`` (scores are how far the logit falls when a part is covered or a word left
    out) or ``gradients`` (Grad-CAM over the photo, integrated gradients over the words)."""

    label_index: int
    method: ExplainMethod = "gradients"
    heatmap: np.ndarray | None = None  # (H, W) in [0, 1] over the photo as given (longest side capped)
    heatmap_target: str | None = None  # which logit the heatmap explains
    heatmap_logit: float | None = None
    words: list[dict] | None = None  # {"text", "start", "end", "score"}; score None past the token limit
    words_target: str | None = None  # which logit the word scores explain
    words_logit: float | None = None
    words_baseline_logit: float | None = None  # the logit of the caption with no words


def caption_words(caption: str) -> list[tuple[int, int]]:
    """Where each word (run of non-space) of ``caption`` starts and ends."""
    return [m.span() for m in re.finditer(r"\S+", caption)]


def to_photo_frame(cam, photo_size: tuple[int, int], preprocess: Preprocess | dict) -> np.ndarray:
    """A heat grid over the encoder's input (h, w) put over the photo (H, W), normalised to [0, 1].

    A squashed photo (crop_pct >= 1) maps whole; a centre crop maps onto the part of the photo the
    model saw (``Preprocess.photo_box``), and the rest stays cold. The photo's longest side is capped at
    ``MAX_HEATMAP_SIDE``.
    """
    cam = np.ascontiguousarray(cam, dtype=np.float32)
    width, height = photo_size
    scale = min(1.0, MAX_HEATMAP_SIDE / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top, right, bottom = Preprocess.of(preprocess).photo_box(width, height)
    x0, y0 = min(round(left * scale), out_w - 1), min(round(top * scale), out_h - 1)
    box_w = min(max(1, round((right - left) * scale)), out_w - x0)
    box_h = min(max(1, round((bottom - top) * scale)), out_h - y0)
    heat = np.zeros((out_h, out_w), dtype=np.float32)
    # Pillow's bilinear filter: cell centres on pixel centres (as torch's align_corners=False) when enlarging.
    up = Image.fromarray(cam, "F").resize((box_w, box_h), Image.Resampling.BILINEAR)
    heat[y0 : y0 + box_h, x0 : x0 + box_w] = np.maximum(np.asarray(up), 0)
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def heatmap_png(heat: np.ndarray, colormap: str = "jet", max_alpha: float = 0.6) -> bytes:
    """The heatmap as an RGBA PNG to lay over the photo: colour from ``colormap``, opacity rising with heat."""
    import matplotlib

    rgba = matplotlib.colormaps[colormap](heat)
    rgba[..., 3] = max_alpha * np.sqrt(heat)  # faint evidence stays visible, cold areas stay clear
    buf = io.BytesIO()
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(buf, "PNG", optimize=True)
    return buf.getvalue()
