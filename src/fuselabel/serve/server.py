"""Running the service: uvicorn with a deadline for request heads, one process or several, a clean stop."""

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeSettings
from .telemetry import setup_logging

log = logging.getLogger("fuselabel.serve")

PROTOCOL = "fuselabel.serve.server:TimedH11Protocol"  # uvicorn's ``http`` setting, by name for every process


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


def settings_json(settings: ServeSettings) -> str:
    """The settings as JSON, the API key included (it travels to the service's own worker processes only)."""
    values = settings.model_dump(mode="json")
    if settings.api_key is not None:
        values["api_key"] = settings.api_key.get_secret_value()
    return json.dumps(values)


def app_from_environment():
    """``create_app`` for each process under ``--workers N``: its arguments arrive as JSON in the environment."""
    from .app import create_app

    options = json.loads(os.environ["FUSELABEL_SERVE"])
    settings = ServeSettings.model_validate_json(options.pop("settings"))
    _limit_malloc_arenas()
    setup_logging(settings.json_logs)
    return create_app(options.pop("model_dir"), settings, **options)


def run(model_dir: str | Path, settings: ServeSettings | None = None, **runtime) -> None:
    """Serve until SIGINT or SIGTERM; requests in flight finish first, then this returns.

    ``settings``: where it listens and its limits (default ``ServeSettings()``); ``runtime``: where the model
    runs, ``create_app``'s keywords (``cache_dir``, ``feature_engine``, ``num_workers``).
    """
    import tempfile

    import uvicorn

    from .app import create_app

    settings = settings or ServeSettings()
    _limit_malloc_arenas()
    setup_logging(settings.json_logs)
    _raise_open_file_limit(settings.max_connections + 64)
    common = dict(
        host=settings.host,
        port=settings.port,
        http=PROTOCOL,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        access_log=False,
        log_config=None,
        log_level="info",
    )
    if settings.workers > 1:
        # Each process loads the model and serves the one socket; their metrics meet in one folder.
        metrics_dir = tempfile.TemporaryDirectory(prefix="fuselabel-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
        os.environ["FUSELABEL_SERVE"] = json.dumps(
            {"model_dir": str(model_dir), "settings": settings_json(settings), **runtime}
        )
        target = "fuselabel.serve.server:app_from_environment"
        config = uvicorn.Config(target, factory=True, workers=settings.workers, **common)
    else:
        config = uvicorn.Config(create_app(model_dir, settings, **runtime), **common)
    config.header_timeout = settings.header_timeout  # read by TimedH11Protocol, in every process
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again once its own handler
    # is gone; under the default disposition that would end a clean stop with status 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: log.info("stopped on SIGTERM"))
    try:
        if settings.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if settings.workers > 1:
            metrics_dir.cleanup()
