"""Classification heads (image, text, early and late fusion, label decoder) and ``build_head``.

Every head maps pooled features to a dict of logits; fuselabel.network turns that dict into one
probability per label, which is where the two late-fusion rules live.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    # LayerNorm first: image and text features arrive on very different scales.
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Dropout(dropout / 2),
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


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

    def __init__(
        self,
        kind: str,
        dims: dict[str, int],
        num_labels: int,
        hidden: int,
        dropout: float,
        decoder: str,
        token_shape: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        self.kind, self.decoder, self.modalities = kind, decoder, list(dims)
        d = min(hidden, 256)
        self.proj = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout / 2), nn.Linear(dim, d)) for m, dim in dims.items()}
        )
        self.spatial = decoder == "query" and token_shape is not None and "image" in dims
        if self.spatial:
            c, h, w = token_shape
            self.token_proj = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d))
            self.token_pos = nn.Parameter(torch.randn(h * w, d) * 0.02)
        if decoder == "query":
            self.modality_embed = nn.Parameter(torch.zeros(len(dims), d))
            self.queries = nn.Parameter(torch.randn(num_labels, d) * 0.02)
            layer = nn.TransformerDecoderLayer(
                d, nhead=4, dim_feedforward=2 * d, dropout=dropout, batch_first=True, norm_first=True
            )
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


def build_head(
    config: Config, image_dim: int, text_dim: int, num_labels: int, token_shape: tuple[int, int, int] | None = None
) -> nn.Module:
    h, p = config.hidden_dim, config.dropout

    def single(kind: str, dims: dict[str, int]) -> nn.Module:
        if config.decoder != "mlp":
            return LabelDecoderHead(kind, dims, num_labels, h, p, config.decoder, token_shape)
        if kind == "early":
            return EarlyFusionHead(image_dim, text_dim, num_labels, h, p)
        ((modality, dim),) = dims.items()
        return SingleHead(modality, dim, num_labels, h, p)

    if config.kind == "late":
        # The decoder setting shapes the image side; captions are one token, an MLP is all they need.
        text_head = SingleHead("text", text_dim, num_labels, h, p)
        return LateFusionHead(single("image", {"image": image_dim}), text_head)
    dims = {"image": image_dim, "text": text_dim}
    return single(config.kind, {m: d for m, d in dims.items() if m == config.kind or config.kind == "early"})
