"""The one mapping of errors to RFC 9457 problem+json responses, and the audit of refusals.

Every `ApplianceError` carries its HTTP status and code; FastAPI's own validation and routing
errors are mapped here too, so no response of the API is anything but a problem document.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audit import AuditError, AuditSink, EventType
from ..errors import ApplianceError, Unauthorized
from ..observability import UNAUTHENTICATED
from ._auth_failures import AuthFailures, Failure

log = logging.getLogger("appliance.api")


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A problem+json response."""
    return JSONResponse(
        {
            "type": f"urn:appliance:problem:{code}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
        },
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def audit_refusal(audit: AuditSink, client: str | None, exc: ApplianceError) -> None:
    """One audit entry per refusal of an authenticated client (the others go through
    `audit_unauthenticated`): who, what and why; never the body."""
    common: dict[str, Any] = {"code": exc.code, "http_status": exc.status}
    try:
        if exc.status == 403 and client is not None:
            audit.record(EventType.POLICY_DENIED, client=client, **common)
        else:
            audit.record(
                EventType.SUBMISSION_REJECTED, **({"client": client} if client else {}), **common
            )
    except AuditError:
        log.warning("could not audit a refused request")


def audit_unauthenticated(
    audit: AuditSink, failures: AuthFailures, request: Request, exc: ApplianceError
) -> None:
    """A refusal before any signature verified (a 401, or a body refused before its signature
    could be checked): recorded with the key id it claimed, its route and request id (issue 12,
    finding 21), and counted per source and window unless its signature verified."""
    unauthorized = exc if isinstance(exc, Unauthorized) else None
    failure = Failure(
        code=exc.code,
        source=request.client.host if request.client else "unknown",
        route=getattr(request.scope.get("route"), "path", "unmatched"),
        status=exc.status,
        reason=unauthorized.reason if unauthorized else None,
        claimed_keyid=unauthorized.claimed_keyid if unauthorized else None,
        request_id=getattr(request.state, "request_id", None),
    )
    UNAUTHENTICATED.labels(exc.code).inc()
    if unauthorized is None or not unauthorized.verified:
        failures.refused(failure)
        return
    try:  # A replayed nonce: the signature verified, so whoever sent it holds the key.
        audit.record(
            EventType.AUTH_FAILED,
            code=failure.code,
            http_status=401,
            claimed_keyid=failure.claimed_keyid,
            route=failure.route,
            request_id=failure.request_id,
            remote_addr=failure.source,
        )
    except AuditError:
        log.warning("could not audit a refused request")


async def _appliance_error(request: Request, exc: ApplianceError) -> JSONResponse:
    services = getattr(request.app.state, "services", None)
    client = getattr(request.state, "client", None)
    if 400 <= exc.status < 500 and services is not None and client is None:
        # Nobody is authenticated yet: a 401, or a body refused before it could be verified
        # (413, a bad Content-Length). No unauthenticated caller buys an entry per request.
        await run_in_threadpool(
            audit_unauthenticated, services.audit, services.auth_failures, request, exc
        )
    elif 400 <= exc.status < 500 and services is not None:
        await run_in_threadpool(audit_refusal, services.audit, client, exc)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return problem(exc.status, exc.code, exc.title, exc.detail, headers)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return problem(400, "invalid_field", "Bad request", str(exc.errors()[0].get("msg")))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return problem(exc.status_code, f"http_{exc.status_code}", str(exc.detail), str(exc.detail))


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error the app can meet through `problem`."""
    app.exception_handler(ApplianceError)(_appliance_error)
    app.exception_handler(RequestValidationError)(_validation)
    app.exception_handler(StarletteHTTPException)(_http)
