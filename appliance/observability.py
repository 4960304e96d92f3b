"""Logs and metrics: JSON log lines carrying a request id, and Prometheus metrics behind a token.

Log lines never carry a payload: handlers log identifiers (task id, result key, client) and
status words; the request id follows a job from the API (`X-Request-ID`) through the broker (a
message header) into the worker's lines and audit entries.

Metrics are served on `/metrics` only to a scraper presenting the bearer token in
`<state>/secrets/metrics.token`: label values are route templates and status words, never a path
with a result key in it.
"""

from __future__ import annotations

import hmac
import logging
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from contextvars import ContextVar
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: The request id of the work in hand (an API request, or the job it became in the worker).
current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_REQUESTS = Counter(
    "appliance_http_requests",
    "API requests by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "appliance_http_request_duration_seconds",
    "API request latency by route template",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOBS = Counter(
    "appliance_jobs",
    "Jobs finished by the worker, by outcome status",
    ["status"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "appliance_job_duration_seconds",
    "Time from a job message's arrival to its stored result",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
SANDBOX_CPU = Histogram(
    "appliance_sandbox_cpu_seconds",
    "CPU time used by sandboxed runs",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
    registry=REGISTRY,
)
SANDBOX_WALL = Histogram(
    "appliance_sandbox_wall_seconds",
    "Wall-clock time of sandboxed runs",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
SANDBOX_RSS = Histogram(
    "appliance_sandbox_max_rss_bytes",
    "Peak resident memory of sandboxed runs",
    buckets=tuple(2**n * 1024 * 1024 for n in range(3, 12)),
    registry=REGISTRY,
)

#: OpenBao reads of the client registry (issue 12, finding 10): `entry` per client entry read,
#: `list` per listing of the registered key ids. Unknown key ids cost neither.
REGISTRY_READS = Counter(
    "appliance_client_registry_reads",
    "OpenBao reads of the client registry, by operation (entry, list)",
    ["operation"],
    registry=REGISTRY,
)
REGISTRY_CACHED = Gauge(
    "appliance_client_registry_cached_entries",
    "Client entries held in this process's registry cache",
    registry=REGISTRY,
)
#: Requests refused before a signature verified, by the code their client was told.
UNAUTHENTICATED = Counter(
    "appliance_unauthenticated_requests",
    "Requests refused before any signature verified (401, 413, ...), by code",
    ["code"],
    registry=REGISTRY,
)


def new_request_id(offered: str | None) -> str:
    """The client's `X-Request-ID` when well-formed, else a fresh one."""
    if offered and _REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def observe_usage(usage: dict[str, Any] | None) -> None:
    """Record one sandboxed run's usage (as the outcome reports it)."""
    if not usage:
        return
    SANDBOX_CPU.observe(usage.get("cpu_ms", 0) / 1000)
    SANDBOX_WALL.observe(usage.get("wall_ms", 0) / 1000)
    SANDBOX_RSS.observe(usage.get("max_rss_kb", 0) * 1024)


# ---- logs --------------------------------------------------------------------------------------


def _add_request_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    rid = current_request_id.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def configure_logging(service: str, level: int = logging.INFO) -> None:
    """Every stdlib log line of this process as one JSON object on stderr."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            _add_request_id,
            lambda _, __, event: {**event, "service": service},
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings too become JSON lines, not bare stderr text
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "tornado"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# ---- the metrics endpoint ---------------------------------------------------------------


def read_token(path: Path | None) -> bytes | None:
    """The scrape token, or None when metrics are not configured."""
    if path is None or not path.is_file():
        return None
    return path.read_bytes().strip() or None


def authorized(token: bytes | None, header: str | None) -> bool:
    """Whether an `Authorization: Bearer …` header presents the token (constant time)."""
    if token is None or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token)


def exposition() -> tuple[bytes, str]:
    """The metrics page and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _QuietHandler(WSGIRequestHandler):
    #: Seconds a connection may stay silent (the socket's timeout): an idle client is dropped.
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most `MAX_CONNECTIONS` at once; the rest are closed.

    wsgiref's own server handles one connection at a time with no timeout: one idle connection
    blocked every scrape (issue 12, finding 17).
    """

    daemon_threads = True
    block_on_close = False
    MAX_CONNECTIONS = 32

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: refused, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(host: str, port: int, token: bytes) -> WSGIServer:
    """Serve `/metrics` to bearers of `token` on a daemon thread (the worker's endpoint)."""

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if not authorized(token, environ.get("HTTP_AUTHORIZATION")):
            start(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"unauthorized\n"]
        body, content_type = exposition()
        start("200 OK", [("Content-Type", content_type)])
        return [body]

    server = make_server(host, port, app, server_class=_MetricsServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
