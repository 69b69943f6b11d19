"""The prediction service behind ``fuselabel serve MODEL``: a FastAPI app, a web page, and explanations.

    GET  /                 the web page (photo + caption -> label bars, and a "why" view)
    POST /predict          multipart ``image`` and/or ``caption`` -> every label's probability and the set
    POST /predict/batch    JSON list of {caption, image_base64} (at most ``max_batch`` items)
    POST /explain          multipart ``image`` and/or ``caption`` and ``label`` -> heatmap + word scores
    GET  /labels, /health, /info, /metrics (Prometheus);  OpenAPI at /openapi.json and /docs
    (HEAD wherever GET)

Every setting is ``config.ServeSettings``. The model folder loads once, at start (``model``). On a CPU it predicts
from the folder's exported ONNX copy in the cache (made by the first start, as for ``fuselabel predict``), so the
service starts without PyTorch and gives the label sets ``fuselabel predict`` gives, a request's rows spread over
the cores as ``fuselabel predict`` spreads its windows; the PyTorch model that explanations need loads on the first
/explain. A request passes, in turn (``middleware``):

1. ``Observe``: a request id (the client's ``X-Request-ID`` when sane, else a new one) in every log line and
   in the answer's header; counts and latency for ``/metrics``; one access-log line (``telemetry``).
2. ``HeadAsGet``, then CORS (``cors_origin``) and ``RequireKey`` (``api_key``): the prediction routes and /info
   answer 401 without the key.
3. ``Admission``: at most ``max_concurrency`` prediction requests at work and ``max_queue`` waiting (for at
   most ``queue_timeout`` seconds); beyond that, 503 with ``Retry-After``. A waiting request's body is not
   read yet, so waiting costs no memory.
4. ``BodyLimit``: the body, read whole within ``body_timeout`` seconds and at most the upload limit (413, after
   reading and dropping the rest within a bound), counted as it arrives, whatever Content-Length claims.
5. The handler (``app``): photos decoded by a small pool of threads (``decode_workers``), each at no more than
   the model needs and under a pixel limit (``inputs``), then the model.

Every client mistake is a 4xx with a JSON ``detail`` (``schemas``): 400 for a body that is not well-formed
multipart or JSON, 401 without the key, 413 for a body over the upload limit, 415 for bytes that are not a photo
(or too many pixels), 422 for no input or malformed fields, 408 for a body that does not arrive in time.
Requests name no file on the server: photos arrive as bytes. A connection that has not sent a whole request head
within ``header_timeout`` seconds is closed (``server.TimedH11Protocol``), and uvicorn answers 503 beyond
``max_connections`` open connections; in front of the internet, put a reverse proxy that buffers requests before
them (README).
"""

from .app import create_app
from .server import run

__all__ = ["create_app", "run"]
