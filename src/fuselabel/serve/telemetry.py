"""What the service tells its operators: Prometheus metrics, a request id on every log line, access lines."""

import contextvars
import json
import logging
import os
import re

log = logging.getLogger("fuselabel.serve")
access_log = logging.getLogger("fuselabel.access")

WORK_PATHS = ("/predict", "/predict/batch", "/explain")  # the requests that admission control counts
ROUTES = {"/", "/health", "/labels", "/info", "/metrics", "/docs", "/redoc", "/openapi.json", "/caption", *WORK_PATHS}

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


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

        # Under --workers N each process keeps its own figures: "livesum" adds up the living processes' gauges.
        def gauge(name: str, text: str, mode: str):
            return Gauge(name, text, registry=r, multiprocess_mode=mode)

        self.in_progress = gauge("fuselabel_requests_in_progress", "prediction requests at work", "livesum")
        self.waiting = gauge(
            "fuselabel_requests_waiting", "prediction requests waiting for a turn (the queue)", "livesum"
        )
        self.refused = Counter("fuselabel_requests_refused", "prediction requests answered 503 (busy)", registry=r)
        self.model_load = gauge(
            "fuselabel_model_load_seconds", "time to load the model and make its first prediction", "max"
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


def route_label(path: str) -> str:
    """A path as a metrics label: the service's routes by name, everything else in two groups."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


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
