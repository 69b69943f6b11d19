"""The whole network: image and text encoders around a head.

``FuseLabelNet`` works from raw inputs (pixels, token ids) or from cached features. Its per-head
probabilities are fused by the prediction path's rule (``runtime.fuse``), in training's validation too.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .encoders import PooledImageEncoder, create_image_encoder, create_text_encoder
from .heads import build_head


class FuseLabelNet(nn.Module):
    """Encoders + head. Works from raw inputs (pixels, token ids) or from cached features."""

    def __init__(
        self,
        config: Config,
        num_labels: int,
        pretrained: bool = True,
        vocab_size: int | None = None,
        text_source: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.image_encoder = self.text_encoder = None
        image_dim = text_dim = 0
        if config.uses_image:
            backbone = create_image_encoder(
                config.image_model,
                pretrained and config.image_pretrained,
                config.image_weights,
                **config.image_model_kwargs,
            )
            self.image_encoder = PooledImageEncoder(
                backbone, config.image_layers, config.image_pool, config.image_tokens, config.image_size
            )
            image_dim = self.image_encoder.pooled_features
        if config.uses_text:
            self.text_encoder = create_text_encoder(
                text_source or config.text_model,
                pretrained and config.text_pretrained,
                config.text_config_overrides,
                vocab_size,
            )
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
            feats["text"] = (
                batch["text_feat"]
                if "text_feat" in batch
                else self.text_encoder(batch["input_ids"], batch["attention_mask"])
            )
        if "image" in feats and "image_present" in batch and self.config.kind == "early":
            # A caption-only row: no image evidence at all rather than features of a black frame.
            keep = batch["image_present"].to(feats["image"].dtype)
            feats["image"] = feats["image"] * keep.unsqueeze(-1)
            if "image_tokens" in feats:
                feats["image_tokens"] = feats["image_tokens"] * keep[:, None, None]
        if "text" in feats and "caption_present" in batch and self.config.kind == "early":
            # A photo-only row (empty or hidden caption): no text evidence, as for a missing photo above.
            feats["text"] = feats["text"] * batch["caption_present"].to(feats["text"].dtype).unsqueeze(-1)
        return feats

    def forward(self, batch: dict) -> dict:
        return self.head(self.encode(batch))
