"""The HTTP API (docs/CONTRACT.md §2): signed submissions in, sealed results out.

`create_app` is only the lifespan (build the services), the observing middleware, the problem
handlers and the routes. The routes live in `_routes`, the use cases in `_jobs`, the wire models
in `_schemas`, the error mapping in `_problems` and the composition in `_services`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..observability import HTTP_LATENCY, HTTP_REQUESTS, current_request_id, new_request_id
from ._problems import install_problem_handlers
from ._routes import router
from ._services import Services

access_log = logging.getLogger("appliance.api.access")


def create_app(build: Callable[[], Services]) -> FastAPI:
    """The FastAPI app; `build` makes the services at start-up (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(build)
        app.state.services = services
        services.auth_failures.start()
        try:
            yield
        finally:
            # Every counted unauthenticated failure reaches the audit log before the API stops.
            await run_in_threadpool(services.auth_failures.close)

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, which an appliance
    # must not make its operators' browsers fetch (issue 12, finding 24). The schema stays at
    # /openapi.json (CONTRACT §2); any OpenAPI viewer the operator trusts can read it.
    app = FastAPI(
        title="Sandboxed execution appliance",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.middleware("http")(_observe)
    install_problem_handlers(app)
    app.include_router(router)
    return app


async def _observe(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """A request id for every request (the client's `X-Request-ID` if well-formed), and its
    count and latency under its route template."""
    rid = new_request_id(request.headers.get("x-request-id"))
    request.state.request_id = rid
    token = current_request_id.set(rid)
    started, status = time.perf_counter(), 500
    try:
        response = await call_next(request)
        status = response.status_code
    finally:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        elapsed = time.perf_counter() - started
        HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        HTTP_LATENCY.labels(route, request.method).observe(elapsed)
        # The access log: the route template, never the path (it may hold a result key).
        access_log.info(
            "request",
            extra={
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        current_request_id.reset(token)
    response.headers["X-Request-ID"] = rid
    return response
