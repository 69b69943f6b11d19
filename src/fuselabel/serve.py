"""The prediction service behind ``fuselabel serve MODEL``: a FastAPI app, a web page, and explanations.

    GET  /                 the web page (photo + caption -> label bars, and a "why" view)
    POST /predict          multipart ``image`` and/or ``caption`` -> every label's probability and the set
    POST /predict/batch    JSON list of {caption, image_base64} (at most ``max_batch`` items)
    POST /explain          multipart ``image`` and/or ``caption`` and ``label`` -> heatmap + word scores
    GET  /labels, /health, /info, /metrics (Prometheus);  OpenAPI at /openapi.json, /docs and /redoc

The model folder loads once, at start. On a CPU it predicts from the folder's exported ONNX copy in the cache
(made by the first start, as for ``fuselabel predict``), so the service starts without PyTorch and gives the
label sets ``fuselabel predict`` gives; the PyTorch model that explanations need loads on the first /explain.
A request passes, in turn:

1. ``Observe``: a request id (the client's ``X-Request-ID`` when sane, else a new one) in every log line and
   in the answer's header; counts and latency for ``/metrics``; one access-log line.
2. ``Admission``: at most ``max_concurrency`` prediction requests at work and ``max_queue`` waiting (for at
   most ``queue_timeout`` seconds); beyond that, 503 with ``Retry-After``. A waiting request's body is not
   read yet, so waiting costs no memory.
3. ``BodyLimit``: the body, read whole within ``body_timeout`` seconds and at most the upload limit (413),
   counted as it arrives, whatever Content-Length claims.
4. The handler: photos decoded by a small pool of threads (``decode_workers``), each at no more than the
   model needs and under a pixel limit, then one call into the model on its one model thread.

Every client mistake is a 4xx with a JSON ``detail``: 413 for a body over the upload limit, 415 for bytes
that are not a photo (or too many pixels), 422 for no input or malformed fields, 408 for a body that does
not arrive in time. Requests name no file on the server: photos arrive as bytes. A connection that has not
sent a whole request head within ``header_timeout`` seconds is closed (``TimedH11Protocol``), and uvicorn
answers 503 beyond ``max_connections`` open connections; in front of the internet, put a reverse proxy
that buffers requests before them (README).
"""

# No ``from __future__ import annotations``: the /explain form's label list is a value known only in
# create_app, and FastAPI reads parameter annotations as objects.
import asyncio
import base64
import binascii
import contextvars
import hashlib
import json
import logging
import math
import os
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import h11
from fastapi import File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

# Nothing that imports torch at module level (explain, export, engines): on a CPU the service starts and
# predicts without it.
from .bundle import folder_size, read_config
from .config import SERVE_LIMITS
from .estimator import FuseLabel
from .images import ImageError, load_rgb
from .runtime import gpu_driver_present

log = logging.getLogger(__name__)
access_log = logging.getLogger("fuselabel.access")

WEB = Path(__file__).with_name("web")
MAX_CAPTION_CHARS = 10_000  # far beyond any token limit; keeps tokenising on the model thread cheap
WORK_PATHS = ("/predict", "/predict/batch", "/explain")  # the requests that admission control counts
ROUTES = {"/", "/health", "/labels", "/info", "/metrics", "/docs", "/redoc", "/openapi.json", *WORK_PATHS}

DEFAULTS = {key: default for key, (default, _) in SERVE_LIMITS.items()}  # the limits of ``fuselabel serve``

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


# ---------------------------------------------------------------- the model, on one thread


class ModelChanged(RuntimeError):
    """The model folder's weights are no longer those the service started with."""


class Model:
    """A model folder loaded once, with what the service reports about it.

    On a CPU (unless ``feature_engine="torch"``) predictions come from the folder's exported ONNX copy in
    ``cache_dir`` (exported here when missing), and the PyTorch model is loaded only for the first
    explanation; elsewhere the PyTorch model is loaded at once. ``cache_dir``, ``feature_engine`` and
    ``num_workers`` are the runtime settings of ``fuselabel predict``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        cache_dir: str | None = None,
        feature_engine: str = "auto",
        num_workers: int | None = None,
    ):
        t0 = time.perf_counter()
        self.path = Path(path)
        runtime = {
            k: v
            for k, v in dict(cache_dir=cache_dir, feature_engine=feature_engine, num_workers=num_workers).items()
            if v is not None
        }
        exported = None
        if feature_engine != "torch" and not gpu_driver_present():
            exported = _exported_copy(self.path, cache_dir)
        self._bundle = None  # the PyTorch model (network, tokenizer) that explanations run on
        if exported is not None:
            self.estimator = FuseLabel.from_pretrained(exported, **runtime)
            # The exported copy keeps only what prediction needs; /info shows the folder's own settings.
            self.config = read_config(self.path)
        else:
            self.estimator = FuseLabel.from_pretrained(self.path, **runtime)
            self.config = self.estimator.config_
            self._bundle = self.estimator.bundle_
        self.kind = self.config.kind
        # Every model call runs on this one thread, in turn: the network and its explanation hooks are
        # shared, and one thread keeps the model's large buffers in one malloc arena.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselabel-model")
        self.digest = _weights_digest(self.path)
        self.id = f"{self.path.resolve().name}@{self.digest[:12]}"
        # The first prediction sets up the encoders' runtime (seconds): do it before the port opens, so no
        # client waits for it and a broken folder fails at start.
        self.estimator.predict_details([Image.new("RGB", (64, 64), "gray")], ["a photo"])
        engine = self.estimator.predictor().engine
        self.engine = engine.name
        self.preprocessing = engine.data_config  # photos are decoded for this, no larger
        self.fusion = _fusion(self.estimator)
        self.load_seconds = time.perf_counter() - t0
        log.info("model %s loaded in %.1f s: %s", self.id, self.load_seconds, self.engine)

    @property
    def labels(self) -> list[dict]:
        est = self.estimator
        return [
            {"id": lab, "name": name, "threshold": float(t)}
            for lab, name, t in zip(est.labels_, est.label_names_, est.thresholds_)
        ]

    def predict(self, images: list, captions: list):
        return self.worker.submit(self.estimator.predict_details, images, captions).result()

    def explain(self, label_index: int, image, caption):
        def both():
            from .explain import explain

            return self.estimator.predict_details([image], [caption]), explain(
                self._torch_bundle(), label_index, image, caption
            )

        return self.worker.submit(both).result()

    def _torch_bundle(self):
        """The PyTorch model, loaded on first use (on the model thread, so once) from the folder's weights,
        which must still be those the service started with: a folder replaced since would explain labels
        of another model than the one predicting them."""
        if self._bundle is None:
            from .bundle import load_bundle

            log.info("loading the PyTorch model of %s for explanations", self.id)
            bundle = load_bundle(self.path)
            # Hashed after the load: a folder replaced before or during it holds other weights by now.
            if _weights_digest(self.path) != self.digest:
                raise ModelChanged(
                    f"the model folder's weights changed after the service started (it serves "
                    f"{self.id}); restart the service to explain with them"
                )
            self._bundle = bundle
        return self._bundle


def _exported_copy(path: Path, cache_dir: str | None) -> Path | None:
    """The model folder's exported ONNX copy in the cache, exported first when missing (None: there is none, and
    the PyTorch model serves)."""
    from .predict import exported_folder

    folder = exported_folder(path, cache_dir)
    if folder is None or (folder / "manifest.json").is_file():
        return folder
    from .export import export_cached  # imports torch: only while the copy is missing

    return export_cached(path, cache_dir)


def _weights_digest(path: Path) -> str:
    with (path / "model.safetensors").open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fusion(estimator: FuseLabel) -> dict:
    """How this model's heads make one probability, in words a person reads beside the heads' figures."""
    engine = estimator.predictor().engine
    kind = engine.kind
    if kind == "late" and engine.late_combine == "union":
        rule = "the larger of the photo head's and the caption head's probability"
        weight = None
    elif kind == "late":
        weight = round(float(engine.late_weight), 4)
        rule = f"{weight:g} x the photo head's probability + {1 - weight:g} x the caption head's"
    elif kind == "early":
        rule, weight = "one head over the photo's and the caption's features together", None
    else:
        rule, weight = f"the {'photo' if kind == 'image' else 'caption'} head alone", None
    if kind == "late":
        rule += "; with only one input given, that input's head alone"
    return {
        "kind": kind,
        "combine": engine.late_combine if kind == "late" else None,
        "image_weight": weight,
        "rule": rule,
    }


# ---------------------------------------------------------------- the API's shapes (for OpenAPI and checks)

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


class Row(BaseModel):
    labels: list[LabelScore] = Field(description="every label, in the model's order")
    predicted: list[LabelRef] = Field(description="the predicted set, in the model's label order")
    inputs: list[Literal["image", "caption"]] = Field(description="the inputs the model used")
    status: str = Field(description="ok (both inputs), image_only or caption_only", examples=["ok"])


class Prediction(Row):
    model: str = Field(examples=["comp5329@1a2b3c4d5e6f"])


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
        description="share of the logit above an empty caption; null: past the model's token limit, not read"
    )


class Words(BaseModel):
    items: list[WordScore]
    target: str | None = None
    logit: float | None = None
    baseline_logit: float | None = None


class Fusion(BaseModel):
    kind: str
    combine: str | None
    image_weight: float | None
    rule: str


class Explanation(BaseModel):
    model: str
    label: LabelScore
    status: str
    inputs: list[Literal["image", "caption"]]
    fusion: Fusion
    heatmap: Heatmap | None
    words: Words | None


class Health(BaseModel):
    status: Literal["ok"]
    model: str


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
    caption: str | None = None
    image_base64: str | None = Field(None, description="the photo's bytes in base64 (a data: URL also works)")


ERRORS = {
    413: {
        "model": Error,
        "description": "the body is over the upload limit, or a batch has too many items",
        "content": {
            "application/json": {
                "example": {"detail": "request body over the upload limit of 10 MB (fuselabel serve --max-upload-mb)"}
            }
        },
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


# ---------------------------------------------------------------- request parsing and checks

Photo = Annotated[UploadFile | None, File(description="a photo (JPEG, PNG, WebP, GIF, BMP)")]
Caption = Annotated[str | None, Form(description="the photo's caption", examples=["a man riding a bike"])]


def _photo(data: bytes, where: str = "image", size=None, max_pixels: int | None = None):
    """An RGB image from uploaded bytes, or 415. Empty bytes mean no photo (a form's empty file field).

    ``size`` (the model's preprocessing) keeps a large photo from being decoded in full.
    """
    if not data:
        return None
    try:
        return load_rgb(data, name=where, size=size, max_pixels=max_pixels)  # refuses bombs by pixel count
    except (ImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise HTTPException(415, f"{err} (send a JPEG, PNG, WebP, GIF or BMP file)") from None


def _caption(text: str | None, where: str = "caption") -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > MAX_CAPTION_CHARS:
        raise HTTPException(422, f"{where}: {len(text)} characters, over the limit of {MAX_CAPTION_CHARS}")
    return text


def _require_input(kind: str, image, caption, where: str = "request") -> None:
    """422 unless the request holds an input this model reads (an image-only model ignores captions)."""
    reads = {"image": ("photo",), "text": ("caption",)}.get(kind, ("photo", "caption"))
    given = [name for name, value in (("photo", image), ("caption", caption)) if value is not None]
    if not set(given) & set(reads):
        what = " or ".join(reads)
        raise HTTPException(
            422,
            f"{where}: send a {what}"
            + (f" (this model reads only its {reads[0]}s)" if len(reads) == 1 else ", or both"),
        )


def _decode_base64(text: str | None, where: str) -> bytes:
    if not text:
        return b""
    if text.startswith("data:") and "," in text:  # a data: URL, as browsers write them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{where}: image_base64 is not valid base64") from None


class Decoder:
    """Photos decoded by a few threads, so however many requests arrive, only that many photos are ever
    held at full size at once; each comes out reduced to what the model needs."""

    def __init__(self, workers: int, size, max_pixels: int, metrics: "Metrics"):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuselabel-decode")
        self.size, self.max_pixels, self.metrics = size, max_pixels, metrics

    def _one(self, data: bytes | str | None, where: str):
        if isinstance(data, str) or data is None:  # base64 is decoded here too: one item's bytes at a time
            data = _decode_base64(data, where.split(":")[0])
        photo = _photo(data, where, self.size, self.max_pixels)
        if photo is not None:
            self.metrics.photos.inc()
        return photo

    def one(self, data: bytes, where: str = "image"):
        return self.pool.submit(self._one, data, where).result()

    def many(self, items: list[tuple[bytes | str | None, str]]) -> list:
        futures = [self.pool.submit(self._one, data, where) for data, where in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:  # after an error, the rest are not decoded
                f.cancel()


# ---------------------------------------------------------------- response building


def _rows(model: Model, pred) -> list[dict]:
    est = model.estimator
    out = []
    for i, status in enumerate(pred.status):
        labels = []
        for j, (lab, name) in enumerate(zip(est.labels_, est.label_names_)):
            labels.append(
                {
                    "id": lab,
                    "name": name,
                    "probability": float(pred.probs[i, j]),
                    "threshold": float(est.thresholds_[j]),
                    "predicted": bool(pred.predicted[i, j]),
                    "parts": {part: float(p[i, j]) for part, p in pred.parts.items()},
                }
            )
        out.append(
            {
                "labels": labels,
                "predicted": [{"id": lab["id"], "name": lab["name"]} for lab in labels if lab["predicted"]],
                "inputs": [
                    name
                    for name, used in (("image", pred.image_present[i]), ("caption", pred.caption_present[i]))
                    if used
                ],
                "status": status,
            }
        )
    return out


def _explanation(model: Model, label_index: int, pred, expl) -> dict:
    from .explain import heatmap_png

    row = _rows(model, pred)[0]
    heat = words = None
    if expl.heatmap is not None:
        heat = {
            "png_base64": base64.b64encode(heatmap_png(expl.heatmap)).decode(),
            "width": int(expl.heatmap.shape[1]),
            "height": int(expl.heatmap.shape[0]),
            "target": expl.heatmap_target,
            "logit": expl.heatmap_logit,
        }
    if expl.words is not None:
        words = {
            "items": expl.words,
            "target": expl.words_target,
            "logit": expl.words_logit,
            "baseline_logit": expl.words_baseline_logit,
        }
    return {
        "model": model.id,
        "label": row["labels"][label_index],
        "status": row["status"],
        "inputs": row["inputs"],
        "fusion": model.fusion,
        "heatmap": heat,
        "words": words,
    }


def _settings(model: Model) -> dict:
    """The model's settings as its folder stores them (model and run groups), naming no path on the server."""
    settings = model.config.saved()
    for key in ("image_weights", "text_model"):  # local files by path: their names are enough
        value = settings["model"].get(key)
        if isinstance(value, str) and Path(value).is_absolute():
            settings["model"][key] = Path(value).name
    return settings


# ---------------------------------------------------------------- metrics and logs


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app).

    Under ``--workers N`` each process writes its figures to ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any
    process adds up all of them.
    """

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "fuselabel_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fuselabel_request_duration_seconds",
            "time from a request's head to its answer, by route",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.in_progress = Gauge(
            "fuselabel_requests_in_progress", "prediction requests at work", registry=r, multiprocess_mode="livesum"
        )
        self.waiting = Gauge(
            "fuselabel_requests_waiting",
            "prediction requests waiting for a turn (the queue)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.refused = Counter("fuselabel_requests_refused", "prediction requests answered 503 (busy)", registry=r)
        self.model_load = Gauge(
            "fuselabel_model_load_seconds",
            "time to load the model and make its first prediction",
            registry=r,
            multiprocess_mode="max",
        )
        self.photos = Counter("fuselabel_photos_decoded", "photos decoded", registry=r)
        self.rows = Counter(
            "fuselabel_rows_predicted",
            "rows predicted or explained, by the inputs they had (photo+caption, photo, caption)",
            ["inputs"],
            registry=r,
        )

    def scrape(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def count_rows(self, pred) -> None:
        for photo, caption in zip(pred.image_present, pred.caption_present):
            self.rows.labels("photo+caption" if photo and caption else "photo" if photo else "caption").inc()


def _route(path: str) -> str:
    """A path as a metrics label: the service's routes by name, everything else in two groups."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


class Observe:
    """ASGI middleware: a request id, the request's metrics, and one access-log line."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # each request runs in a task (and threads) of its own: no reset needed
        status, t0 = 0, time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status:  # the answer is under way: only the server can end it
                status = 500
                raise
            # Answered here rather than by the framework's last-resort handler, so the 500 carries the request
            # id that the logged traceback carries too.
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            body = json.dumps(
                {"detail": f"internal error (request id {request_id}); the server's log has the details"}
            ).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - t0
            route, method = _route(scope["path"]), scope["method"]
            shown = str(status) if status else "disconnected"
            self.metrics.requests.labels(route, method, shown).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client")
            access_log.info(
                "%s %s %s %.1f ms",
                method,
                scope["path"],
                shown,
                1000 * seconds,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status or None,
                    "ms": round(1000 * seconds, 1),
                    "client": client[0] if client else None,
                },
            )


class RequestIdFilter(logging.Filter):
    """Puts the request id (``-`` outside a request) on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, request id, message, and an access line's fields."""

    FIELDS = ("method", "path", "status", "ms", "client")

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(json_logs: bool = False, level: int = logging.INFO) -> None:
    """The service's log lines (its own and uvicorn's) on stderr, each with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# ---------------------------------------------------------------- admission, body and connection limits


class Admission:
    """ASGI middleware: at most ``max_concurrency`` prediction requests at work and ``max_queue`` waiting.

    A request beyond both, or one that waited ``queue_timeout`` seconds, is answered 503 with ``Retry-After``
    (an estimate from recent requests' durations). Other routes (/health, /metrics, the page) are never held.
    """

    def __init__(self, app, *, max_concurrency: int, max_queue: int, queue_timeout: float, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.max_concurrency, self.max_queue, self.queue_timeout = max_concurrency, max_queue, queue_timeout
        self.slots = asyncio.Semaphore(max_concurrency)
        self.at_work = self.waiting = 0
        self.typical_seconds = 1.0  # a moving average of admitted requests' durations

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in WORK_PATHS:
            return await self.app(scope, receive, send)
        if self.slots.locked() and self.waiting >= self.max_queue:
            return await self._busy(scope, receive, send)
        if self.slots.locked():
            self.waiting += 1
            self.metrics.waiting.inc()
            try:
                await asyncio.wait_for(self.slots.acquire(), self.queue_timeout)
            except asyncio.TimeoutError:
                return await self._busy(scope, receive, send)
            finally:
                self.waiting -= 1
                self.metrics.waiting.dec()
        else:
            await self.slots.acquire()  # a free slot: taken at once
        self.at_work += 1
        self.metrics.in_progress.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.typical_seconds = 0.8 * self.typical_seconds + 0.2 * (time.perf_counter() - t0)
            self.at_work -= 1
            self.metrics.in_progress.dec()
            self.slots.release()

    async def _busy(self, scope, receive, send):
        self.metrics.refused.inc()
        retry = max(1, math.ceil(self.typical_seconds * (self.waiting + 1) / self.max_concurrency))
        response = JSONResponse(
            {"detail": f"busy: {self.at_work} requests at work and {self.waiting} waiting; retry after {retry} s"},
            status_code=503,
            headers={"Retry-After": str(retry)},
        )
        await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, counted as it arrives; one that has not
    arrived whole within ``timeout`` seconds gets 408.

    The body is read by this middleware (at most ``max_bytes``) and handed on whole, so a chunked upload without a
    Content-Length, or one that lies about it, is cut off the same way as an honest one.
    """

    def __init__(self, app, max_bytes: int, timeout: float = 60.0):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413)
        chunks, total = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._refuse(scope, receive, send, 408)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._refuse(scope, receive, send, 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, status: int):
        if status == 413:
            detail = (
                f"request body over the upload limit of {self.max_bytes / 1e6:g} MB (fuselabel serve --max-upload-mb)"
            )
        else:
            detail = f"request body not received within {self.timeout:g} s (fuselabel serve --body-timeout)"
        # The rest of the body is never read: the connection closes after this answer.
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's head.

    uvicorn times out idle keep-alive connections but not a connection that opens and sends nothing, or
    sends its head a byte at a time: enough of those use up the process's open files. Here each head must
    arrive whole within ``config.header_timeout`` seconds (default 10) of the connection opening or of its
    first byte after the previous answer; otherwise the connection is closed.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.header_timeout = float(getattr(config, "header_timeout", 10.0))
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()  # part of a head has arrived: it has until the deadline for the rest
        else:
            self._disarm()  # a whole head (the body has its own deadline), or nothing new

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


# ---------------------------------------------------------------- the app


def _check_limits(limits: dict) -> None:
    """ValueError naming each of ``fuselabel serve``'s limits that cannot work."""
    whole = ("max_batch", "decode_workers", "max_concurrency", "max_queue")
    bad = [
        f"--{k.replace('_', '-')} must be {'at least 0' if k == 'max_queue' else 'above 0'} (got {v:g})"
        for k, v in limits.items()
        if (v < 0 if k == "max_queue" else not v > 0)
    ]
    bad += [
        f"--{k.replace('_', '-')} must be a whole number (got {limits[k]:g})"
        for k in whole
        if not float(limits[k]).is_integer()
    ]
    if bad:
        raise ValueError("; ".join(bad))


def create_app(
    model_dir: str | Path,
    *,
    max_upload_mb: float = DEFAULTS["max_upload_mb"],
    max_batch: int = DEFAULTS["max_batch"],
    max_megapixels: float = DEFAULTS["max_megapixels"],
    decode_workers: int = DEFAULTS["decode_workers"],
    max_concurrency: int = DEFAULTS["max_concurrency"],
    max_queue: int = DEFAULTS["max_queue"],
    queue_timeout: float = DEFAULTS["queue_timeout"],
    body_timeout: float = DEFAULTS["body_timeout"],
    cache_dir: str | None = None,
    feature_engine: str = "auto",
    num_workers: int | None = None,
) -> FastAPIOffline:
    """The service for one model folder (loaded now, once). The limits are ``fuselabel serve``'s options;
    ``cache_dir``, ``feature_engine`` and ``num_workers`` are where the model runs (``Model``)."""
    limits = dict(
        max_upload_mb=max_upload_mb,
        max_batch=max_batch,
        max_megapixels=max_megapixels,
        decode_workers=decode_workers,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        body_timeout=body_timeout,
    )
    _check_limits(limits)
    metrics = Metrics()
    model = Model(model_dir, cache_dir=cache_dir, feature_engine=feature_engine, num_workers=num_workers)
    metrics.model_load.set(model.load_seconds)
    decoder = Decoder(int(decode_workers), model.preprocessing, int(max_megapixels * 1e6), metrics)
    label_ids = [str(lab) for lab in model.estimator.labels_]

    # The docs pages (/docs, /redoc) load their scripts from this package, not from a CDN: they work offline.
    app = FastAPIOffline(
        title="fuselabel",
        summary="Labels for image + caption pairs",
        version=model.id,
        description=f"Labels of this model: {', '.join(label_ids)}. Every error is JSON "
        "`{detail}`; see each route's answers.",
    )
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 1e6), timeout=body_timeout)
    app.add_middleware(
        Admission,
        max_concurrency=int(max_concurrency),
        max_queue=int(max_queue),
        queue_timeout=queue_timeout,
        metrics=metrics,
    )
    app.add_middleware(Observe, metrics=metrics)  # added last: the outermost, so it sees every answer
    app.state.model = model

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        # One readable line, and the errors without their inputs (which may be a whole photo).
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": message, "errors": errors}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/health", response_model=Health, summary="liveness: answers while the process serves")
    async def health():  # async: answered on the event loop, never behind busy worker threads
        return {"status": "ok", "model": model.id}

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics_page():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/labels", response_model=Labels, summary="the model's labels and thresholds")
    def labels():
        return {"model": model.id, "labels": model.labels}

    @app.get("/info", response_model=Info, summary="the model's settings, validation figures, size and limits")
    def info():
        metrics_path = model.path / "metrics.json"
        figures = {}
        if metrics_path.is_file():
            figures = json.loads(metrics_path.read_text()).get("validation", {})
        validation = {k: v for k, v in figures.items() if k != "per_label"}
        return {
            "model": model.id,
            "folder": model.path.resolve().name,
            "size_bytes": folder_size(model.path),
            "labels": model.labels,
            "fusion": model.fusion,
            "settings": _settings(model),
            "validation": validation,
            "limits": {
                "max_upload_mb": max_upload_mb,
                "max_batch": max_batch,
                "max_caption_chars": MAX_CAPTION_CHARS,
                "max_megapixels": max_megapixels,
                "decode_workers": decode_workers,
                "max_concurrency": max_concurrency,
                "max_queue": max_queue,
                "queue_timeout_s": queue_timeout,
                "body_timeout_s": body_timeout,
            },
        }

    # The POST handlers are plain functions: FastAPI runs them in worker threads, so decoding photos and
    # waiting for the model thread never hold up the event loop (nor its shutdown).
    @app.post(
        "/predict",
        response_model=Prediction,
        responses=ERRORS,
        summary="every label's probability for one photo and/or caption",
    )
    def predict(image: Photo = None, caption: Caption = None):
        text = _caption(caption)
        photo = decoder.one(image.file.read()) if image is not None else None
        _require_input(model.kind, photo, text)
        pred = model.predict([photo], [text])
        metrics.count_rows(pred)
        return {"model": model.id, **_rows(model, pred)[0]}

    @app.post(
        "/predict/batch",
        response_model=BatchPrediction,
        responses=ERRORS,
        summary=f"up to {max_batch} rows in one request",
    )
    def predict_batch(items: list[BatchItem]):
        if not items:
            raise HTTPException(422, "send a non-empty JSON list of {caption, image_base64} items")
        if len(items) > max_batch:
            raise HTTPException(
                413, f"{len(items)} items, over the limit of {max_batch} a request (fuselabel serve --max-batch)"
            )
        texts = [_caption(item.caption, f"item {i}: caption") for i, item in enumerate(items)]
        photos = decoder.many([(item.image_base64 or b"", f"item {i}: image_base64") for i, item in enumerate(items)])
        for i, (photo, text) in enumerate(zip(photos, texts)):
            _require_input(model.kind, photo, text, f"item {i}")
        pred = model.predict(photos, texts)
        metrics.count_rows(pred)
        return {"model": model.id, "results": _rows(model, pred)}

    @app.post(
        "/explain",
        response_model=Explanation,
        responses=ERRORS,
        summary="why one label got its probability: a heatmap over the photo, a score for each word",
    )
    def explain_label(
        label: Annotated[
            str, Form(description="a label id, as /labels lists them", json_schema_extra={"enum": label_ids})
        ],
        image: Photo = None,
        caption: Caption = None,
    ):
        if label not in label_ids:
            raise HTTPException(422, f"label: {label!r} is not one of this model's labels ({', '.join(label_ids)})")
        text = _caption(caption)
        photo = decoder.one(image.file.read()) if image is not None else None
        _require_input(model.kind, photo, text)
        try:
            pred, expl = model.explain(label_ids.index(label), photo, text)
        except ModelChanged as err:
            raise HTTPException(503, str(err)) from None
        metrics.count_rows(pred)
        return _explanation(model, label_ids.index(label), pred, expl)

    return app


def app_from_environment():
    """``create_app`` for each process under ``--workers N``: its arguments arrive as JSON in the environment."""
    options = json.loads(os.environ["FUSELABEL_SERVE"])
    _limit_malloc_arenas()
    setup_logging(options.pop("json_logs"))
    return create_app(options.pop("model_dir"), **options)


def _limit_malloc_arenas(arenas: int = 2, mmap_threshold: int = 8 * 2**20) -> None:
    """Cap glibc's per-thread heaps for this server process, and give large blocks back when freed.

    glibc gives threads heaps of their own ("arenas"); with a request thread pool, each keeps freed photo
    and tensor buffers and the server's memory creeps up under load. Two arenas keep it flat
    (``benchmarks/load.py``; ``MALLOC_ARENA_MAX=2`` in the environment does the same). A photo being decoded
    is held in 16 MB blocks; glibc would soon move blocks of that size from their own mappings into the
    heap, where freed ones stay, so a fixed mmap threshold keeps them mapped and returned on free.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no longer raised by frees)
    except OSError:  # not glibc: nothing to cap
        pass


def _raise_open_file_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` open files (sockets) if the hard limit allows; say so if it does not."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open-file limit %d is under --max-connections + 64 (%d): raise it (ulimit -n)", new, wanted)


def run(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int = 1,
    max_connections: int = 2048,
    header_timeout: float = 10.0,
    json_logs: bool = False,
    cache_dir: str | None = None,
    feature_engine: str = "auto",
    num_workers: int | None = None,
    **limits,
) -> None:
    """Serve until SIGINT or SIGTERM; requests in flight finish first, then this returns.

    ``limits`` are create_app's; ``max_connections`` open connections at most (uvicorn answers 503 beyond);
    ``cache_dir``, ``feature_engine`` and ``num_workers`` are where the model runs (``Model``).
    """
    import tempfile

    import uvicorn

    if workers < 1 or max_connections < 1 or not header_timeout > 0:
        raise ValueError(
            f"--workers and --max-connections must be at least 1 and --header-timeout above 0 "
            f"(got {workers}, {max_connections} and {header_timeout:g})"
        )
    _check_limits({**DEFAULTS, **limits})
    runtime = dict(cache_dir=cache_dir, feature_engine=feature_engine, num_workers=num_workers)
    _limit_malloc_arenas()
    setup_logging(json_logs)
    _raise_open_file_limit(max_connections + 64)
    common = dict(
        host=host,
        port=port,
        http="fuselabel.serve:TimedH11Protocol",
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        access_log=False,
        log_config=None,
        log_level="info",
    )
    if workers > 1:
        # Each process loads the model and serves the one socket; their metrics meet in one folder.
        metrics_dir = tempfile.TemporaryDirectory(prefix="fuselabel-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
        os.environ["FUSELABEL_SERVE"] = json.dumps(
            {"model_dir": str(model_dir), "json_logs": json_logs, **limits, **runtime}
        )
        config = uvicorn.Config("fuselabel.serve:app_from_environment", factory=True, workers=workers, **common)
    else:
        config = uvicorn.Config(create_app(model_dir, **limits, **runtime), **common)
    config.header_timeout = header_timeout  # read by TimedH11Protocol, in every process
    server = uvicorn.Server(config)
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again once its own handler
    # is gone; under the default disposition that would end a clean stop with status 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM"))
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if workers > 1:
            metrics_dir.cleanup()
