"""Every setting of a run, typed, in one flat namespace.

One flat namespace keeps the command line, the YAML files and the keyword arguments of
``FuseLabel`` in one-to-one correspondence: a key means the same thing everywhere it appears.
Each key belongs to one of three groups, and the groups are stored apart:

- ``model``: what a model *is* (architecture, preprocessing, decision rule): saved in the model folder;
- ``run``: how one training run went (optimiser, epochs, seed, split): saved as the run's record;
- ``runtime``: where it runs (devices, workers, cache folder): never saved, so a model folder
  carries no path or device of the machine that trained it.

Each setting is one field: its type (the ``Literal`` lists its choices), default, description (the command line's
help) and group, in that one place; ``fuselabel.flags`` turns the fields into flags. Values are converted to their
declared type or refused with the key named (pydantic), before any work starts: ``lr="1e-4"`` becomes 1e-4;
``epochs="ten"`` and ``batch_size=-3`` are refused.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from .presets import PRESETS

# How a model explains a label: by covering parts of its inputs, or by its gradients (``FuseLabel.explain``).
ExplainMethod = Literal["occlusion", "gradients"]

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]
ThresholdMethod = Literal["global", "per_class", "balanced"]
THRESHOLD_METHODS: tuple[str, ...] = typing.get_args(ThresholdMethod)


def setting(group: str, default: Any, description: str, **extra: Any):
    """One setting's field: default (a ``dict`` default means a fresh empty mapping each time), the description
    the command line shows, and its group (model | run | runtime); ``extra`` carries what ``fuselabel.flags``
    reads (``aliases``: earlier spellings of the flag)."""
    meta = {"group": group, **extra}
    if default is dict:
        return Field(default_factory=dict, description=description, json_schema_extra=meta)
    return Field(default, description=description, json_schema_extra=meta)


def model(default: Any, description: str, **extra: Any):
    return setting("model", default, description, **extra)


def run(default: Any, description: str, **extra: Any):
    return setting("run", default, description, **extra)


def runtime(default: Any, description: str, **extra: Any):
    return setting("runtime", default, description, **extra)


@dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=False))
class Config:
    """Every setting of one model, its training run and where it runs, each checked against its declared type.

    Built by ``build_config`` (defaults, a preset, a YAML file, then overrides) or ``Config.from_dict``; stored
    apart by group (``to_dict(group)``, ``saved()``). Cross-setting rules are checked at construction.
    """

    # ---- what the model is (saved with it) ----
    kind: Literal["image", "text", "early", "late"] = model(
        "late", "image | text | early (features joined, one head) | late (one head per modality, combined)"
    )
    # multiclass: softmax heads, cross-entropy, the arg-max label (no thresholds)
    task: Literal["multilabel", "multiclass"] = model(
        "multilabel",
        "multilabel (any number of labels a row) | multiclass (exactly one: softmax, the most probable label)",
    )
    late_combine: Literal["weighted", "union"] = model(
        "weighted",
        "late fusion rule: weighted (average of the heads) | union (either head's label set)",
        aliases=("--fusion",),
    )
    late_weight: Optional[Share] = model(
        None, "image weight in the weighted late fusion (none: tuned on the validation rows)"
    )
    image_model: str = model(
        "tf_efficientnet_lite2", "timm model name of the image encoder (packaged weights: tf_efficientnet_lite0/1/2)"
    )
    # The whole photo at 320 px, the course photos' own longest side: a frozen network sees objects larger
    # than at its 260 px training size (the FixRes effect): +0.0036 ± 0.0017 mean F1 over 7 seeds against
    # the backbone's own 260 px centre crop (configs/resolution.yaml, docs/results.md).
    image_size: Optional[NonNegative] = model(320, "input side in pixels (0 or none: the backbone's own)")
    image_crop_pct: Optional[Share] = model(
        1.0, "centre-crop share (1.0: the whole photo, squashed; 0 or none: the backbone's own)"
    )
    image_model_kwargs: dict = model(dict, "extra keywords for timm.create_model, as YAML ({drop_rate: 0.2})")
    # max pooling keeps small objects
    image_pool: Literal["avg", "avgmax"] = model("avg", "pooling of the image feature map: avg | avgmax")
    image_layers: Positive = model(1, "pool this many feature stages (more than 1 adds earlier stages)")
    image_tokens: bool = model(False, "keep the last feature map as tokens for --decoder query")
    # the ranges calibrated on training photos are saved with the preprocessing, so prediction sees the same int8
    image_quant: Literal["auto", "none", "int8"] = model(
        "auto",
        "auto (int8 when frozen on a CPU) | none | int8 (frozen image encoder in static int8, calibrated on "
        "training photos; CPU)",
    )
    text_model: str = model("minilm-l6", "text encoder: minilm-l6 (packaged), a Hugging Face name or a local folder")
    # dynamic: activations are quantised per caption at run time, so no calibration is needed
    text_quant: Literal["auto", "none", "int8"] = model(
        "auto",
        "auto (int8 when frozen on a CPU) | none | int8 (frozen text encoder's matrices in int8, activations "
        "quantised per caption; CPU)",
    )
    # chosen at fit as the training captions' 99th percentile, rounded up to a multiple of 16, and saved as a number
    text_max_length: Optional[Positive] = model(
        None, "tokens of text kept (none: the 99th percentile of the training texts, up to the encoder's limit)"
    )
    text_config_overrides: dict = model(
        dict, "changes to the text encoder's config, as YAML (e.g. {num_hidden_layers: 2})"
    )
    decoder: Literal["mlp", "query", "lstm"] = model(
        "mlp", "head for the image, text and early kinds (for late: the image head): mlp | query | lstm"
    )
    hidden_dim: Positive = model(512, "width of the heads' hidden layer")
    dropout: Share = model(0.3, "dropout in the heads")
    tta_flip: bool = model(False, "average the features of each photo and its mirror image")
    threshold_method: ThresholdMethod = model(
        "global", "decision rule tuned for F1: global | per_class | balanced (false positives ≈ false negatives)"
    )
    ensure_nonempty: bool = model(True, "give every row at least its most probable label")
    save_dtype: Literal["auto", "fp32", "fp16", "int8"] = model(
        "auto",
        "weight storage in the model folder: auto (int8 when the text encoder runs in int8, else fp16) | fp16 | "
        "int8 (weight-only int8 matrices, the rest fp16) | fp32",
    )

    # ---- how one run trains (saved as the run's record) ----
    image_pretrained: bool = run(True, "start the image encoder from pretrained weights")
    image_weights: Optional[str] = run(
        None, "local checkpoint (.pth or .safetensors) for an image backbone no package ships"
    )
    text_pretrained: bool = run(True, "start the text encoder from pretrained weights")
    regime: Literal["auto", "frozen", "hybrid", "finetune"] = run(
        "auto",
        "auto (frozen on a CPU, finetune on a GPU) | frozen | hybrid (image features cached, text encoder trains) "
        "| finetune",
    )
    epochs: Positive = run(40, "most training epochs (early stopping may end sooner)")
    batch_size: Positive = run(256, "rows per training batch")
    lr: PositiveFloat = run(1e-3, "learning rate of the heads")
    lr_image: PositiveFloat = run(1e-4, "learning rate of the image encoder (finetune)")
    lr_text: PositiveFloat = run(5e-5, "learning rate of the text encoder (hybrid, finetune)")
    weight_decay: NonNegativeFloat = run(1e-4, "AdamW weight decay")
    loss: Literal["bce", "focal", "asl"] = run(
        "bce", "bce | focal | asl (multiclass: bce is cross-entropy, focal its focal form)"
    )
    loss_kwargs: dict = run(dict, "keywords of the loss, as YAML (e.g. {gamma: 2})")
    pos_weight: bool = run(False, "weigh rare labels up in the loss (multiclass: class weights)")
    sampler: Literal["none", "oversample"] = run("none", "none | oversample (rows with rare labels drawn more often)")
    oversample_power: NonNegativeFloat = run(0.5, "strength of oversampling (0: none, 1: inverse frequency)")
    augment: Literal["seed", "none", "trivial", "randaugment", "colorjitter"] = run(
        "seed", "photo augmentation when the image encoder trains: seed | none | trivial | randaugment | colorjitter"
    )
    word_dropout: Share = run(0.0, "share of words dropped from texts when the text encoder trains")
    modality_dropout: Share = run(
        0.0, "share of training rows whose photo or text is hidden, so fusion copes with one input"
    )
    patience: Positive = run(8, "epochs without a better validation mean F1 before stopping")
    seed: NonNegative = run(42, "random seed (split, initial weights, batches)")
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = run(
        0.1, "share of rows held out for validation when no --val-csv or --split-col is given"
    )
    missing_images: Literal["error", "caption_only"] = run(
        "error", "a training row whose photo is unusable: error | caption_only (trained from its text)"
    )
    max_steps: int = run(-1, "stop after this many optimiser steps (-1: no limit)")
    max_size_mb: PositiveFloat = run(100.0, "largest model folder allowed, in MB")

    # ---- where it runs (never saved) ----
    accelerator: str = runtime("auto", "cpu | gpu | auto (Lightning's accelerator)")
    devices: Union[int, list[int], str] = runtime(
        "auto", "processes or devices (Lightning's devices: a number, a list such as 0,1, or auto)"
    )
    num_nodes: Positive = runtime(1, "machines taking part (under SLURM or torchrun)")
    strategy: str = runtime("auto", "Lightning strategy when several devices take part (auto, ddp, ...)")
    precision: Optional[str] = runtime(None, "training precision (none: bf16-mixed on a GPU, 32 on a CPU)")
    num_workers: Optional[NonNegative] = runtime(
        None, "worker processes or threads reading photos (none: the cores this process may use)"
    )
    feature_engine: Literal["auto", "onnx", "torch"] = runtime(
        "auto", "what runs frozen encoders on a CPU: auto | onnx (onnxruntime) | torch", aliases=("--engine",)
    )
    cache_dir: Optional[str] = runtime(
        None,
        "fuselabel's cache of frozen features and encoder graphs (none: $FUSELABEL_CACHE, else "
        "$XDG_CACHE_HOME/fuselabel, else ~/.cache/fuselabel)",
    )
    image_cache: Literal["none", "memory"] = runtime(
        "none", "finetune: none | memory (decode each photo once, augment on the device)"
    )
    gpu_decode: bool = runtime(True, "on a GPU, decode JPEGs with nvJPEG for the image cache (no: PIL workers)")
    logger: Literal["none", "csv", "tensorboard", "mlflow"] = runtime(
        "none", "experiment tracker the run's losses and validation mean F1 go to: none | csv | tensorboard | mlflow"
    )
    log_dir: Optional[str] = runtime(None, "folder the tracker writes to (none: OUT.logs beside the model folder)")

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
        return {key: values[key] for key, g in setting_groups().items() if g == group}

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
    known = setting_groups()
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


def resolve_auto(config: Config, gpu: bool) -> Config:
    """The settings ``auto`` leaves to the machine, decided for a run on a GPU or not (saved so, never ``auto``).

    On a CPU the frozen encoders run in int8 for the training features and for prediction alike, and the weights
    are stored as the text encoder runs (int8 matrices): twice the default fp32's prediction speed at the same
    held-out mean F1 (docs/results.md). On a GPU the encoders fine-tune (``regime``) and stay in floating point.
    """
    regime = config.regime
    if regime == "auto":
        quantised = "int8" in (config.image_quant, config.text_quant)  # a quantised encoder is a frozen one
        regime = "frozen" if quantised or not gpu else "finetune"
    on_cpu = not gpu
    image_quant = config.image_quant
    if image_quant == "auto":
        image_quant = "int8" if on_cpu and regime in ("frozen", "hybrid") else "none"
    text_quant = config.text_quant
    if text_quant == "auto":
        text_quant = "int8" if on_cpu and regime == "frozen" else "none"
    save_dtype = config.save_dtype
    if save_dtype == "auto":
        save_dtype = "int8" if text_quant == "int8" else "fp16"
    return config.replace(regime=regime, image_quant=image_quant, text_quant=text_quant, save_dtype=save_dtype)


def choices(key: str) -> tuple:
    """The values a setting may take: the arguments of its ``Literal`` (one source for every list of choices)."""
    return typing.get_args(typing.get_type_hints(Config)[key])


def setting_groups() -> dict[str, str]:
    """Each setting's group (model | run | runtime), in declaration order."""
    return {name: info.json_schema_extra["group"] for name, info in Config.__pydantic_fields__.items()}


def group_of(key: str) -> str:
    return setting_groups()[key]


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
    explain_method: ExplainMethod = Field(
        "occlusion",
        description="how /explain finds why: occlusion (covers parts of the photo and leaves out words, on the "
        "model that predicts; quick from the start) or gradients (Grad-CAM and integrated gradients on the "
        "PyTorch weights, which load in the background)",
    )
    warm_explainer: bool = Field(
        True,
        description="with --explain-method gradients: load the PyTorch weights in the background at start, so the "
        "first 'why' is quick",
    )


# What ``fuselabel tune`` may vary: settings that change the heads, never the cached encoder features.
TUNE_PARAMS = ("decoder", "hidden_dim", "dropout", "loss", "pos_weight", "lr", "weight_decay", "epochs", "late_combine")


class TuneSettings(BaseModel):
    """Every setting of ``fuselabel tune`` and ``tune.search``: how many trials, for how long, what they vary.

    The settings the search starts from (its default) are a ``Config``, and so is the seed that draws the
    validation split all trials share; ``sampler_seed`` only seeds the choice of trials.
    """

    model_config = ConfigDict(extra="forbid")

    trials: Positive = Field(30, description="trials the study should hold, the default's first (resumed: the rest)")
    timeout: Optional[PositiveFloat] = Field(None, description="seconds to search (none: no limit); a trial finishes")
    prune: bool = Field(True, description="stop a trial whose per-epoch validation F1 is below the median")
    sampler_seed: NonNegative = Field(0, description="seed of the search's sampler (TPE)")
    resume: bool = Field(False, description="continue the study kept in the output folder (or its work folder)")
    params: Annotated[list[Literal[TUNE_PARAMS]], Field(min_length=1)] = Field(
        default_factory=lambda: list(TUNE_PARAMS), description="settings the search varies (the others stay fixed)"
    )
    threshold_methods: Annotated[list[Literal["global", "per_class", "balanced"]], Field(min_length=1)] = Field(
        default_factory=lambda: list(THRESHOLD_METHODS), description="decision rules a trial may choose from (free)"
    )
