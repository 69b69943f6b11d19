"""Every setting of a run, typed, in one flat namespace, plus the named presets.

One flat namespace keeps the command line, the YAML files and the keyword arguments of
``FuseLabel`` in one-to-one correspondence: a key means the same thing everywhere it appears.
Each key belongs to one of three groups, and the groups are stored apart:

- ``model``: what a model *is* (architecture, preprocessing, decision rule): saved in the model folder;
- ``run``: how one training run went (optimiser, epochs, seed, split): saved as the run's record;
- ``runtime``: where it runs (devices, workers, cache folder): never saved, so a model folder
  carries no path or device of the machine that trained it.

Values are converted to their declared type or refused with the key named (pydantic), before
any work starts: ``lr="1e-4"`` becomes 1e-4; ``epochs="ten"`` and ``batch_size=-3`` are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.dataclasses import dataclass

MODEL_KINDS = ("image", "text", "early", "late")
LATE_COMBINES = ("weighted", "union")
DECODERS = ("mlp", "query", "lstm")
REGIMES = ("auto", "frozen", "hybrid", "finetune")
THRESHOLD_METHODS = ("global", "per_class", "balanced")
AUGMENTS = ("seed", "none", "trivial", "randaugment", "colorjitter")
LOSSES = ("bce", "focal", "asl")
SAMPLERS = ("none", "oversample")
MISSING_IMAGE_POLICIES = ("error", "caption_only")

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


def _group(name: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A field tagged with its group (model | run | runtime)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"group": name})
    return dataclasses.field(default=default, metadata={"group": name})


def model(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    return _group("model", default, factory)


def run(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    return _group("run", default, factory)


def runtime(default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    return _group("runtime", default, factory)


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=False))
class Config:
    # ---- what the model is (saved with it) ----
    kind: Literal["image", "text", "early", "late"] = model("late")
    # multiclass: exactly one label a row; softmax heads, cross-entropy, the arg-max label (no thresholds)
    task: Literal["multilabel", "multiclass"] = model("multilabel")
    late_combine: Literal["weighted", "union"] = model("weighted")
    late_weight: Optional[Share] = model(None)  # image weight in the weighted average; None = tuned on validation
    image_model: str = model("tf_efficientnet_lite2")
    # The whole photo at 320 px, the course photos' own longest side: a frozen network sees objects larger
    # than at its 260 px training size (the FixRes effect): +0.0036 ± 0.0017 mean F1 over 7 seeds against
    # the backbone's own 260 px centre crop (configs/resolution.yaml, docs/results.md).
    image_size: Optional[NonNegative] = model(320)  # None (or 0) = the backbone's own input size
    image_crop_pct: Optional[Share] = model(1.0)  # None (or 0) = the backbone's own crop; 1.0 = whole photo
    image_model_kwargs: dict = model(factory=dict)  # passed to timm.create_model
    image_pool: Literal["avg", "avgmax"] = model("avg")  # max pooling keeps small objects
    image_layers: Positive = model(1)  # >1 adds pooled outputs of earlier stages
    image_tokens: bool = model(False)  # keep the last feature map for decoder="query"
    # int8: the frozen image encoder quantised statically (QDQ), calibrated on training photos, for training
    # features and prediction alike; its ranges are saved with the preprocessing (onnxruntime, CPU)
    image_quant: Literal["none", "int8"] = model("none")
    text_model: str = model("minilm-l6")  # alias, Hugging Face name or local folder
    # int8: the frozen text encoder's matrices in int8 with activations quantised per caption at run time
    # (dynamic; onnxruntime, CPU), for training features and prediction alike; no calibration needed
    text_quant: Literal["none", "int8"] = model("none")
    # Caption tokens kept (special tokens included); None = chosen at fit from the training captions
    # (their 99th percentile, rounded up to a multiple of 16, within the encoder's limit) and saved as a number.
    text_max_length: Optional[Positive] = model(None)
    text_config_overrides: dict = model(factory=dict)  # e.g. tiny configs for tests
    decoder: Literal["mlp", "query", "lstm"] = model("mlp")  # label relations (for late: the image head)
    hidden_dim: Positive = model(512)
    dropout: Share = model(0.3)
    tta_flip: bool = model(False)
    threshold_method: Literal["global", "per_class", "balanced"] = model("global")
    ensure_nonempty: bool = model(True)
    save_dtype: Literal["fp32", "fp16", "int8"] = model("fp16")  # int8: weight-only int8 matrices, the rest fp16

    # ---- how one run trains (saved as the run's record) ----
    image_pretrained: bool = run(True)
    image_weights: Optional[str] = run(None)  # local checkpoint for backbones no package ships
    text_pretrained: bool = run(True)
    # auto = frozen on CPU, finetune on GPU; hybrid = cached image features + a fine-tuned text encoder
    regime: Literal["auto", "frozen", "hybrid", "finetune"] = run("auto")
    epochs: Positive = run(40)
    batch_size: Positive = run(256)
    lr: PositiveFloat = run(1e-3)  # heads
    lr_image: PositiveFloat = run(1e-4)  # backbones, finetune only
    lr_text: PositiveFloat = run(5e-5)
    weight_decay: NonNegativeFloat = run(1e-4)
    loss: Literal["bce", "focal", "asl"] = run("bce")
    loss_kwargs: dict = run(factory=dict)
    pos_weight: bool = run(False)
    sampler: Literal["none", "oversample"] = run("none")
    oversample_power: NonNegativeFloat = run(0.5)
    augment: Literal["seed", "none", "trivial", "randaugment", "colorjitter"] = run("seed")
    word_dropout: Share = run(0.0)  # caption augmentation when the text encoder trains
    # Share of training rows whose photo or caption is hidden, so fusion learns to cope with a missing input.
    modality_dropout: Share = run(0.0)
    patience: Positive = run(8)
    seed: NonNegative = run(42)
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = run(0.1)
    missing_images: Literal["error", "caption_only"] = run("error")
    max_steps: int = run(-1)  # for smoke tests
    max_size_mb: PositiveFloat = run(100.0)

    # ---- where it runs (never saved) ----
    accelerator: str = runtime("auto")
    devices: Union[int, list[int], str] = runtime("auto")
    num_nodes: Positive = runtime(1)
    strategy: str = runtime("auto")
    precision: Optional[str] = runtime(None)  # None = bf16-mixed on GPU, 32 on CPU
    num_workers: Optional[NonNegative] = runtime(None)  # None = number of CPU cores
    feature_engine: Literal["auto", "onnx", "torch"] = runtime("auto")  # frozen-feature runtime on CPU
    cache_dir: Optional[str] = runtime(None)  # frozen-feature cache; None = ~/.cache/fuselabel
    image_cache: Literal["none", "memory"] = runtime("none")  # finetune: decode each photo once, augment on device
    gpu_decode: bool = runtime(True)  # on a GPU, decode JPEGs with nvJPEG; False = PIL workers
    logger: Literal["none", "csv", "tensorboard", "mlflow"] = runtime("none")  # experiment tracker of the run
    log_dir: Optional[str] = runtime(None)  # where the tracker writes; None = OUT.logs beside the model

    @field_validator("image_size", "image_crop_pct", mode="before")
    @classmethod
    def _zero_is_own(cls, value):
        # 0 on the command line means "the backbone's own", which the settings spell None
        return None if value in (0, "0", 0.0) else value

    def __post_init__(self) -> None:
        if self.image_tokens and self.tta_flip:
            raise ValueError(
                "image_tokens and tta_flip do not mix: flipped feature maps would be averaged out of place"
            )
        if self.image_quant == "int8" and self.regime == "finetune":
            raise ValueError(
                "image_quant='int8' quantises a frozen image encoder; with regime='finetune' the "
                "encoder trains: use regime='frozen' (as --preset cpu-int8 does) or image_quant='none'"
            )
        if self.text_quant == "int8" and self.regime in ("finetune", "hybrid"):
            raise ValueError(
                f"text_quant='int8' quantises a frozen text encoder; with regime={self.regime!r} the "
                "encoder trains: use regime='frozen' (as --preset cpu-int8 does) or text_quant='none'"
            )
        if self.task == "multiclass" and self.loss == "asl":
            raise ValueError(
                "loss='asl' is a multi-label loss (it discounts easy negatives of independent labels); "
                "with task='multiclass' use loss='bce' (trained as cross-entropy) or 'focal'"
            )

    def validate(self) -> None:
        """Re-check every value (after attributes were set by hand)."""
        Config.from_dict(self.to_dict())

    @property
    def uses_image(self) -> bool:
        return self.kind in ("image", "early", "late")

    @property
    def uses_text(self) -> bool:
        return self.kind in ("text", "early", "late")

    def replace(self, **changes: Any) -> Config:
        return Config.from_dict({**self.to_dict(), **changes})

    def to_dict(self, group: str | None = None) -> dict:
        """Every setting, or those of one group (model | run | runtime)."""
        values = dataclasses.asdict(self)
        if group is None:
            return values
        return {f.name: values[f.name] for f in fields(self) if f.metadata["group"] == group}

    def saved(self) -> dict:
        """The model and run groups as written into a model folder: no machine's absolute paths."""
        return {"model": self.to_dict("model"), "run": {k: _portable(v) for k, v in self.to_dict("run").items()}}

    @classmethod
    def from_dict(cls, values: dict, source: str = "settings") -> Config:
        check_keys(values, source)
        try:
            return cls(**values)
        except ValidationError as err:
            raise ValueError(_explain(err, source)) from None


def check_keys(keys, source: str = "settings", groups: tuple[str, ...] | None = None) -> None:
    """The one check of setting names: an unknown key, or (with ``groups``) a key of another group, is refused
    with its name and the keys that would do."""
    known = {f.name: f.metadata["group"] for f in fields(Config)}
    unknown = sorted(k for k in keys if k not in known)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if groups is not None:
        other = sorted(k for k in keys if known[k] not in groups)
        if other:
            allowed = sorted(k for k, g in known.items() if g in groups)
            raise ValueError(
                f"{source}: {', '.join(other)} cannot be set here ({' or '.join(groups)} settings "
                f"only: {', '.join(allowed)})"
            )


def group_of(key: str) -> str:
    for f in fields(Config):
        if f.name == key:
            return f.metadata["group"]
    raise KeyError(key)


def _portable(value):
    """A path-like setting reduced to its last part, so no machine's folders travel with a model."""
    if isinstance(value, str) and (value.startswith("/") or value.startswith("~") or "\\" in value):
        return Path(value).name
    return value


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "settings"
        got = e.get("input")
        lines.append(f"{key}={got!r}: {e['msg']}")
    return f"{source}: invalid setting " + "; ".join(lines)


# Presets are partial dicts over Config's defaults so a user can read exactly what each changes.
PRESETS: dict[str, dict] = {
    # frozen Lite0 features, whole photo at Lite0's own 224 px: the quickest sensible model on a laptop
    "cpu-fast": dict(image_model="tf_efficientnet_lite0", image_size=None, regime="frozen", epochs=30),
    # the default, spelled out
    "cpu": dict(regime="frozen"),
    # the whole photo upsampled to 384 px: 1.4x the extraction time of "cpu", the best frozen figure measured
    "cpu-best": dict(regime="frozen", kind="late", image_size=384, image_crop_pct=1.0, threshold_method="global"),
    # the default with both encoders in int8: the image encoder static (calibrated on the training photos),
    # the text encoder dynamic; the heads train on the int8 features they will see. On an AVX2 CPU: 2.0x the
    # default's prediction speed, held-out mean F1 within 0.001 of it over three seeds (docs/results.md)
    "cpu-int8": dict(regime="frozen", image_quant="int8", text_quant="int8"),
    # fine-tuning at the backbone's own 260 px with random resized crops (augmentation does the zooming)
    "gpu-best": dict(
        regime="finetune",
        kind="late",
        image_size=260,
        image_crop_pct=None,
        epochs=12,
        batch_size=128,
        lr=1e-3,
        lr_image=3e-4,
        lr_text=5e-5,
        augment="seed",
        precision="bf16-mixed",
        image_cache="memory",
    ),
    # the course seed: EfficientNet-B3 + ALBERT-base, Table 1 settings. Needs their weights (hub or local).
    "seed": dict(
        image_model="efficientnet_b3",
        image_size=None,
        image_crop_pct=None,
        text_model="albert-base-v2",
        regime="finetune",
        kind="late",
        late_combine="union",
        epochs=10,
        batch_size=32,
        lr=1e-4,
        lr_image=1e-4,
        lr_text=2e-5,
        threshold_method="balanced",
        augment="seed",
    ),
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


# What each setting does, for the command line's help (every setting is a flag: --image-size for image_size).
HELP: dict[str, str] = {
    "kind": "image | text | early (features joined, one head) | late (one head per modality, combined)",
    "task": "multilabel (any number of labels a row) | multiclass (exactly one: softmax, the most probable label)",
    "late_combine": "late fusion rule: weighted (average of the heads) | union (either head's label set)",
    "late_weight": "image weight in the weighted late fusion (none: tuned on the validation rows)",
    "image_model": "timm model name of the image encoder (packaged weights: tf_efficientnet_lite0/1/2)",
    "image_size": "input side in pixels (0 or none: the backbone's own)",
    "image_crop_pct": "centre-crop share (1.0: the whole photo, squashed; 0 or none: the backbone's own)",
    "image_model_kwargs": "extra keywords for timm.create_model, as YAML ({drop_rate: 0.2})",
    "image_pool": "pooling of the image feature map: avg | avgmax (max keeps small objects)",
    "image_layers": "pool this many feature stages (more than 1 adds earlier stages)",
    "image_tokens": "keep the last feature map as tokens for --decoder query",
    "image_quant": "none | int8 (frozen image encoder in static int8, calibrated on training photos; CPU)",
    "text_model": "text encoder: minilm-l6 (packaged), a Hugging Face name or a local folder",
    "text_quant": "none | int8 (frozen text encoder's matrices in int8, activations quantised per caption; CPU)",
    "text_max_length": "tokens of text kept (none: the 99th percentile of the training texts, up to the "
    "encoder's limit)",
    "text_config_overrides": "changes to the text encoder's config, as YAML (e.g. {num_hidden_layers: 2})",
    "decoder": "head for the image, text and early kinds (for late: the image head): mlp | query | lstm",
    "hidden_dim": "width of the heads' hidden layer",
    "dropout": "dropout in the heads",
    "tta_flip": "average the features of each photo and its mirror image",
    "threshold_method": "decision rule tuned for F1: global | per_class | balanced (false positives ≈ false negatives)",
    "ensure_nonempty": "give every row at least its most probable label",
    "save_dtype": "weight storage in the model folder: fp16 | int8 | fp32",
    "image_pretrained": "start the image encoder from pretrained weights",
    "image_weights": "local checkpoint (.pth or .safetensors) for an image backbone no package ships",
    "text_pretrained": "start the text encoder from pretrained weights",
    "regime": "auto (frozen on a CPU, finetune on a GPU) | frozen | hybrid (image features cached, text "
    "encoder trains) | finetune",
    "epochs": "most training epochs (early stopping may end sooner)",
    "batch_size": "rows per training batch",
    "lr": "learning rate of the heads",
    "lr_image": "learning rate of the image encoder (finetune)",
    "lr_text": "learning rate of the text encoder (hybrid, finetune)",
    "weight_decay": "AdamW weight decay",
    "loss": "bce | focal | asl (multiclass: bce is cross-entropy, focal its focal form)",
    "loss_kwargs": "keywords of the loss, as YAML (e.g. {gamma: 2})",
    "pos_weight": "weigh rare labels up in the loss (multiclass: class weights)",
    "sampler": "none | oversample (rows with rare labels drawn more often)",
    "oversample_power": "strength of oversampling (0: none, 1: inverse frequency)",
    "augment": "photo augmentation when the image encoder trains: seed | none | trivial | randaugment | colorjitter",
    "word_dropout": "share of words dropped from texts when the text encoder trains",
    "modality_dropout": "share of training rows whose photo or text is hidden, so fusion copes with one input",
    "patience": "epochs without a better validation mean F1 before stopping",
    "seed": "random seed (split, initial weights, batches)",
    "val_fraction": "share of rows held out for validation when no --val-csv or --split-col is given",
    "missing_images": "a training row whose photo is unusable: error | caption_only (trained from its text)",
    "max_steps": "stop after this many optimiser steps (-1: no limit)",
    "max_size_mb": "largest model folder allowed, in MB",
    "accelerator": "cpu | gpu | auto (Lightning's accelerator)",
    "devices": "devices or processes (Lightning's devices: a number, a list such as 0,1, or auto)",
    "num_nodes": "machines taking part (under SLURM or torchrun)",
    "strategy": "Lightning strategy when several devices take part (auto, ddp, ...)",
    "precision": "training precision (none: bf16-mixed on a GPU, 32 on a CPU)",
    "num_workers": "worker processes or threads reading photos (none: the cores this process may use)",
    "feature_engine": "what runs frozen encoders on a CPU: auto | onnx (onnxruntime) | torch",
    "cache_dir": "fuselabel's cache of frozen features and encoder graphs (none: $FUSELABEL_CACHE, else "
    "$XDG_CACHE_HOME/fuselabel, else ~/.cache/fuselabel)",
    "image_cache": "finetune: none | memory (decode each photo once, augment on the device)",
    "gpu_decode": "on a GPU, decode JPEGs with nvJPEG for the image cache",
    "logger": "experiment tracker the run's losses and validation mean F1 go to: none | csv | tensorboard | mlflow",
    "log_dir": "folder the tracker writes to (none: OUT.logs beside the model folder)",
}


# The service's limits (``fuselabel serve`` flags, ``serve.create_app`` keywords): default and meaning. A decoding
# photo costs 4 bytes a pixel (Pillow's RGB) before it is reduced, so the service's pixel limit (lower than the
# library's 64 megapixels) times the decoding threads bounds that memory: 2 x 25 MP x 4 B = 200 MB. A
# 24-megapixel camera photo still opens.
SERVE_LIMITS: dict[str, tuple[float | int, str]] = {
    "max_upload_mb": (10.0, "largest request body"),
    "max_batch": (32, "most items in one /predict/batch request"),
    "max_megapixels": (25.0, "photos with more pixels are refused (415) before they are decoded"),
    "decode_workers": (2, "threads decoding photos (each holds one at full size)"),
    "max_concurrency": (4, "prediction requests at work at once"),
    "max_queue": (32, "prediction requests waiting for a turn; beyond it, 503 with Retry-After"),
    "queue_timeout": (30.0, "seconds a request may wait before its 503"),
    "body_timeout": (60.0, "seconds for a request body to arrive (else 408)"),
}


class ServeSettings(BaseModel):
    """Every setting of ``fuselabel serve`` and ``serve.create_app``: where it listens, its limits, who may call it.

    Where the model runs (``cache_dir``, ``feature_engine``, ``num_workers``) is ``Config``'s runtime group, not
    here. A decoding photo costs 4 bytes a pixel (Pillow's RGB) before it is reduced, so the pixel limit (lower
    than the library's 64 megapixels) times the decoding threads bounds that memory: 2 x 25 MP x 4 B = 200 MB;
    a 24-megapixel camera photo still opens.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="port to listen on")
    workers: Positive = Field(1, description="processes, each with the model loaded (more cores)")
    json_logs: bool = Field(False, description="one JSON object a log line")
    max_connections: Positive = Field(2048, description="open connections (beyond them, 503)")
    header_timeout: PositiveFloat = Field(
        10.0, description="seconds for a request head to arrive (else the connection is closed)"
    )
    max_upload_mb: PositiveFloat = Field(10.0, description="largest request body, in MB (beyond it, 413)")
    max_batch: Positive = Field(32, description="most items in one /predict/batch request")
    max_megapixels: PositiveFloat = Field(
        25.0, description="photos with more pixels are refused (415) before they are decoded"
    )
    decode_workers: Positive = Field(2, description="threads decoding photos (each holds one at full size)")
    max_concurrency: Positive = Field(4, description="prediction requests at work at once")
    max_queue: NonNegative = Field(32, description="prediction requests waiting for a turn; beyond it, 503")
    queue_timeout: PositiveFloat = Field(30.0, description="seconds a request may wait before its 503")
    body_timeout: PositiveFloat = Field(60.0, description="seconds for a request body to arrive (else 408)")
    api_key: Optional[SecretStr] = Field(
        None,
        description="a key every prediction route requires (header X-API-Key or Authorization: Bearer); "
        "default $FUSELABEL_API_KEY; /health stays open",
    )
    api_key_file: Optional[str] = Field(None, description="a file whose first line is the key (instead of --api-key)")
    cors_origin: list[str] = Field(
        default_factory=list, description="an origin whose pages may call the service from a browser (repeat it)"
    )
