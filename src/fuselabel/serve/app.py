"""The app: its middleware in order, and its routes (the page, what the model is, predictions, explanations)."""

# No ``from __future__ import annotations``: the /explain form's label list is a value known only in
# create_app, and FastAPI reads parameter annotations as objects.
import contextlib
import os
from pathlib import Path
from typing import Annotated

from fastapi import Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from ..bundle import folder_size
from ..config import ServeSettings
from ..estimator import FuseLabel
from . import schemas
from .answers import caption_read, explanation, rows
from .inputs import Decoder, caption_text, require_input
from .middleware import Admission, BodyLimit, HeadAsGet, Observe, RequireKey
from .model import ModelChanged, Runner, label_table, model_id, open_model, shown_settings
from .schemas import ERRORS, UNAUTHORISED
from .telemetry import WORK_PATHS, Metrics

WEB = Path(__file__).parents[1] / "web"
# What an API key guards; /health, /labels, /metrics and the page stay open.
KEYED_PATHS = (*WORK_PATHS, "/info", "/caption")


def api_key(settings: ServeSettings) -> str | None:
    """The key the service requires: ``api_key``, else the first line of ``api_key_file``, else
    ``$FUSELABEL_API_KEY``; None (or empty): no key."""
    if settings.api_key is not None and settings.api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if settings.api_key is not None:
        key = settings.api_key.get_secret_value()
    elif settings.api_key_file:
        try:
            lines = Path(settings.api_key_file).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"--api-key-file {settings.api_key_file}: cannot read it ({err.strerror})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {settings.api_key_file}: its first line is empty; write the key there")
    else:
        key = os.environ.get("FUSELABEL_API_KEY", "")
    return key.strip() or None


@contextlib.asynccontextmanager
async def _warm_at_start(app):
    """Once the server answers, the explaining model loads on its own thread while predictions go on."""
    app.state.runner.warm()
    yield


def create_app(
    model_dir: str | Path,
    settings: ServeSettings | None = None,
    *,
    cache_dir: str | None = None,
    feature_engine: str = "auto",
    num_workers: int | None = None,
) -> FastAPIOffline:
    """The service for one model folder (loaded now, once). ``settings``: its limits and who may call it
    (default ``ServeSettings()``); ``cache_dir``, ``feature_engine`` and ``num_workers`` are where the model
    runs (``model.open_model``)."""
    settings = settings or ServeSettings()
    key = api_key(settings)
    metrics = Metrics()
    model, seconds = open_model(model_dir, cache_dir=cache_dir, feature_engine=feature_engine, num_workers=num_workers)
    metrics.model_load.set(seconds)
    runner = Runner(model, num_workers, method=settings.explain_method, warm=settings.warm_explainer)
    decoder = Decoder(settings.decode_workers, model.preprocessing_, int(settings.max_megapixels * 1e6), metrics)
    label_ids = [str(lab) for lab in model.labels_]

    # The docs page (/docs) loads its scripts from this package, not from a CDN: it works offline. ReDoc
    # would fetch its logo and fonts from the internet, so it is left out.
    app = FastAPIOffline(
        title="fuselabel",
        summary="Labels for image + caption pairs",
        version=model_id(model),
        description=f"Labels of this model: {', '.join(label_ids)}. Every error is JSON `{{detail}}`; see each "
        "route's answers."
        + (" The prediction routes and /info want the API key (X-API-Key or Authorization: Bearer)." if key else ""),
        redoc_url=None,
        lifespan=_warm_at_start,
    )
    _add_middleware(app, settings, key, metrics)
    app.state.model, app.state.runner = model, runner
    _document_inputs(app, model.config_.kind)
    app.exception_handler(RequestValidationError)(malformed)
    guarded = {**ERRORS, **UNAUTHORISED} if key else ERRORS
    _about_routes(app, model, settings, metrics, key is not None, UNAUTHORISED if key else {})
    _prediction_routes(app, runner, decoder, settings, metrics, guarded)
    _explain_route(app, runner, decoder, settings, metrics, guarded, label_ids)
    return app


def _add_middleware(app, settings: ServeSettings, key: str | None, metrics: Metrics) -> None:
    """The middleware, innermost first: a request meets them in the opposite order (``__init__``)."""
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 1e6), timeout=settings.body_timeout)
    app.add_middleware(
        Admission,
        max_concurrency=settings.max_concurrency,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        metrics=metrics,
    )
    if key:
        app.add_middleware(RequireKey, key=key, paths=KEYED_PATHS)
    if settings.cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        # Outside the key check: a preflight carries no key, and a 401 needs the CORS headers to be readable.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(HeadAsGet)
    app.add_middleware(Observe, metrics=metrics)  # added last: the outermost, so it sees every answer


def _document_inputs(app, kind: str) -> None:
    """The app's OpenAPI document, made once, says which inputs a request must hold (``schemas.require_an_input``)."""
    make = app.openapi

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = schemas.require_an_input(make(), kind)
        return app.openapi_schema

    app.openapi = openapi


async def malformed(request: Request, exc: RequestValidationError):
    # One readable line, and the errors without their inputs (which may be a whole photo).
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    message = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors)
    # A body that is not JSON at all is malformed (400), as a broken multipart body is; 422 is for well-formed
    # bodies whose fields are wrong.
    status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
    return JSONResponse({"detail": message, "errors": errors}, status_code=status)


def _about_routes(app, model: FuseLabel, settings: ServeSettings, metrics: Metrics, keyed: bool, unauthorised: dict):
    """The page, and what the service and its model are: /health, /metrics, /labels, /info."""
    name = model_id(model)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/health", response_model=schemas.Health, summary="liveness: answers while the process serves")
    async def health():  # async: answered on the event loop, never behind busy worker threads
        return {"status": "ok", "model": name, "key_required": keyed, "explainer": app.state.runner.explainer_state()}

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics_page():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/labels", response_model=schemas.Labels, summary="the model's labels and thresholds")
    def labels():
        return {"model": name, "labels": label_table(model)}

    @app.get(
        "/info",
        response_model=schemas.Info,
        responses=unauthorised,
        summary="the model's settings, validation figures, size and limits",
    )
    def info():
        folder = Path(model.path_)
        return {
            "model": name,
            "folder": folder.resolve().name,
            "size_bytes": folder_size(folder),
            "labels": label_table(model),
            "fusion": model.fusion_,
            "settings": shown_settings(model),
            "validation": model.validation_,
            "limits": schemas.limits(settings),
        }


# The POST handlers are plain functions: FastAPI runs them in worker threads, so decoding photos and
# waiting for the model never hold up the event loop (nor its shutdown).


def _prediction_routes(app, runner: Runner, decoder: Decoder, settings: ServeSettings, metrics: Metrics, errors: dict):
    Photo = Annotated[UploadFile | None, schemas.photo_field(settings)]
    Caption = Annotated[str | None, schemas.caption_field()]
    model, name, max_batch = runner.model, model_id(runner.model), settings.max_batch

    @app.post(
        "/predict",
        response_model=schemas.Prediction,
        responses=errors,
        summary="every label's probability for one photo and/or caption",
    )
    def predict(image: Photo = None, caption: Caption = None):
        text = caption_text(caption)
        photo = decoder.one(image.file.read()) if image is not None else None
        require_input(model.config_.kind, photo, text)
        pred = runner.predict([photo], [text])
        metrics.count_rows(pred)
        return {"model": name, "fusion": model.fusion_, **rows(model, pred)[0]}

    @app.post(
        "/caption",
        response_model=schemas.CaptionReading,
        responses=errors,
        summary="how much of a caption the model reads (tokens and words), without predicting",
    )
    def read_caption(caption: Caption = None):
        text = caption_text(caption)
        return {"model": name, "caption": caption_read(runner.predictor.read_caption(text) if text else None)}

    @app.post(
        "/predict/batch",
        response_model=schemas.BatchPrediction,
        responses=errors,
        summary=f"1 to {max_batch} rows in one request",
    )
    def predict_batch(items: schemas.batch_of(max_batch)):
        if not items:
            raise HTTPException(422, "send a non-empty JSON list of {caption, image_base64} items")
        if len(items) > max_batch:
            raise HTTPException(
                413, f"{len(items)} items, over the limit of {max_batch} a request (fuselabel serve --max-batch)"
            )
        texts = [caption_text(item.caption, f"item {i}: caption") for i, item in enumerate(items)]
        photos = decoder.many([(item.image_base64 or b"", f"item {i}: image_base64") for i, item in enumerate(items)])
        for i, (photo, text) in enumerate(zip(photos, texts)):
            require_input(model.config_.kind, photo, text, f"item {i}")
        pred = runner.predict(photos, texts)
        metrics.count_rows(pred)
        return {"model": name, "results": rows(model, pred)}


def _explain_route(
    app, runner: Runner, decoder: Decoder, settings: ServeSettings, metrics: Metrics, errors: dict, label_ids: list
):
    Photo = Annotated[UploadFile | None, schemas.photo_field(settings)]
    Caption = Annotated[str | None, schemas.caption_field()]
    Label = Annotated[str, Form(description="a label id, as /labels lists them", json_schema_extra={"enum": label_ids})]
    model = runner.model

    @app.post(
        "/explain",
        response_model=schemas.Explanation,
        responses=errors,
        summary="why one label got its probability: a heatmap over the photo, a score for each word",
    )
    def explain_label(label: Label, image: Photo = None, caption: Caption = None):
        if label not in label_ids:
            raise HTTPException(422, f"label: {label!r} is not one of this model's labels ({', '.join(label_ids)})")
        text = caption_text(caption)
        photo = decoder.one(image.file.read()) if image is not None else None
        require_input(model.config_.kind, photo, text)
        try:
            pred, expl = runner.explain(label_ids.index(label), photo, text)
        except ModelChanged as err:
            raise HTTPException(503, str(err)) from None
        metrics.count_rows(pred)
        return explanation(runner.model, label_ids.index(label), pred, expl)
