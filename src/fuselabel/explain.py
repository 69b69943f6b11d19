"""Why a model gave one label its probability: a heatmap over the photo and a score for each caption word.

The photo side is Grad-CAM (Captum's ``LayerGradCam``) on the image encoder's last feature map, the
one its pooling reads, upsampled and put back in the photo's own frame (the squashed whole photo, or
the centre crop the model saw). The caption side is integrated gradients on the text encoder's token
embeddings (Captum's ``LayerIntegratedGradients``), from a baseline caption of [PAD] tokens, summed
over the tokens of each whitespace word: a word's score is its share of how far the label's logit
rises from that empty caption to this one (positive: the word raised the label). A 64-token caption
costs one batch of ``WORD_STEPS`` captions forward and back, well under a second on a CPU.

Each side explains the logit the model really uses for that label: late fusion's image head for the
heatmap and its text head for the words; early fusion's one head for both, with the other input held
at its actual value; a single-modality model's only head. (A model with ``tta_flip`` also averages in
a flipped copy's features when it predicts; the heatmap covers the photo as given.)
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import torch
from PIL import Image

from .bundle import Bundle
from .data import build_transform
from .explanation import Explanation, caption_words, to_photo_frame
from .preprocess import Preprocess

# Integration steps for the caption's words: one batch of this many captions forward and back. Eight
# Gauss-Legendre steps keep a 64-token caption through MiniLM-L6 to about 0.4 s of one CPU core
# (word occlusion, one caption per word, took three times as long).
WORD_STEPS = 8


def explain(bundle: Bundle, label_index: int, image: Image.Image | None, caption: str | None) -> Explanation:
    """Heatmap and word scores for label ``label_index`` of one photo and/or caption (RGB PIL image, str)."""
    net = bundle.net.eval()
    kind = bundle.config.kind
    out = Explanation(label_index, method="gradients")
    caption = caption if caption and caption.strip() else None
    with torch.no_grad():
        context = _fixed_inputs(bundle, image, caption)
    if image is not None and net.image_encoder is not None:
        part = "image" if kind in ("image", "late") else "early"
        out.heatmap, out.heatmap_logit = _grad_cam(bundle, part, label_index, image, context)
        out.heatmap_target = f"{part} head logit"
    if caption is not None and net.text_encoder is not None:
        part = "text" if kind in ("text", "late") else "early"
        out.words, out.words_logit, out.words_baseline_logit = _word_attributions(
            bundle, part, label_index, caption, context
        )
        out.words_target = f"{part} head logit"
    return out


def _fixed_inputs(bundle: Bundle, image, caption) -> dict:
    """Features of each input as the model sees it, for holding one side still while the other is explained.

    A missing input is zero features with its ``*_present`` flag 0, as the predictor gives the heads
    (early fusion then ignores that side). Only early fusion reads the other side; for the other kinds
    zeros complete the batch and no encoder runs.
    """
    net = bundle.net
    early = bundle.config.kind == "early"
    fixed = {}
    if net.image_encoder is not None:
        fixed["image_present"] = torch.ones(1) if image is not None else torch.zeros(1)
        fixed["image_feat"] = (
            net.image_encoder(_pixels(bundle, image))
            if early and image is not None
            else torch.zeros(1, net.image_encoder.num_features)
        )
    if net.text_encoder is not None:
        fixed["caption_present"] = torch.ones(1) if caption is not None else torch.zeros(1)
        if early and caption is not None:
            tok = _tokenize(bundle, caption)
            fixed["text_feat"] = net.text_encoder(tok["input_ids"], tok["attention_mask"])
        else:
            fixed["text_feat"] = torch.zeros(1, net.text_encoder.num_features)
    return fixed


def _pixels(bundle: Bundle, image: Image.Image) -> torch.Tensor:
    return build_transform(Preprocess.of(bundle.preprocessing), train=False)(image).unsqueeze(0)


def _tokenize(bundle: Bundle, caption: str, offsets: bool = False):
    return bundle.tokenizer(
        caption,
        truncation=True,
        max_length=bundle.config.text_max_length,
        return_tensors="pt",
        return_offsets_mapping=offsets,
    )


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
        cam = LayerGradCam(logit, _cam_layer(net.image_encoder.backbone)).attribute(pixels, relu_attributions=True)
    with torch.no_grad():
        value = float(logit(pixels)[0])
    return to_photo_frame(cam.detach()[0, 0].float().numpy(), image.size, bundle.preprocessing), value


def _word_attributions(
    bundle: Bundle, part: str, label: int, caption: str, context: dict
) -> tuple[list[dict], float, float]:
    """Integrated gradients on the token embeddings, summed over each whitespace word's tokens.

    The baseline keeps [CLS] and [SEP] and puts [PAD] in every other place; the scores of all words
    add up to the logit minus the baseline's logit, up to the integral's error at ``WORD_STEPS`` steps.
    """
    from captum.attr import LayerIntegratedGradients

    net, tokenizer = bundle.net, bundle.tokenizer
    tok = _tokenize(bundle, caption, offsets=True)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    special = torch.tensor(
        tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True), dtype=torch.bool
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    baseline = torch.where(special, ids, torch.full_like(ids, pad))
    fixed = {k: v for k, v in context.items() if k != "text_feat"}

    def logit(input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        batch = {k: v.expand(n, *v.shape[1:]) for k, v in fixed.items()}
        batch["text_feat"] = net.text_encoder(input_ids, mask.expand(n, -1))
        return net.head(net.encode(batch))[part][:, label]

    with torch.enable_grad():
        tokens = LayerIntegratedGradients(logit, net.text_encoder.backbone.get_input_embeddings()).attribute(
            ids, baselines=baseline, n_steps=WORD_STEPS, internal_batch_size=WORD_STEPS
        )
    token_scores = tokens.detach()[0].sum(-1)
    with torch.no_grad():
        value, base = float(logit(ids)[0]), float(logit(baseline)[0])
    spans = caption_words(caption)
    starts = [s for s, _ in spans]
    by_word: dict[int, float] = {}
    for (start, end), score, is_special in zip(
        tok["offset_mapping"][0].tolist(), token_scores.tolist(), special.tolist()
    ):
        if end > start and not is_special:
            word = bisect_right(starts, start) - 1  # the word this token's first character falls in
            by_word[word] = by_word.get(word, 0.0) + score
    words = [{"text": caption[s:e], "start": s, "end": e, "score": by_word.get(i)} for i, (s, e) in enumerate(spans)]
    return words, value, base
