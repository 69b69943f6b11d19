"""Why a model gave one label its probability: a heatmap over the photo and a score for each caption word.

The photo side is Grad-CAM (Captum's ``LayerGradCam``) on the image encoder's last feature map, the
one its pooling reads, upsampled and put back in the photo's own frame (the squashed whole photo, or
the centre crop the model saw). The caption side is occlusion over words (Captum's ``FeatureAblation``
with one feature per word): each word is masked out of the attention, the caption encoded again, and
its score is how far the label's logit falls without it (positive: the word raised the label). All
words go through the text encoder in one batch, so a 64-token caption costs one forward pass of about
as many rows, well under a second on a CPU.

Each side explains the logit the model really uses for that label: late fusion's image head for the
heatmap and its text head for the words; early fusion's one head for both, with the other input held
at its actual value; a single-modality model's only head.
"""

from __future__ import annotations

import io
import re
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bundle import Bundle
from .data import build_transform

MAX_HEATMAP_SIDE = 768   # the page shows the photo smaller than this; the overlay stretches to fit it


@dataclass
class Explanation:
    label_index: int
    heatmap: np.ndarray | None = None      # (H, W) in [0, 1] over the photo as given (longest side capped)
    heatmap_target: str | None = None      # which logit the heatmap explains
    heatmap_logit: float | None = None
    words: list[dict] | None = None        # {"text", "start", "end", "score"}; score None past the token limit
    words_target: str | None = None        # which logit the word scores explain
    words_logit: float | None = None


def explain(bundle: Bundle, label_index: int, image: Image.Image | None, caption: str | None) -> Explanation:
    """Heatmap and word scores for label ``label_index`` of one photo and/or caption (RGB PIL image, str)."""
    net = bundle.net.eval()
    kind = bundle.config.kind
    out = Explanation(label_index)
    caption = caption if caption and caption.strip() else None
    with torch.no_grad():
        context = _fixed_inputs(bundle, image, caption)
    if image is not None and net.image_encoder is not None:
        part = "image" if kind in ("image", "late") else "early"
        out.heatmap, out.heatmap_logit = _grad_cam(bundle, part, label_index, image, context)
        out.heatmap_target = f"{part} head logit"
    if caption is not None and net.text_encoder is not None:
        part = "text" if kind in ("text", "late") else "early"
        out.words, out.words_logit = _word_occlusion(bundle, part, label_index, caption, context)
        out.words_target = f"{part} head logit"
    return out


def _fixed_inputs(bundle: Bundle, image, caption) -> dict:
    """Features of each input as the model sees it, for holding one side still while the other is explained.

    A missing input is zero features with its ``*_present`` flag 0, as the predictor gives the heads
    (early fusion then ignores that side). Late fusion's heads never read the other side, so there
    these only complete the batch.
    """
    net = bundle.net
    fixed = {}
    if net.image_encoder is not None:
        fixed["image_present"] = torch.ones(1) if image is not None else torch.zeros(1)
        fixed["image_feat"] = net.image_encoder(_pixels(bundle, image)) if image is not None \
            else torch.zeros(1, net.image_encoder.num_features)
    if net.text_encoder is not None:
        fixed["caption_present"] = torch.ones(1) if caption is not None else torch.zeros(1)
        if caption is not None:
            tok = _tokenize(bundle, caption)
            fixed["text_feat"] = net.text_encoder(tok["input_ids"], tok["attention_mask"])
        else:
            fixed["text_feat"] = torch.zeros(1, net.text_encoder.num_features)
    return fixed


def _pixels(bundle: Bundle, image: Image.Image) -> torch.Tensor:
    return build_transform(bundle.preprocessing, train=False)(image).unsqueeze(0)


def _tokenize(bundle: Bundle, caption: str, offsets: bool = False):
    return bundle.tokenizer(caption, truncation=True, max_length=bundle.config.text_max_length,
                            return_tensors="pt", return_offsets_mapping=offsets)


def _cam_layer(backbone: torch.nn.Module) -> torch.nn.Module:
    """The module whose output the pooling reads: EfficientNet's conv head (with its norm and activation),
    else the last feature stage timm names."""
    if hasattr(backbone, "conv_head") and hasattr(backbone, "bn2"):
        return backbone.bn2
    return backbone.get_submodule(backbone.feature_info[-1]["module"])


def _grad_cam(bundle: Bundle, part: str, label: int, image: Image.Image, context: dict) -> tuple[np.ndarray, float]:
    from captum.attr import LayerGradCam

    net = bundle.net
    fixed = {k: v for k, v in context.items() if k != "image_feat"}
    fixed["image_present"] = torch.ones(1)

    def logit(pixels: torch.Tensor) -> torch.Tensor:
        batch = {"pixels": pixels, **fixed}
        return net.head(net.encode(batch))[part][:, label]

    pixels = _pixels(bundle, image)
    with torch.enable_grad():
        cam = LayerGradCam(logit, _cam_layer(net.image_encoder.backbone)).attribute(
            pixels, relu_attributions=True)
        value = float(logit(pixels).detach()[0])
    return _to_photo_frame(cam.detach()[0, 0].float(), image.size, bundle.preprocessing), value


def _to_photo_frame(cam: torch.Tensor, photo_size: tuple[int, int], preprocessing: dict) -> np.ndarray:
    """The feature-map heat (h, w) over the photo (H, W), normalised to [0, 1].

    A squashed photo (crop_pct >= 1) maps whole; a centre crop maps onto the part of the photo the
    model saw, and the rest stays cold. The photo's longest side is capped at ``MAX_HEATMAP_SIDE``.
    """
    width, height = photo_size
    scale = min(1.0, MAX_HEATMAP_SIDE / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    crop_pct = preprocessing.get("crop_pct", 0.875)
    if crop_pct >= 1.0:
        box = (0, 0, out_w, out_h)
    else:
        # Short side resized to size / crop_pct, then a size x size centre crop: a square of side
        # short * crop_pct in the photo's own pixels.
        side = min(out_w, out_h) * crop_pct
        left, top = (out_w - side) / 2, (out_h - side) / 2
        box = (round(left), round(top), round(left + side), round(top + side))
    heat = np.zeros((out_h, out_w), dtype=np.float32)
    box_w, box_h = max(1, box[2] - box[0]), max(1, box[3] - box[1])
    up = F.interpolate(cam[None, None], size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]
    heat[box[1]:box[1] + box_h, box[0]:box[0] + box_w] = up.clamp(min=0).numpy()
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def _caption_words(caption: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", caption)]


def _word_occlusion(bundle: Bundle, part: str, label: int, caption: str, context: dict) -> tuple[list[dict], float]:
    from captum.attr import FeatureAblation

    net = bundle.net
    tok = _tokenize(bundle, caption, offsets=True)
    spans = _caption_words(caption)
    starts = [s for s, _ in spans]
    # Each token joins the whitespace word its first character falls in; special tokens ([CLS], [SEP])
    # get groups of their own, whose scores are dropped.
    offsets = tok["offset_mapping"][0].tolist()
    groups, word_of_group = [], []
    for start, end in offsets:
        word = bisect_right(starts, start) - 1 if end > start else None
        if word is None or word not in word_of_group:
            word_of_group.append(word)
        groups.append(len(word_of_group) - 1 if word is None else word_of_group.index(word))
    ids, mask = tok["input_ids"], tok["attention_mask"]
    fixed = {k: v for k, v in context.items() if k != "text_feat"}

    def logit(keep: torch.Tensor) -> torch.Tensor:
        n = keep.shape[0]
        attention = (mask * keep).long()
        batch = {k: v.expand(n, *v.shape[1:]) for k, v in fixed.items()}
        batch["text_feat"] = net.text_encoder(ids.expand(n, -1), attention)
        return net.head(net.encode(batch))[part][:, label]

    keep = torch.ones(1, ids.shape[1])
    with torch.no_grad():
        scores = FeatureAblation(logit).attribute(keep, baselines=0.0, feature_mask=torch.tensor([groups]),
                                                  perturbations_per_eval=len(word_of_group))[0]
        value = float(logit(keep)[0])
    by_word = {}
    for position, group in enumerate(groups):
        word = word_of_group[group]
        if word is not None:
            by_word[word] = float(scores[position])  # every token of a word carries the word's score
    words = [{"text": caption[s:e], "start": s, "end": e, "score": by_word.get(i)} for i, (s, e) in enumerate(spans)]
    return words, value


def heatmap_png(heat: np.ndarray, colormap: str = "jet", max_alpha: float = 0.6) -> bytes:
    """The heatmap as an RGBA PNG to lay over the photo: colour from ``colormap``, opacity rising with heat."""
    import matplotlib

    rgba = matplotlib.colormaps[colormap](heat)
    rgba[..., 3] = max_alpha * np.sqrt(heat)   # faint evidence stays visible, cold areas stay clear
    buf = io.BytesIO()
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(buf, "PNG", optimize=True)
    return buf.getvalue()
