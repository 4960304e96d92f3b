"""The HTTP API (CONTRACT.md §2): signed submissions in, sealed results out.

Every handler reads as the steps it takes: read the body under a cap, verify the signature,
parse and check against the client's policy, then act. Blocking calls (Redis, OpenBao) run in
the thread pool. Any `ApplianceError` becomes one problem+json response in `_problem`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import sandbox

from ..audit import AuditError, AuditLog, AuditSink, EventType, TransitSigner
from ..errors import (
    ApplianceError,
    BadRequest,
    Conflict,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    SealBroken,
    Unauthorized,
    UnsupportedMediaType,
)
from ..jobs import MESSAGE_TTL_SECONDS, JobMessage, open_result, seal_job, sign_message
from ..observability import (
    HTTP_LATENCY,
    HTTP_REQUESTS,
    authorized,
    current_request_id,
    exposition,
    new_request_id,
    read_token,
)
from ..registry import Client, RedisGeneration, Registry
from ..results import ResultStore, Stored, check_result_key, new_result_key, redis_unavailable
from ..secret_names import check_secret_name
from ..settings import Settings
from ..signatures import UnverifiedRequest, verify_request
from ..vault import Transit, VaultSession
from ..worker.celery_config import HEARTBEAT_KEY, TASK_NAME, make_celery, publish

WORKER_FRESH_SECONDS = 20
access_log = logging.getLogger("appliance.api.access")
M = TypeVar("M", bound=BaseModel)


class TaskIn(BaseModel):
    """A task submission (CONTRACT.md §2)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    module: str = Field(max_length=256 * 1024)
    function: str = Field(max_length=100)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list, max_length=32)
    imports: list[str] = Field(default_factory=list, max_length=32)


class WorkflowIn(BaseModel):
    """A workflow submission (CONTRACT.md §2): steps shaped like tasks, run in order, each
    receiving the previous step's result as its first positional argument."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: list[TaskIn] = Field(min_length=1, max_length=100)


class RateLimiter:
    """Per-client fixed windows in Redis: jobs per minute and per UTC day.

    A refused request is not counted. Each step of a workflow counts as one job.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def hit(self, client: Client, cost: int, now: float) -> None:
        """Count `cost` jobs for `client`, or raise RateLimited (counting nothing)."""
        windows = [(f"m:{int(now // 60)}", client.rate_per_minute, 60 - int(now % 60))]
        if client.daily_quota:
            windows.append((f"d:{int(now // 86400)}", client.daily_quota,
                            86400 - int(now % 86400)))
        keys = [f"ratelimit:{client.keyid}:{suffix}" for suffix, _, _ in windows]
        with redis_unavailable():
            pipe = self.redis.pipeline(transaction=True)
            for key, (_, _, left) in zip(keys, windows, strict=True):
                pipe.incrby(key, cost)
                pipe.expire(key, left + 1)
            counts = pipe.execute()[::2]
            over = [w for w, count in zip(windows, counts, strict=True) if count > w[1]]
            if over:
                pipe = self.redis.pipeline(transaction=True)
                for key in keys:
                    pipe.decrby(key, cost)
                pipe.execute()
        if over:
            suffix, limit, left = over[0]
            what = "jobs per minute" if suffix.startswith("m:") else "jobs per day"
            raise RateLimited(f"over the client's limit of {limit} {what}", retry_after=left)


class RedisNonces:
    """Nonces per key id in Redis, kept for the signature window."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def claim(self, keyid: str, nonce: str, ttl_seconds: int) -> bool:
        digest = hashlib.sha256(nonce.encode()).hexdigest()
        with redis_unavailable():
            return bool(self.redis.set(f"nonce:{keyid}:{digest}", "1", nx=True, ex=ttl_seconds))


@dataclass
class Services:
    """What the API talks to; built once at start-up."""

    settings: Settings
    registry: Registry
    transit: Transit
    store: ResultStore
    nonces: RedisNonces
    celery: Celery
    vault: VaultSession
    policy: sandbox.Policy
    audit: AuditSink
    limiter: RateLimiter
    metrics_token: bytes | None = None
    clock: Callable[[], float] = time.time

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Log in with the API's AppRole and connect to Redis as the `api` user."""
        from ..redis_conn import connect

        assert settings.vault_role_id_file and settings.vault_secret_id_wrap_file
        session = VaultSession.from_approle(
            settings.vault_addr, settings.vault_role_id_file, settings.vault_secret_id_wrap_file
        )
        client = connect(settings, session)
        transit = Transit(session, settings.transit_mount)
        assert settings.audit_log is not None
        audit = AuditLog.open(settings.audit_log, TransitSigner(transit), source="api")
        audit.start_checkpoint_timer()
        return cls(
            settings=settings,
            registry=Registry(session, settings.kv_mount,
                              generation=RedisGeneration(client)),
            transit=transit,
            store=ResultStore(client, settings.result_prefix, settings.result_ttl_seconds),
            nonces=RedisNonces(client),
            celery=make_celery(settings, "appliance-api"),
            vault=session,
            policy=sandbox.Policy.load(),
            audit=audit,
            limiter=RateLimiter(client),
            metrics_token=read_token(settings.metrics_token_file),
        )


# ---- steps -------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length", code="bad_content_length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _ResolvedClient:
    """The registry as the signature verifier's key resolver, keeping the client it resolved:
    one registry lookup per request, and the policy checked is the one whose key verified."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.client: Client | None = None

    def public_key(self, keyid: str) -> Ed25519PublicKey | None:
        self.client = self.registry.get(keyid)
        return self.client.public_key() if self.client else None


def authenticate(services: Services, request: Request, body: bytes) -> Client:
    """Verify the signature and return the signing client (or raise)."""
    unverified = UnverifiedRequest(request.method, str(request.url), dict(request.headers))
    resolved = _ResolvedClient(services.registry)
    keyid = verify_request(unverified, body, resolved, services.nonces, services.clock)
    client = resolved.client
    if client is None or client.keyid != keyid:  # verify_request resolved no other key.
        raise Unauthorized(f"unknown or disabled key {keyid!r}", code="unknown_key")
    request.state.client = client.keyid
    return client


def parse_body(request: Request, body: bytes, model: type[M]) -> M:
    """Parse a JSON body into `model`; 415 when not JSON, 400 when malformed."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="malformed_json") from exc
    if not isinstance(raw, dict):
        raise BadRequest("body must be a JSON object", code="malformed_json")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(_first_error(exc), code="invalid_field") from exc


def request_id(request: Request) -> str | None:
    """The id the middleware gave this request."""
    rid: str | None = getattr(request.state, "request_id", None)
    return rid


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def authorize(services: Services, client: Client, task: TaskIn) -> dict[str, Any]:
    """Check the task against the sandbox policy and the client's; return the job spec."""
    if not sandbox.ENTRY_PATTERN.fullmatch(task.function):
        raise BadRequest("function must be a plain function name", code="invalid_function")
    # Secret names become OpenBao paths: a malformed one is refused before any policy check.
    for name in task.secrets:
        check_secret_name(name)
    if not client.may_call(task.function):
        raise Forbidden(f"client may not call {task.function!r}", code="function_not_allowed")
    try:
        limits = services.policy.limits(task.limits)
    except sandbox.LimitNotAllowed as exc:
        raise Forbidden(str(exc), code="limits_not_allowed") from exc
    except sandbox.InvalidRequest as exc:
        raise BadRequest(str(exc), code="invalid_limits") from exc
    if client.limits:
        for name, cap in client.limits.items():
            if getattr(limits, name, 0) > cap:
                raise Forbidden(f"limit {name} above the client's maximum {cap}",
                                code="limits_not_allowed")
    try:
        imports = services.policy.check_imports(task.imports)
    except sandbox.ImportNotAllowed as exc:
        raise Forbidden(str(exc), code="import_not_allowed") from exc
    refused = [m for m in imports if m not in client.allowed_imports]
    if refused:
        raise Forbidden(f"client may not import {', '.join(refused)}", code="import_not_allowed")
    refused = [s for s in task.secrets if not client.may_read_secret(s)]
    if refused:
        raise Forbidden(f"client may not read secret {refused[0]!r}", code="secret_not_allowed")
    return {
        "module": task.module,
        "function": task.function,
        "args": task.args,
        "kwargs": task.kwargs,
        "limits": limits.to_dict(),
        "imports": list(imports),
        "secrets": list(task.secrets),
        # The worker checks the names against these again before it reads a secret.
        "secret_globs": list(client.allowed_secrets) if task.secrets else [],
    }


def _sign_job(services: Services, client: Client, spec: dict[str, Any]) -> JobMessage:
    """Seal a job and sign its message: identifiers and ciphertext only."""
    task_id = str(uuid.uuid4())
    result_key = new_result_key(spec["function"], int(services.clock() * 1000))
    sealed = seal_job(services.transit, spec, task_id, result_key, client.keyid)
    return sign_message(services.transit, JobMessage(task_id, result_key, client.keyid, sealed),
                        TASK_NAME, services.clock())


def _publish(services: Services, message: JobMessage, request_id: str | None) -> None:
    try:
        publish(services.celery, services.settings, message.to_wire(), message.task_id,
                request_id)
    except Exception as exc:  # kombu raises many types; the job was not accepted.
        raise DependencyUnavailable("the broker is unreachable") from exc


def _audit_accepted(services: Services, message: JobMessage, spec: dict[str, Any],
                    request_id: str | None, **step: Any) -> None:
    services.audit.record(
        EventType.SUBMISSION_ACCEPTED, client=message.client, function=spec["function"],
        task_id=message.task_id, result_key=message.result_key, module_source=spec["module"],
        args=spec["args"], kwargs=spec["kwargs"], request_id=request_id, **step,
    )


def enqueue(services: Services, client: Client, spec: dict[str, Any],
            request_id: str | None = None) -> dict[str, str]:
    """Seal the job, record it as queued, and hand it to the broker."""
    message = _sign_job(services, client, spec)
    services.store.mark(message.result_key, client.keyid, "queued", message.task_id)
    _publish(services, message, request_id)
    _audit_accepted(services, message, spec, request_id)
    return {"task_id": message.task_id, "result_key": message.result_key, "status": "queued"}


def enqueue_workflow(services: Services, client: Client, specs: list[dict[str, Any]],
                     request_id: str | None = None) -> dict[str, Any]:
    """Seal and sign every step up front; queue the first. The signed messages of the later
    steps wait in Redis (`workflow:<id>`) until the worker that finishes a step enqueues the
    next one, with the step's value sealed to it."""
    workflow_id = str(uuid.uuid4())
    steps = [{**spec, "workflow": {"id": workflow_id, "step": i, "steps": len(specs)}}
             for i, spec in enumerate(specs)]
    messages = [_sign_job(services, client, spec) for spec in steps]
    for message in messages:
        services.store.mark(message.result_key, client.keyid, "queued", message.task_id)
    services.store.save_workflow(
        workflow_id, {i: json.dumps(m.to_wire()) for i, m in enumerate(messages) if i},
        MESSAGE_TTL_SECONDS,
    )
    _publish(services, messages[0], request_id)
    for i, (message, spec) in enumerate(zip(messages, steps, strict=True)):
        _audit_accepted(services, message, spec, request_id, workflow_id=workflow_id, step=i)
    return {
        "workflow_id": workflow_id,
        "result_key": messages[-1].result_key,
        "status": "queued",
        "steps": [{"task_id": m.task_id, "result_key": m.result_key} for m in messages],
    }


def _own_record(services: Services, client: Client, untrusted_key: str) -> tuple[str, Stored]:
    """The well-formed key and its record, when it exists and belongs to `client`."""
    key = check_result_key(untrusted_key)
    stored = services.store.get(key)
    if stored is None:
        raise NotFound("no such result, or it has expired", code="result_not_found")
    if stored.client != client.keyid:
        raise Forbidden("this result belongs to another client", code="not_your_result")
    return key, stored


def revoke(services: Services, client: Client, untrusted_key: str) -> dict[str, str]:
    """Revoke a queued job (it will not run), or forget a finished result early."""
    key, stored = _own_record(services, client, untrusted_key)
    if stored.state == "done":
        services.store.delete(key)
        outcome = "deleted"
    elif stored.state == "revoked" or services.store.revoke(key, client.keyid) in (
        "queued", "revoked"
    ):
        outcome = "revoked"
    else:
        raise Conflict("the job is already running; it cannot be revoked",
                       code="already_running")
    services.audit.record(EventType.TASK_REVOKED, client=client.keyid, result_key=key,
                          status=outcome)
    return {"key": key, "status": outcome}


def read_result(
    services: Services, client: Client, untrusted_key: str
) -> tuple[int, dict[str, Any]]:
    """The status and body for a result read by `client`."""
    key, stored = _own_record(services, client, untrusted_key)
    if stored.sealed is None:
        # "queued", "running", or "revoked" until a worker drains the revoked message.
        return 202, {"key": key, "status": stored.state}
    try:
        body = open_result(services.transit, stored.sealed, key, client.keyid)
    except SealBroken as exc:
        raise NotFound("the result cannot be opened", code="result_unavailable") from exc
    expires_at = services.clock() + stored.ttl_ms / 1000
    services.audit.record(EventType.RESULT_READ, client=client.keyid, result_key=key,
                          status=body["status"], http_status=200)
    return 200, {
        "key": key,
        "status": body["status"],
        "result": body["result"],
        "error": body["error"],
        "stdout": body.get("stdout", ""),
        "usage": body.get("usage"),
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)),
    }


# ---- the application ------------------------------------------------------------------------


def _problem(status: int, code: str, title: str, detail: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": f"urn:appliance:problem:{code}", "title": title, "status": status,
         "detail": detail, "code": code},
        status_code=status, media_type="application/problem+json", headers=headers,
    )


def create_app(build: Callable[[], Services]) -> FastAPI:
    """The FastAPI app; `build` makes the services at start-up (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await run_in_threadpool(build)
        yield

    app = FastAPI(title="Sandboxed execution appliance", version="0.1.0", lifespan=lifespan)

    def services(request: Request) -> Services:
        svc: Services = request.app.state.services
        return svc

    async def signed(request: Request) -> tuple[Services, bytes, Client]:
        """The services, the body (under the size cap) and the client whose signature
        verified; raises before anything else happens."""
        svc = services(request)
        body = await read_body(request, svc.settings.max_body_bytes)
        return svc, body, await run_in_threadpool(authenticate, svc, request, body)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Response:
        """A request id for every request (the client's `X-Request-ID` if well-formed), and
        its count and latency under its route template."""
        rid = new_request_id(request.headers.get("x-request-id"))
        request.state.request_id = rid
        token = current_request_id.set(rid)
        started, status = time.perf_counter(), 500
        try:
            response: Response = await call_next(request)
            status = response.status_code
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
            HTTP_LATENCY.labels(route, request.method).observe(elapsed)
            # The access log: the route template, never the path (it may hold a result key).
            access_log.info("request", extra={"method": request.method, "route": route,
                                              "status": status,
                                              "duration_ms": round(elapsed * 1000, 2)})
            current_request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(ApplianceError)
    async def _appliance_error(request: Request, exc: ApplianceError) -> JSONResponse:
        if 400 <= exc.status < 500:
            await run_in_threadpool(_audit_refusal, request, exc)
        headers = None
        if getattr(exc, "retry_after", None):
            headers = {"Retry-After": str(exc.retry_after)}  # type: ignore[attr-defined]
        return _problem(exc.status, exc.code, exc.title, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem(400, "invalid_field", "Bad request", str(exc.errors()[0].get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, f"http_{exc.status_code}", str(exc.detail),
                        str(exc.detail))

    @app.post("/v1/tasks", status_code=202)
    async def submit_task(request: Request) -> JSONResponse:
        svc, body, client = await signed(request)
        task = parse_body(request, body, TaskIn)
        spec = authorize(svc, client, task)
        await run_in_threadpool(svc.limiter.hit, client, 1, svc.clock())
        accepted = await run_in_threadpool(enqueue, svc, client, spec, request_id(request))
        return JSONResponse(accepted, status_code=202)

    @app.post("/v1/workflows", status_code=202)
    async def submit_workflow(request: Request) -> JSONResponse:
        svc, body, client = await signed(request)
        workflow = parse_body(request, body, WorkflowIn)
        if len(workflow.steps) > svc.settings.workflow_max_steps:
            raise BadRequest(f"a workflow has at most {svc.settings.workflow_max_steps} steps",
                             code="too_many_steps")
        specs = [authorize(svc, client, step) for step in workflow.steps]
        await run_in_threadpool(svc.limiter.hit, client, len(specs), svc.clock())
        accepted = await run_in_threadpool(enqueue_workflow, svc, client, specs,
                                           request_id(request))
        return JSONResponse(accepted, status_code=202)

    async def _result(request: Request, key: str) -> JSONResponse:
        svc, _, client = await signed(request)
        status, payload = await run_in_threadpool(read_result, svc, client, key)
        return JSONResponse(payload, status_code=status)

    @app.get("/get-result")
    async def get_result(request: Request, key: str = "") -> JSONResponse:
        return await _result(request, key)

    @app.get("/v1/results/{key}")
    async def get_result_by_path(request: Request, key: str) -> JSONResponse:
        return await _result(request, key)

    @app.delete("/v1/results/{key}")
    async def revoke_result(request: Request, key: str) -> JSONResponse:
        svc, _, client = await signed(request)
        return JSONResponse(await run_in_threadpool(revoke, svc, client, key))

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        svc = services(request)
        if svc.metrics_token is None:
            raise NotFound("metrics are not configured", code="not_found")
        if not authorized(svc.metrics_token, request.headers.get("authorization")):
            raise Unauthorized("a bearer token is required", code="metrics_unauthorized")
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        checks = await run_in_threadpool(readiness, services(request))
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "5"})

    return app


def _audit_refusal(request: Request, exc: ApplianceError) -> None:
    """One audit entry per refused request: who (if known), what and why; never the body."""
    svc: Services | None = getattr(request.app.state, "services", None)
    if svc is None:
        return
    client = getattr(request.state, "client", None)
    common: dict[str, Any] = {"code": exc.code, "http_status": exc.status}
    try:
        if exc.status == 401:
            svc.audit.record(EventType.AUTH_FAILED, **common)
        elif exc.status == 403 and client is not None:
            svc.audit.record(EventType.POLICY_DENIED, client=client, **common)
        else:
            svc.audit.record(EventType.SUBMISSION_REJECTED,
                             **({"client": client} if client else {}), **common)
    except AuditError:
        logging.getLogger("appliance.api").warning("could not audit a refused request")


def readiness(svc: Services) -> dict[str, bool]:
    """Redis, OpenBao and at least one live worker."""
    checks = {"redis": False, "vault": svc.vault.healthy(), "worker": False}
    try:
        checks["redis"] = bool(svc.store.redis.ping())
        fresh = svc.store.redis.zcount(HEARTBEAT_KEY, svc.clock() - WORKER_FRESH_SECONDS, "+inf")
        checks["worker"] = int(fresh) > 0
    except redis.RedisError:
        pass
    return checks
