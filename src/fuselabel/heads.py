"""Classification heads (image, text, early and late fusion) and the whole network around them.

Every head maps pooled features to a dict of logits; ``probabilities`` turns that dict into
one probability per label, which is where the two late-fusion rules live.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .encoders import PooledImageEncoder, create_image_encoder, create_text_encoder


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    # LayerNorm first: image and text features arrive on very different scales.
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout / 2), nn.Linear(in_dim, hidden), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class SingleHead(nn.Module):
    """One modality, one MLP."""

    def __init__(self, modality: str, in_dim: int, num_labels: int, hidden: int, dropout: float):
        super().__init__()
        self.modality = modality
        self.net = mlp(in_dim, hidden, num_labels, dropout)

    def forward(self, feats: dict) -> dict:
        return {self.modality: self.net(feats[self.modality])}


class EarlyFusionHead(nn.Module):
    """Pooled image and text features joined, then one MLP."""

    def __init__(self, image_dim: int, text_dim: int, num_labels: int, hidden: int, dropout: float):
        super().__init__()
        self.norm_image, self.norm_text = nn.LayerNorm(image_dim), nn.LayerNorm(text_dim)
        self.net = mlp(image_dim + text_dim, hidden, num_labels, dropout)

    def forward(self, feats: dict) -> dict:
        joined = torch.cat([self.norm_image(feats["image"]), self.norm_text(feats["text"])], dim=-1)
        return {"early": self.net(joined)}


class LateFusionHead(nn.Module):
    """One head per modality, each trained on its own loss; combined only at probability level."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module):
        super().__init__()
        self.image, self.text = image_head, text_head

    def forward(self, feats: dict) -> dict:
        return {**self.image(feats), **self.text(feats)}


class LabelDecoderHead(nn.Module):
    """Heads that model relations between labels, over one token per modality.

    ``query``: a label-query attention decoder (ML-Decoder / Query2Label style): one learned
    query per label attends to the modality tokens, and the queries attend to each other, so
    one label's evidence can raise or lower another's.
    With image tokens (``image_tokens: true``) the queries also attend to every cell of the
    image's last feature map, each with a learned position: ML-Decoder's spatial attention.
    ``lstm``: labels predicted as a sequence (the seed's proposal): an LSTM conditioned on the
    fused features steps through the labels in vocabulary order and sees the previous label's
    probability, so each decision can depend on the ones before it.
    """

    def __init__(self, kind: str, dims: dict[str, int], num_labels: int, hidden: int, dropout: float,
                 decoder: str, token_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.kind, self.decoder, self.modalities = kind, decoder, list(dims)
        d = min(hidden, 256)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout / 2), nn.Linear(dim, d))
                                   for m, dim in dims.items()})
        self.spatial = decoder == "query" and token_shape is not None and "image" in dims
        if self.spatial:
            c, h, w = token_shape
            self.token_proj = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d))
            self.token_pos = nn.Parameter(torch.randn(h * w, d) * 0.02)
        if decoder == "query":
            self.modality_embed = nn.Parameter(torch.zeros(len(dims), d))
            self.queries = nn.Parameter(torch.randn(num_labels, d) * 0.02)
            layer = nn.TransformerDecoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=dropout, batch_first=True,
                                               norm_first=True)
            self.decoder_net = nn.TransformerDecoder(layer, num_layers=2)
            self.out = nn.Linear(d, 1)
        elif decoder == "lstm":
            self.num_labels = num_labels
            self.init = nn.Linear(d * len(dims), 2 * d)
            self.label_embed = nn.Embedding(num_labels, d)
            self.cell = nn.LSTMCell(d + 1, d)
            self.out = nn.Linear(2 * d, 1)
            self.context = nn.Linear(d * len(dims), d)
            self.drop = nn.Dropout(dropout)
        else:
            raise ValueError(f"unknown decoder {decoder!r}; choose mlp, query or lstm")

    def forward(self, feats: dict) -> dict:
        tokens = [self.proj[m](feats[m]) for m in self.modalities]
        if self.decoder == "query":
            memory = torch.stack(tokens, 1) + self.modality_embed
            if self.spatial:
                memory = torch.cat([memory, self.token_proj(feats["image_tokens"]) + self.token_pos], 1)
            queries = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
            logits = self.out(self.decoder_net(queries, memory)).squeeze(-1)
        else:
            joined = torch.cat(tokens, -1)
            h, c = self.init(joined).chunk(2, -1)
            context = self.context(joined)
            prev = torch.zeros(joined.shape[0], 1, device=joined.device, dtype=joined.dtype)
            steps = []
            for t in range(self.num_labels):
                h, c = self.cell(torch.cat([self.label_embed.weight[t] + context, prev], -1), (h, c))
                logit = self.out(torch.cat([self.drop(h), context], -1))
                steps.append(logit)
                prev = torch.sigmoid(logit)
            logits = torch.cat(steps, -1)
        return {self.kind: logits}


def build_head(config: Config, image_dim: int, text_dim: int, num_labels: int,
               token_shape: tuple[int, int, int] | None = None) -> nn.Module:
    h, p = config.hidden_dim, config.dropout

    def single(kind: str, dims: dict[str, int]) -> nn.Module:
        if config.decoder != "mlp":
            return LabelDecoderHead(kind, dims, num_labels, h, p, config.decoder, token_shape)
        if kind == "early":
            return EarlyFusionHead(image_dim, text_dim, num_labels, h, p)
        (modality, dim), = dims.items()
        return SingleHead(modality, dim, num_labels, h, p)

    if config.kind == "late":
        # The decoder setting shapes the image side; captions are one token, an MLP is all they need.
        text_head = SingleHead("text", text_dim, num_labels, h, p)
        return LateFusionHead(single("image", {"image": image_dim}), text_head)
    dims = {"image": image_dim, "text": text_dim}
    return single(config.kind, {m: d for m, d in dims.items() if m == config.kind or config.kind == "early"})


class FuseLabelNet(nn.Module):
    """Encoders + head. Works from raw inputs (pixels, token ids) or from cached features."""

    def __init__(self, config: Config, num_labels: int, pretrained: bool = True, vocab_size: int | None = None,
                 text_source: str | None = None):
        super().__init__()
        self.config = config
        self.image_encoder = self.text_encoder = None
        image_dim = text_dim = 0
        if config.uses_image:
            backbone = create_image_encoder(config.image_model, pretrained and config.image_pretrained,
                                            config.image_weights, **config.image_model_kwargs)
            self.image_encoder = PooledImageEncoder(backbone, config.image_layers, config.image_pool,
                                                    config.image_tokens, config.image_size)
            image_dim = self.image_encoder.pooled_features
        if config.uses_text:
            self.text_encoder = create_text_encoder(text_source or config.text_model, pretrained and config.text_pretrained,
                                                    config.text_config_overrides, vocab_size)
            text_dim = self.text_encoder.num_features
        token_shape = self.image_encoder.token_shape if self.image_encoder is not None else None
        self.head = build_head(config, image_dim, text_dim, num_labels, token_shape)
        # Image weight of the weighted late-fusion average; a buffer so it travels with the weights.
        self.register_buffer("late_weight", torch.tensor(0.5 if config.late_weight is None else config.late_weight))

    def encode(self, batch: dict) -> dict:
        feats = {}
        if self.image_encoder is not None:
            flat = batch["image_feat"] if "image_feat" in batch else self.image_encoder(batch["pixels"])
            feats["image"], tokens = self.image_encoder.split(flat)
            if tokens is not None:
                feats["image_tokens"] = tokens
        if self.text_encoder is not None:
            feats["text"] = batch["text_feat"] if "text_feat" in batch else self.text_encoder(
                batch["input_ids"], batch["attention_mask"])
        if "image" in feats and "image_present" in batch and self.config.kind == "early":
            # A caption-only row: no image evidence at all rather than features of a black frame.
            keep = batch["image_present"].to(feats["image"].dtype)
            feats["image"] = feats["image"] * keep.unsqueeze(-1)
            if "image_tokens" in feats:
                feats["image_tokens"] = feats["image_tokens"] * keep[:, None, None]
        return feats

    def forward(self, batch: dict) -> dict:
        return self.head(self.encode(batch))

    def probabilities(self, logits: dict, image_present: torch.Tensor | None = None) -> torch.Tensor:
        parts = {k: torch.sigmoid(v.float()) for k, v in logits.items()}
        return combine_probabilities(parts, self.config.late_combine, self.late_weight, image_present)


def combine_probabilities(parts: dict, combine: str = "weighted", weight=0.5,
                          image_present: torch.Tensor | None = None) -> torch.Tensor:
    """One probability per label from per-head probabilities (late fusion's two rules live here)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    p_img, p_txt = parts["image"], parts["text"]
    if combine == "union":
        # The union of two thresholded sets under one threshold t is exactly {max(p_img, p_txt) >= t},
        # so the max lets thresholds be tuned and stored like any other model's.
        fused = torch.maximum(p_img, p_txt)
    else:
        w = torch.as_tensor(weight, dtype=p_img.dtype, device=p_img.device)
        fused = w * p_img + (1 - w) * p_txt
    if image_present is not None:
        # A caption-only row is judged by its caption alone.
        fused = torch.where(image_present.to(fused.device).bool().unsqueeze(-1), fused, p_txt)
    return fused
