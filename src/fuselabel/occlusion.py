"""Why a model gave one label its probability, by covering parts of its inputs: the default explanation.

It runs the very model that predicts, on its own engine (int8 onnxruntime on a CPU, an exported folder
too), so it explains the numbers the user was shown and needs no PyTorch: a service answers its first
"why" as soon as it answers its first prediction.

- **Photo**: the encoder's input square is cut into ``GRID`` x ``GRID`` cells; each is covered in turn
  with the mean colour (0 after normalisation) and the photo encoded again. A cell's heat is how far the
  label's logit falls when it is covered (rises are cold), put back in the photo's own frame. One photo
  costs ``GRID**2 + 1`` encoder runs, spread over the cores (about 0.4 s for EfficientNet-Lite0 in int8
  on two cores).
- **Caption**: each word (run of non-space) the model reads is left out in turn; its score is how far
  the logit falls without it (negative: the word lowered the label). Words past the token limit are not
  read and get no score. The baseline is the logit of an empty caption.

Each side explains the logit of the head the model uses for it, as ``explain`` (gradients) does: late
fusion's image head for the photo and text head for the words, early fusion's one head with the other
input held at its actual value. A logit is the log-odds of that head's probability (for a multiclass
model, of the label against the rest); probabilities within 2**-24 of 0 or 1 are held there.
"""

from __future__ import annotations

import numpy as np

from .encoding import image_features, over_windows, read_photos_uint8
from .explanation import Explanation, caption_words, to_photo_frame
from .images import normalise, open_image, pixel_table
from .runtime import Predictor, caption_given, uses_image, uses_text

GRID = 7  # cells a side: the resolution of EfficientNet's last feature map at 224 px, as Grad-CAM's
EDGE = 2.0**-24  # float32 probabilities carry no more than this near 0 and 1


def explain(predictor: Predictor, label_index: int, image, caption: str | None) -> Explanation:
    """Heatmap and word scores for label ``label_index`` of one photo (a PIL image, path or array) and/or caption."""
    engine, kind = predictor.engine, predictor.engine.kind
    out = Explanation(label_index, method="occlusion")
    image = _photo(image) if image is not None and uses_image(kind) else None
    pixels = _pixels(engine, image) if image is not None else None
    caption = caption if caption_given(caption) and uses_text(kind) else None
    image_feat = _image_features(engine, pixels[None]) if pixels is not None else None
    text_feat = engine.text_features([caption]) if caption is not None else None
    name = "logit" if predictor.task == "multilabel" else "log-odds"
    if pixels is not None:
        part = "image" if kind in ("image", "late") else "early"
        covered = _image_features(engine, _covered(pixels))
        logits = _logits(predictor, part, label_index, np.concatenate([image_feat, covered]), text_feat)
        fall = np.maximum(logits[0] - logits[1:], 0).reshape(GRID, GRID)
        out.heatmap = to_photo_frame(fall, image.size, engine.data_config)
        out.heatmap_target, out.heatmap_logit = f"{part} head {name}", float(logits[0])
    if caption is not None:
        part = "text" if kind in ("text", "late") else "early"
        reading = predictor.read_caption(caption)
        text = reading.read_text if reading is not None else caption
        spans = caption_words(caption)
        read = [(s, min(e, len(text))) for s, e in spans if s < len(text)]
        # Without each read word in turn (from the part read, so no unread word moves into view), then none.
        variants = [text[:s] + text[e:] for s, e in read] + [""]
        feats = np.concatenate([text_feat, engine.text_features(variants)])
        logits = _logits(predictor, part, label_index, image_feat, feats)
        scores = logits[0] - logits[1:-1]
        out.words = [
            {"text": caption[s:e], "start": s, "end": e, "score": float(scores[i]) if i < len(read) else None}
            for i, (s, e) in enumerate(spans)
        ]
        out.words_target, out.words_logit = f"{part} head {name}", float(logits[0])
        out.words_baseline_logit = float(logits[-1])
    return out


def _photo(image):
    """The photo as given, upright and RGB (a PIL image; a path, bytes or array is opened)."""
    photo, error = open_image(image)
    if photo is None:
        raise ValueError(error)
    return photo


def _pixels(engine, photo) -> np.ndarray:
    """The photo as the encoder sees it, (3, H, W) float32, decoded and resized as prediction does."""
    uint8, _ = read_photos_uint8([photo], None, engine.data_config, workers=1)
    return normalise(uint8[0][None], pixel_table(engine.data_config))[0]


def _covered(pixels: np.ndarray) -> np.ndarray:
    """``GRID**2`` copies of the photo, each with one cell at the mean colour (0), row by row."""
    rows = np.array_split(np.arange(pixels.shape[1]), GRID)
    cols = np.array_split(np.arange(pixels.shape[2]), GRID)
    out = np.repeat(pixels[None], GRID * GRID, axis=0)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            out[i * GRID + j, :, r[0] : r[-1] + 1, c[0] : c[-1] + 1] = 0
    return out


def _image_features(engine, pixels: np.ndarray) -> np.ndarray:
    """Features of each photo, in the engine's runs spread over the cores."""
    runs = over_windows(lambda lo, hi: image_features(engine, pixels[lo:hi]), len(pixels), None, engine.image_batch)
    return np.concatenate([f for _, f in runs])


def _logits(predictor: Predictor, part: str, label: int, image_feat, text_feat) -> np.ndarray:
    """The log-odds of ``part``'s probability of ``label`` for each row; a single input is repeated over them."""
    n = max(len(f) for f in (image_feat, text_feat) if f is not None)
    feats = {
        key: np.repeat(f, n, axis=0) if len(f) == 1 else f
        for key, f in (("image_feat", image_feat), ("text_feat", text_feat))
        if f is not None
    }
    present = np.ones(n, bool)
    pred = predictor.predict_features(
        feats, present if image_feat is not None else ~present, present if text_feat is not None else ~present
    )
    p = np.clip(pred.parts[part][:, label].astype(np.float64), EDGE, 1 - EDGE)
    return np.log(p) - np.log1p(-p)
