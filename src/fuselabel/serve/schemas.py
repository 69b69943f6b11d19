"""The API's shapes: what each route takes and answers, for OpenAPI and for checks."""

from typing import Annotated, Any, Literal

from fastapi import Body, File, Form
from pydantic import BaseModel, ConfigDict, Field

from ..config import ExplainMethod, ServeSettings

MAX_CAPTION_CHARS = 10_000  # far beyond any token limit; keeps tokenising cheap
# Standard base64 with its padding, optionally as a data: URL: what ``base64.b64decode(validate=True)`` takes.
BASE64 = r"^(data:[^,]*,)?([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
PHOTO_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")

LabelId = int | str


class Error(BaseModel):
    detail: str = Field(examples=["send a photo or caption, or both"])


class Label(BaseModel):
    id: LabelId
    name: str
    threshold: float = Field(description="the probability at or above which the label is predicted")


class LabelRef(BaseModel):
    id: LabelId
    name: str


class LabelScore(Label):
    probability: float
    predicted: bool
    parts: dict[str, float] = Field(
        description="each head's probability: image and text (late fusion), "
        "early, or the one head; fused by /info's fusion rule"
    )


class Fusion(BaseModel):
    """How the heads make one probability: the rule in force, and the photo head's weight under late fusion's
    weighted average (0: this model does not use photos; 1: nor captions)."""

    kind: str
    combine: str | None
    image_weight: float | None
    rule: str
    reads: str = Field(
        description="the inputs the model's decisions rest on: both, caption only (a photo head of weight 0, or "
        "none), or photo only",
        examples=["both"],
    )


class CaptionRead(BaseModel):
    """How much of the caption the model read: its tokens against the model's text length, and its words."""

    tokens: int = Field(description="the caption's tokens, special ones included")
    tokens_read: int
    max_tokens: int = Field(description="the model's text length: the most tokens it reads")
    words: int
    words_read: int = Field(description="words wholly inside the part read")
    read_text: str = Field(description="the caption's start that the model read")
    cut: bool = Field(description="true when the caption was longer than the model reads")


class Contributions(BaseModel):
    """What each input did to this answer: the photo head's weight in force, and whether the label set would
    differ with the photo (or the caption) absent, worked out from the heads' figures and the fusion rule."""

    image_weight: float | None = Field(description="the photo head's weight (weighted late fusion), else null")
    separable: bool = Field(description="false for early fusion: one head over both inputs, not taken apart")
    image_changed: bool | None = Field(description="the label set differs without the photo (null: not separable)")
    caption_changed: bool | None = Field(description="the label set differs without the caption (null: not separable)")
    caption: CaptionRead | None = Field(description="null without a caption, or for a model that reads none")


class CaptionReading(BaseModel):
    model: str
    caption: CaptionRead | None = Field(description="null for an empty caption, or a model that reads none")


class Row(BaseModel):
    labels: list[LabelScore] = Field(description="every label, in the model's order")
    predicted: list[LabelRef] = Field(description="the predicted set, in the model's label order")
    inputs: list[Literal["image", "caption"]] = Field(description="the inputs the model used")
    status: str = Field(description="ok (both inputs), image_only or caption_only", examples=["ok"])
    contributions: Contributions


class Prediction(Row):
    model: str = Field(examples=["comp5329@1a2b3c4d5e6f"])
    fusion: Fusion = Field(description="the rule that made each probability from the heads' (as /info says)")


class BatchPrediction(BaseModel):
    model: str
    results: list[Row]


class Heatmap(BaseModel):
    png_base64: str = Field(description="a greyscale-alpha PNG over the photo as given, scaled to its own peak")
    width: int
    height: int
    target: str | None = None
    logit: float | None = None


class WordScore(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str
    start: int
    end: int
    score: float | None = Field(
        description="occlusion: how far the logit falls when the word is left out; gradients: the word's share of "
        "the logit above an empty caption; null: past the model's token limit, not read"
    )


class Words(BaseModel):
    items: list[WordScore]
    target: str | None = None
    logit: float | None = None
    baseline_logit: float | None = None


class Explanation(BaseModel):
    model: str
    label: LabelScore
    status: str
    inputs: list[Literal["image", "caption"]]
    fusion: Fusion
    method: ExplainMethod = Field(
        description="occlusion: heat is how far the logit falls when that part of the photo is covered, run on the "
        "model that predicted; gradients: Grad-CAM and integrated gradients on the PyTorch weights"
    )
    heatmap: Heatmap | None
    words: Words | None


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    key_required: bool = Field(description="whether the other routes want an API key (X-API-Key)")
    explainer: Literal["loading", "ready", "on first use"] = Field(
        description="the model /explain runs: loading (in the background since the start), ready, or loaded on "
        "the first explanation (the service does not warm it, or the warm-up failed)"
    )


class Labels(BaseModel):
    model: str
    labels: list[Label]


class Limits(BaseModel):
    max_upload_mb: float
    max_batch: int
    max_caption_chars: int
    max_megapixels: float = Field(description="photos with more pixels are refused (415) before decoding")
    decode_workers: int
    max_concurrency: int
    max_queue: int
    queue_timeout_s: float
    body_timeout_s: float


class Info(BaseModel):
    model: str
    folder: str
    size_bytes: int
    labels: list[Label]
    fusion: Fusion
    settings: dict[str, Any]
    validation: dict[str, Any]
    limits: Limits


class BatchItem(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"caption": "a man riding a bike down a street", "image_base64": "/9j/4AAQSkZJRgABAQ..."}]
        },
    )
    caption: str | None = Field(
        None, description=f"the photo's caption, at most {MAX_CAPTION_CHARS} characters", max_length=MAX_CAPTION_CHARS
    )
    image_base64: str | None = Field(
        None,
        description="the photo's bytes in base64 (a data: URL also works): JPEG, PNG, WebP, GIF or BMP, within "
        "/info's limits.max_megapixels; the whole request within limits.max_upload_mb",
        json_schema_extra={"pattern": BASE64},
    )


ERRORS = {
    400: {
        "model": Error,
        "description": "a body that is not well-formed multipart or JSON",
        "content": {"application/json": {"example": {"detail": "There was an error parsing the body"}}},
    },
    413: {
        "model": Error,
        "description": "the body is over the upload limit, or a batch has too many items",
        "content": {
            "application/json": {
                "example": {"detail": "request body over the upload limit of 10 MB (fuselabel serve --max-upload-mb)"}
            }
        },
    },
    408: {
        "model": Error,
        "description": "the body did not arrive whole within the body timeout",
        "content": {"application/json": {"example": {"detail": "request body not received within 60 s"}}},
    },
    415: {
        "model": Error,
        "description": "a photo that cannot be decoded, or has too many pixels",
        "content": {
            "application/json": {
                "example": {"detail": "image: not an image file (send a JPEG, PNG, WebP, GIF or BMP file)"}
            }
        },
    },
    422: {
        "model": Error,
        "description": "no input the model reads, or a malformed field",
        "content": {"application/json": {"example": {"detail": "request: send a photo or caption, or both"}}},
    },
    503: {
        "model": Error,
        "description": "busy: too many requests at work and waiting; retry after the `Retry-After` header's seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}},
        "content": {
            "application/json": {"example": {"detail": "busy: 4 requests at work and 32 waiting; retry after 2 s"}}
        },
    },
}

UNAUTHORISED = {
    401: {
        "model": Error,
        "description": "no API key, or not this service's (send X-API-Key or Authorization: Bearer)",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
        "content": {"application/json": {"example": {"detail": "an API key is required"}}},
    }
}


def photo_field(settings: ServeSettings):
    """The upload field of /predict and /explain, saying its real limits."""
    return File(
        description=f"a photo ({', '.join(PHOTO_TYPES)}) of at most {settings.max_megapixels:g} megapixels; the "
        f"whole request at most {settings.max_upload_mb:g} MB. An empty file means no photo."
    )


def caption_field():
    return Form(
        description=f"the photo's caption, at most {MAX_CAPTION_CHARS} characters",
        examples=["a man riding a bike"],
        json_schema_extra={"maxLength": MAX_CAPTION_CHARS},
    )


def limits(settings: ServeSettings) -> dict:
    """The limits /info reports (``Limits``)."""
    return {
        "max_upload_mb": settings.max_upload_mb,
        "max_batch": settings.max_batch,
        "max_caption_chars": MAX_CAPTION_CHARS,
        "max_megapixels": settings.max_megapixels,
        "decode_workers": settings.decode_workers,
        "max_concurrency": settings.max_concurrency,
        "max_queue": settings.max_queue,
        "queue_timeout_s": settings.queue_timeout,
        "body_timeout_s": settings.body_timeout,
    }


def batch_of(max_batch: int):
    """The body of /predict/batch: a JSON list of 1 to ``max_batch`` items."""
    return Annotated[
        list[BatchItem],
        Body(
            description=f"1 to {max_batch} rows; more is answered 413",
            json_schema_extra={"minItems": 1, "maxItems": max_batch},
        ),
    ]


def require_an_input(spec: dict, kind: str) -> dict:
    """``spec`` (the OpenAPI document) saying what the handlers check: each request (each batch item) holds an
    input this model reads, a photo or a caption that is not blank (an empty photo is none, as a blank caption is).
    """
    reads = {"image": ("photo",), "text": ("caption",)}.get(kind, ("photo", "caption"))
    bodies = {
        "Body_predict_predict_post": "image",
        "Body_explain_label_explain_post": "image",
        "BatchItem": "image_base64",
    }
    components = spec["components"]["schemas"]
    for name, photo in bodies.items():
        fields = components[name]["properties"]
        if photo == "image":  # a form: fields are sent or not, never null; the photo is a file part
            for field in ("image", "caption"):
                fields[field] = {k: v for k, v in fields[field].items() if k != "anyOf"} | {"type": "string"}
            fields["image"]["contentMediaType"] = "application/octet-stream"
            fields["image"]["format"] = "binary"
        branches = {
            "photo": {"required": [photo], "properties": {photo: {"type": "string", "minLength": 1}}},
            "caption": {"required": ["caption"], "properties": {"caption": {"type": "string", "pattern": r"\S"}}},
        }
        components[name]["anyOf"] = [branches[given] for given in reads]
    for operation in (spec["paths"][path]["post"] for path in ("/predict", "/explain")):
        operation["requestBody"]["required"] = True  # an input is required, so a body is
    return spec
