"""The routes of docs/CONTRACT.md §2. Each handler reads as its steps: read and verify, parse,
authorize, count, act. Blocking calls (Redis, OpenBao) run in the thread pool."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import BadRequest, NotFound, Unauthorized
from ..observability import authorized, exposition
from ..registry import Client
from ..store import check_storage_budget
from ._authorize import authorize
from ._idempotency import Retryable
from ._requests import idempotency_key, parse_body, read_body, request_id
from ._schemas import TaskIn, WorkflowIn
from ._services import Services

router = APIRouter()


def services(request: Request) -> Services:
    """The services built at start-up."""
    svc: Services = request.app.state.services
    return svc


async def signed(request: Request) -> tuple[Services, bytes, Client]:
    """The services, the body (under the size cap) and the client whose signature verified;
    raises before anything else happens."""
    svc = services(request)
    settings = svc.settings
    body = await read_body(request, settings.max_body_bytes, settings.api_body_timeout_seconds)
    client = await run_in_threadpool(svc.authenticator.authenticate, request, body)
    return svc, body, client


@router.post("/v1/tasks", status_code=202)
async def submit_task(request: Request) -> JSONResponse:
    svc, body, client = await signed(request)
    retry = Retryable.from_header(idempotency_key(request), "/v1/tasks", body)
    task = parse_body(request, body, TaskIn)
    spec = authorize(svc.policy, client, task)
    await run_in_threadpool(check_storage_budget, svc.store, client)
    await run_in_threadpool(svc.limiter.hit, client, 1, svc.clock())
    accepted = await run_in_threadpool(
        svc.submissions.enqueue, client, spec, request_id(request), retry
    )
    return JSONResponse(accepted, status_code=202)


@router.post("/v1/workflows", status_code=202)
async def submit_workflow(request: Request) -> JSONResponse:
    svc, body, client = await signed(request)
    retry = Retryable.from_header(idempotency_key(request), "/v1/workflows", body)
    workflow = parse_body(request, body, WorkflowIn)
    if len(workflow.steps) > svc.settings.workflow_max_steps:
        raise BadRequest(
            f"a workflow has at most {svc.settings.workflow_max_steps} steps",
            code="too_many_steps",
        )
    specs = [authorize(svc.policy, client, step) for step in workflow.steps]
    await run_in_threadpool(check_storage_budget, svc.store, client)
    await run_in_threadpool(svc.limiter.hit, client, len(specs), svc.clock())
    accepted = await run_in_threadpool(
        svc.submissions.enqueue_workflow, client, specs, request_id(request), retry
    )
    return JSONResponse(accepted, status_code=202)


async def _result(request: Request, key: str) -> JSONResponse:
    svc, _, client = await signed(request)
    status, payload = await run_in_threadpool(svc.results.read, client, key)
    return JSONResponse(payload, status_code=status)


@router.get("/get-result")
async def get_result(request: Request, key: str = "") -> JSONResponse:
    return await _result(request, key)


@router.get("/v1/results/{key}")
async def get_result_by_path(request: Request, key: str) -> JSONResponse:
    return await _result(request, key)


@router.delete("/v1/results/{key}")
async def revoke_result(request: Request, key: str) -> JSONResponse:
    svc, _, client = await signed(request)
    return JSONResponse(await run_in_threadpool(svc.results.revoke, client, key))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    svc = services(request)
    if svc.metrics_token is None:
        raise NotFound("metrics are not configured", code="not_found")
    if not authorized(svc.metrics_token, request.headers.get("authorization")):
        raise Unauthorized("a bearer token is required", code="metrics_unauthorized")
    body, content_type = exposition()
    return Response(body, media_type=content_type)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(services(request).readiness)
    ready = all(checks.values())
    return JSONResponse(
        {"ready": ready, "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
