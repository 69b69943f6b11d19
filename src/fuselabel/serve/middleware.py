"""ASGI middleware in front of the routes: who may call (a key), how many at once, how large a body."""

import asyncio
import hmac
import json
import math
import time
import uuid

from fastapi.responses import JSONResponse

from .telemetry import REQUEST_ID, SANE_ID, WORK_PATHS, Metrics, access_log, log, route_label


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
    Content-Length, or one that lies about it, is cut off the same way as an honest one. Before a 413 the rest of
    the body is read and dropped (up to ``drain_bytes`` in all, within the same deadline): a client that sends its
    whole body before reading the answer, as most do, then gets its 413 instead of a reset connection.
    """

    def __init__(self, app, max_bytes: int, timeout: float = 60.0, drain_bytes: int | None = None):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(64_000_000, 4 * max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.drain_bytes:
            return await self._refuse(scope, receive, send, 413)  # too much to drain: answer and close at once
        chunks, total = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._refuse(scope, receive, send, 408 if total <= self.max_bytes else 413)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total <= self.max_bytes:
                chunks.append(chunk)
            elif chunks:
                chunks = []  # over the limit: the rest is only counted, then dropped
            if not message.get("more_body", False) or total > self.drain_bytes:
                break
        if total > self.max_bytes:
            return await self._refuse(scope, receive, send, 413)
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
        # Whatever is left of the body is not read: the connection closes after this answer.
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


class RequireKey:
    """ASGI middleware: the routes in ``paths`` answer 401 unless the request carries ``key`` (header
    ``X-API-Key``, or ``Authorization: Bearer KEY``), compared in constant time. CORS preflights pass."""

    def __init__(self, app, key: str, paths):
        self.app, self.key, self.paths = app, key.encode(), frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if given is None and scheme.lower() == b"bearer":
            given = token.strip()
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        detail = "an API key is required: send it as the X-API-Key header or as Authorization: Bearer KEY"
        if given is not None:
            detail = "the API key sent is not this service's: check the key (X-API-Key or Authorization: Bearer)"
        response = JSONResponse(
            {"detail": detail}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="fuselabel"'}
        )
        await response(scope, receive, send)


class Observe:
    """ASGI middleware: a request id, the request's metrics, and one access-log line."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if SANE_ID.fullmatch(given) else uuid.uuid4().hex
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
            route, method = route_label(scope["path"]), scope["method"]
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


class HeadAsGet:
    """ASGI middleware: HEAD answers wherever GET does, with GET's status and headers and no body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
