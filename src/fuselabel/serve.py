"""The prediction service behind ``fuselabel serve MODEL``: a FastAPI app, a web page, and explanations.

    GET  /                 the web page (photo + caption -> label bars, and a "why" view)
    POST /predict          multipart ``image`` and/or ``caption`` -> every label's probability and the set
    POST /predict/batch    JSON list of {caption, image_base64} (at most ``max_batch`` items)
    POST /explain          multipart ``image`` and/or ``caption`` and ``label`` -> heatmap + word scores
    GET  /labels, /health, /info;  OpenAPI at /docs

The model folder loads once, at start. Each request is read and checked first (size, photo, caption),
then makes one call into the model on its one model thread (the network and its explanation hooks are shared),
then its answer is built. Every client mistake is a 4xx with a JSON ``detail``: 413 for a body over
the upload limit (counted while it arrives, whatever Content-Length claims), 415 for bytes that are
not a photo (or a decompression bomb), 422 for no input or malformed fields. Requests name no file
on the server: photos arrive as bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict

from .bundle import folder_size
from .images import ImageError, load_rgb
from .estimator import FuseLabel
from .explain import explain, heatmap_png

log = logging.getLogger(__name__)

WEB = Path(__file__).with_name("web")
MAX_CAPTION_CHARS = 10_000   # far beyond any token limit; keeps tokenising on the model thread cheap


# ---------------------------------------------------------------- the model, on one thread

class Model:
    """A model folder loaded once, with what the service reports about it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.estimator = FuseLabel.from_pretrained(self.path)
        self.kind = self.estimator.config.kind
        # Every model call runs on this one thread, in turn: the network and its explanation hooks are
        # shared, and one thread keeps the model's large buffers in one malloc arena.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselabel-model")
        weights = self.path / "model.safetensors"
        with weights.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.id = f"{self.path.resolve().name}@{digest[:12]}"
        # The first prediction sets up the encoders' runtime (an ONNX export on a CPU, seconds): do it
        # before the port opens, so no client waits for it and a broken folder fails at start.
        self.estimator.predict_details([Image.new("RGB", (64, 64), "gray")], ["a photo"])

    @property
    def labels(self) -> list[dict]:
        est = self.estimator
        return [{"id": lab, "name": name, "threshold": float(t)}
                for lab, name, t in zip(est.labels_, est.label_names_, est.thresholds_)]

    def predict(self, images: list, captions: list):
        return self.worker.submit(self.estimator.predict_details, images, captions).result()

    def explain(self, label_index: int, image, caption):
        def both():
            return self.estimator.predict_details([image], [caption]), explain(
                self.estimator.bundle_, label_index, image, caption)

        return self.worker.submit(both).result()


# ---------------------------------------------------------------- request parsing and checks

Photo = Annotated[UploadFile | None, File(description="a photo (JPEG, PNG, WebP, GIF, BMP)")]
Caption = Annotated[str | None, Form(description="the photo's caption")]


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    caption: str | None = None
    image_base64: str | None = None


def _photo(data: bytes, where: str = "image"):
    """An RGB image from uploaded bytes, or 415. Empty bytes mean no photo (a form's empty file field)."""
    if not data:
        return None
    try:
        return load_rgb(data, name=where)   # refuses decompression bombs by their pixel count
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
        raise HTTPException(422, f"{where}: send a {what}" + (" (this model reads only its "
                                 f"{reads[0]}s)" if len(reads) == 1 else ", or both"))


def _decode_base64(text: str | None, where: str) -> bytes:
    if not text:
        return b""
    if text.startswith("data:") and "," in text:   # a data: URL, as browsers write them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{where}: image_base64 is not valid base64") from None


def _upload(image: UploadFile | None):
    return _photo(image.file.read()) if image is not None else None


# ---------------------------------------------------------------- response building

def _rows(model: Model, pred) -> list[dict]:
    est = model.estimator
    out = []
    for i, status in enumerate(pred.status):
        labels = []
        for j, (lab, name) in enumerate(zip(est.labels_, est.label_names_)):
            labels.append({"id": lab, "name": name, "probability": float(pred.probs[i, j]),
                           "threshold": float(est.thresholds_[j]), "predicted": bool(pred.predicted[i, j]),
                           "parts": {part: float(p[i, j]) for part, p in pred.parts.items()}})
        out.append({
            "labels": labels,
            "predicted": [{"id": lab["id"], "name": lab["name"]} for lab in labels if lab["predicted"]],
            "inputs": [name for name, used in (("image", pred.image_present[i]), ("caption", pred.caption_present[i]))
                       if used],
            "status": status,
        })
    return out


def _explanation(model: Model, label_index: int, pred, expl) -> dict:
    row = _rows(model, pred)[0]
    heat = words = None
    if expl.heatmap is not None:
        heat = {"png_base64": base64.b64encode(heatmap_png(expl.heatmap)).decode(),
                "width": int(expl.heatmap.shape[1]), "height": int(expl.heatmap.shape[0]),
                "target": expl.heatmap_target, "logit": expl.heatmap_logit}
    if expl.words is not None:
        words = {"items": expl.words, "target": expl.words_target, "logit": expl.words_logit,
                 "baseline_logit": expl.words_baseline_logit}
    return {"model": model.id, "label": row["labels"][label_index], "status": row["status"],
            "inputs": row["inputs"], "heatmap": heat, "words": words}


def _settings(model: Model) -> dict:
    """The model's settings as its folder stores them (model and run groups), naming no path on the server."""
    settings = model.estimator.config.saved()
    for key in ("image_weights", "text_model"):   # local files by path: their names are enough
        value = settings["model"].get(key)
        if isinstance(value, str) and Path(value).is_absolute():
            settings["model"][key] = Path(value).name
    return settings


# ---------------------------------------------------------------- the app

class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, counted as it arrives.

    The body is read by this middleware (at most ``max_bytes``) and handed on whole, so a chunked upload without a
    Content-Length, or one that lies about it, is cut off the same way as an honest one.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._too_large(scope, receive, send)
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

    async def _too_large(self, scope, receive, send):
        limit = self.max_bytes / 1e6
        response = JSONResponse({"detail": f"request body over the upload limit of {limit:g} MB "
                                           f"(fuselabel serve --max-upload-mb)"}, status_code=413)
        await response(scope, receive, send)


def create_app(model_dir: str | Path, *, max_upload_mb: float = 10, max_batch: int = 32) -> FastAPI:
    """The service for one model folder (loaded now, once)."""
    if not max_upload_mb > 0 or max_batch < 1:
        raise ValueError(f"--max-upload-mb must be above 0 and --max-batch at least 1 "
                         f"(got {max_upload_mb:g} and {max_batch})")
    model = Model(model_dir)
    app = FastAPI(title="fuselabel", summary="Labels for image + caption pairs", version=model.id)
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 1e6))

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

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model.id}

    @app.get("/labels")
    def labels():
        return {"model": model.id, "labels": model.labels}

    @app.get("/info")
    def info():
        metrics_path = model.path / "metrics.json"
        metrics = {}
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text()).get("validation", {})
        validation = {k: v for k, v in metrics.items() if k != "per_label"}
        return {"model": model.id, "folder": model.path.resolve().name, "size_bytes": folder_size(model.path),
                "labels": model.labels, "settings": _settings(model), "validation": validation,
                "limits": {"max_upload_mb": max_upload_mb, "max_batch": max_batch,
                           "max_caption_chars": MAX_CAPTION_CHARS}}

    # The POST handlers are plain functions: FastAPI runs them in worker threads, so decoding photos and
    # waiting for the model thread never hold up the event loop (nor its shutdown).
    @app.post("/predict")
    def predict(image: Photo = None, caption: Caption = None):
        photo, text = _upload(image), _caption(caption)
        _require_input(model.kind, photo, text)
        pred = model.predict([photo], [text])
        return {"model": model.id, **_rows(model, pred)[0]}

    @app.post("/predict/batch")
    def predict_batch(items: list[BatchItem]):
        if not items:
            raise HTTPException(422, "send a non-empty JSON list of {caption, image_base64} items")
        if len(items) > max_batch:
            raise HTTPException(413, f"{len(items)} items, over the limit of {max_batch} a request "
                                     f"(fuselabel serve --max-batch)")
        photos, texts = [], []
        for i, item in enumerate(items):
            photo = _photo(_decode_base64(item.image_base64, f"item {i}"), f"item {i}: image_base64")
            text = _caption(item.caption, f"item {i}: caption")
            _require_input(model.kind, photo, text, f"item {i}")
            photos.append(photo)
            texts.append(text)
        pred = model.predict(photos, texts)
        return {"model": model.id, "results": _rows(model, pred)}

    @app.post("/explain")
    def explain_label(label: Annotated[str, Form(description="a label id, as /labels lists them")],
                      image: Photo = None, caption: Caption = None):
        ids = [str(lab) for lab in model.estimator.labels_]
        if label not in ids:
            raise HTTPException(422, f"label: {label!r} is not one of this model's labels ({', '.join(ids)})")
        photo, text = _upload(image), _caption(caption)
        _require_input(model.kind, photo, text)
        pred, expl = model.explain(ids.index(label), photo, text)
        return _explanation(model, ids.index(label), pred, expl)

    return app


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread heaps for this server process.

    glibc gives threads heaps of their own ("arenas"); with a request thread pool, each keeps freed photo
    and tensor buffers and the server's memory creeps up under load. Two arenas keep it flat
    (``benchmarks/load.py``; ``MALLOC_ARENA_MAX=2`` in the environment does the same).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-8, arenas)   # M_ARENA_MAX
    except OSError:  # not glibc: nothing to cap
        pass


def run(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, max_upload_mb: float = 10,
        max_batch: int = 32) -> None:
    """Serve until SIGINT or SIGTERM; requests in flight finish first, then this returns."""
    import uvicorn

    _limit_malloc_arenas()
    app = create_app(model_dir, max_upload_mb=max_upload_mb, max_batch=max_batch)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again once its own handler
    # is gone; under the default disposition that would end a clean stop with status 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM"))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
