"""Every setting of a run, in one flat dataclass, plus the named presets.

One flat namespace keeps the command line, the YAML files and the saved model config
in one-to-one correspondence: a key means the same thing everywhere it appears.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_KINDS = ("image", "text", "early", "late")
LATE_COMBINES = ("weighted", "union")
DECODERS = ("mlp", "query", "lstm")
REGIMES = ("auto", "frozen", "hybrid", "finetune")
THRESHOLD_METHODS = ("global", "per_class", "balanced")
AUGMENTS = ("seed", "none", "trivial", "randaugment", "colorjitter")
LOSSES = ("bce", "focal", "asl")
SAMPLERS = ("none", "oversample")
MISSING_IMAGE_POLICIES = ("error", "caption_only")


@dataclass
class Config:
    # what to build
    kind: str = "late"                      # image | text | early | late
    late_combine: str = "weighted"          # weighted | union
    late_weight: float | None = None        # image weight in the weighted average; None = tuned on validation
    image_model: str = "tf_efficientnet_lite2"
    image_pretrained: bool = True
    image_weights: str | None = None        # local checkpoint for backbones no package ships
    # The whole photo at 320 px, the course photos' own longest side: a frozen network sees objects larger
    # than at its 260 px training size (the FixRes effect): +0.0036 ± 0.0017 mean F1 over 7 seeds against
    # the backbone's own 260 px centre crop (configs/resolution.yaml, docs/results.md).
    image_size: int | None = 320            # None = the backbone's own input size
    image_crop_pct: float | None = 1.0      # None = the backbone's own centre crop; 1.0 keeps the whole photo
    image_model_kwargs: dict = field(default_factory=dict)   # passed to timm.create_model
    image_pool: str = "avg"                 # avg | avgmax (max pooling keeps small objects)
    image_layers: int = 1                   # >1 adds pooled outputs of earlier stages
    image_tokens: bool = False              # keep the last feature map for decoder="query" (spatial attention)
    text_model: str = "minilm-l6"           # alias, Hugging Face name or local folder
    text_pretrained: bool = True
    text_max_length: int = 64
    word_dropout: float = 0.0               # caption augmentation when the text encoder trains
    text_config_overrides: dict = field(default_factory=dict)  # e.g. tiny configs for tests
    decoder: str = "mlp"                    # mlp | query | lstm: label relations (for late: the image head)
    hidden_dim: int = 512
    dropout: float = 0.3

    # how to train
    # auto = frozen on CPU, finetune on GPU; hybrid = cached image features + a fine-tuned text encoder
    regime: str = "auto"
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3                        # heads
    lr_image: float = 1e-4                  # backbones, finetune only
    lr_text: float = 5e-5
    weight_decay: float = 1e-4
    loss: str = "bce"
    loss_kwargs: dict = field(default_factory=dict)
    pos_weight: bool = False
    sampler: str = "none"
    oversample_power: float = 0.5
    augment: str = "seed"
    patience: int = 8
    seed: int = 42
    val_fraction: float = 0.1
    missing_images: str = "error"

    # where and on what
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None            # None = bf16-mixed on GPU, 32 on CPU
    num_workers: int | None = None          # None = number of CPU cores
    feature_engine: str = "auto"            # auto | onnx | torch: runtime of frozen-feature extraction on CPU
    cache_dir: str | None = None            # frozen-feature cache; None = ~/.cache/fuselabel
    max_steps: int = -1                     # for smoke tests
    tta_flip: bool = False
    # fast data path (fuselabel.gpu)
    image_cache: str = "none"               # none | memory: finetune decodes each image once, augments on the device
    gpu_decode: bool = True                 # on a GPU, decode JPEGs with nvJPEG (image cache); False = PIL workers

    # decisions
    threshold_method: str = "global"
    ensure_nonempty: bool = True

    # the saved model folder
    save_dtype: str = "fp16"                # fp32 | fp16 | int8 (weight-only int8 matrices, the rest fp16)
    max_size_mb: float = 100.0

    def __post_init__(self) -> None:
        # 0 on the command line means "the backbone's own", which the settings spell None
        self.image_size = self.image_size or None
        self.image_crop_pct = self.image_crop_pct or None
        self.validate()

    def validate(self) -> None:
        choices = {
            "kind": MODEL_KINDS, "late_combine": LATE_COMBINES, "regime": REGIMES,
            "threshold_method": THRESHOLD_METHODS, "augment": AUGMENTS, "loss": LOSSES,
            "sampler": SAMPLERS, "missing_images": MISSING_IMAGE_POLICIES,
            "save_dtype": ("fp32", "fp16", "int8"), "feature_engine": ("auto", "onnx", "torch"), "decoder": DECODERS,
            "image_cache": ("none", "memory"),  # fast data path (fuselabel.gpu)
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        if self.image_tokens and self.tta_flip:
            raise ValueError("image_tokens and tta_flip do not mix: flipped feature maps would be averaged out of place")
        if self.late_weight is not None and not 0.0 <= self.late_weight <= 1.0:
            raise ValueError(f"late_weight must lie in [0, 1], got {self.late_weight}")

    @property
    def uses_image(self) -> bool:
        return self.kind in ("image", "early", "late")

    @property
    def uses_text(self) -> bool:
        return self.kind in ("text", "early", "late")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


# Presets are partial dicts over Config's defaults so a user can read exactly what each changes.
PRESETS: dict[str, dict] = {
    # frozen Lite0 features, whole photo at Lite0's own 224 px: the quickest sensible model on a laptop
    "cpu-fast": dict(image_model="tf_efficientnet_lite0", image_size=None, regime="frozen", epochs=30),
    # the default, spelled out
    "cpu": dict(regime="frozen"),
    # the whole photo upsampled to 384 px: 1.4x the extraction time of "cpu", the best frozen figure measured
    "cpu-best": dict(regime="frozen", kind="late", image_size=384, image_crop_pct=1.0, threshold_method="global"),
    # fine-tuning at the backbone's own 260 px with random resized crops (augmentation does the zooming)
    "gpu-best": dict(regime="finetune", kind="late", image_size=260, image_crop_pct=None, epochs=12,
                     batch_size=128, lr=1e-3, lr_image=3e-4, lr_text=5e-5, augment="seed",
                     precision="bf16-mixed", image_cache="memory"),
    # the course seed: EfficientNet-B3 + ALBERT-base, Table 1 settings. Needs their weights (hub or local).
    "seed": dict(image_model="efficientnet_b3", image_size=None, image_crop_pct=None, text_model="albert-base-v2",
                 regime="finetune", kind="late",
                 late_combine="union", epochs=10, batch_size=32, lr=1e-4, lr_image=1e-4, lr_text=2e-5,
                 threshold_method="balanced", augment="seed"),
}


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return data


def build_config(preset: str | None = None, yaml_path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then a preset, then a YAML file, then explicit overrides (None means 'not given')."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if yaml_path:
        values.update(load_yaml(yaml_path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config.from_dict(values, source=str(yaml_path or "settings"))

