"""The Celery worker: `celery -A appliance.worker.app worker --pool threads`.

Start-up order matters: the sandbox fork servers are spawned first, before this process logs in
to OpenBao or reads a Redis password, so the processes that fork user code never held one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Task, signals

import sandbox

from ..audit import AuditLog, AuditSink, EventType, TransitSigner
from ..errors import BadRequest, DependencyUnavailable, NotFound, SealBroken
from ..jobs import (
    JobMessage,
    MessageRejected,
    attach_carry,
    open_carry,
    open_job,
    seal_result,
    seal_results,
    verify_message,
)
from ..observability import (
    JOB_DURATION,
    JOBS,
    configure_logging,
    current_request_id,
    observe_usage,
    read_token,
    serve_metrics,
)
from ..queue import TASK_NAME, make_celery, publish
from ..secret_names import check_secret_name, glob_allows
from ..settings import Settings, get_settings
from ..store import RedisResultStore, ResultStore, connect
from ..vault import Transit, VaultSession, read_secrets
from .sandboxes import SandboxPool

log = logging.getLogger("appliance.worker")

app = make_celery(get_settings())


@dataclass
class Runtime:
    """Everything a job needs, built once per worker process."""

    settings: Settings
    sandboxes: SandboxPool
    transit: Transit
    store: ResultStore
    audit: AuditSink


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def build_runtime(settings: Settings, concurrency: int) -> Runtime:
    """Spawn the fork servers, then log in: the order is the security property."""
    pool = SandboxPool(concurrency)
    files = settings.service_files()
    session = VaultSession.from_approle(
        settings.vault_addr, files.role_id_file, files.secret_id_wrap_file
    )
    store = RedisResultStore(
        connect(settings, session), settings.result_prefix, settings.result_ttl_seconds
    )
    transit = Transit(session, settings.transit_mount)
    audit = AuditLog.open(files.audit_log, TransitSigner(transit), source="worker")
    audit.start_checkpoint_timer()
    return Runtime(settings, pool, transit, store, audit)


def runtime() -> Runtime:
    """The process's runtime (built at worker start)."""
    if _runtime is None:
        raise RuntimeError("worker runtime not initialised")
    return _runtime


def _on_setup_logging(**_: Any) -> None:
    # Connecting to setup_logging stops Celery from configuring logging: every line is JSON
    # instead; celeryd_init comes earlier, before Celery's own start-up warnings.
    configure_logging("worker")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _runtime
    concurrency = int(getattr(sender, "concurrency", None) or os.cpu_count() or 1)
    with _runtime_lock:
        if _runtime is None:
            try:
                _runtime = build_runtime(get_settings(), concurrency)
            except Exception:
                # Celery swallows errors raised by signal handlers: a worker that cannot
                # isolate or authenticate must not come up looking healthy.
                log.critical("worker start-up failed", exc_info=True)
                raise SystemExit(1) from None
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()
    settings = get_settings()
    token = read_token(settings.metrics_token_file)
    if settings.metrics_port and token:
        serve_metrics("127.0.0.1", settings.metrics_port, token)


def _on_worker_shutdown(**_: Any) -> None:
    if _runtime is not None:
        _runtime.sandboxes.close()


def _heartbeat() -> None:
    name = owner()
    while True:
        try:
            runtime().store.beat(name, time.time())
        except Exception:  # noqa: BLE001 - a missed heartbeat only delays readiness
            log.warning("heartbeat failed")
        time.sleep(runtime().settings.heartbeat_seconds)


def result_body(outcome: sandbox.Outcome) -> dict[str, Any]:
    """The result a client reads: value on success, the sandbox's error otherwise."""
    ok = outcome.status == "ok"
    err = None if ok else {"code": outcome.status, **(outcome.error or {})}
    return {
        "status": "succeeded" if ok else "failed",
        "result": outcome.value if ok else None,
        "error": err,
        "stdout": outcome.stdout,
        "usage": outcome.to_dict()["usage"],
    }


def _failure(code: str, message: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "result": None,
        "stdout": "",
        "usage": None,
        "error": {"code": code, "type": "JobError", "message": message},
    }


class InFlight(Exception):
    """Raised when a message is already running on a live worker (a duplicate delivery)."""


def owner() -> str:
    """This worker's name in claims and heartbeats: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def execute(rt: Runtime, message: JobMessage, request_id: str | None = None) -> str:
    """Run one job: verify, open, claim, sandbox, seal, store. Returns the outcome status only.

    A message the API did not sign, an expired one, or one already run (a replay) is refused
    before anything else happens. A message claimed by a live worker is a duplicate delivery and
    waits (InFlight). One claimed by a dead worker is a redelivery after a crash: if the dead
    worker stored a result, its work is finished without running the job again; otherwise the
    job runs again, at most `max_attempts` times in all, then ends as failed.
    """
    now = time.time()
    verify_message(rt.transit, message, TASK_NAME, now)
    ttl = message.expires - int(now)
    spec = _open(rt, message)
    with _in_hand.only(message):
        return _claim_and_run(rt, message, spec, ttl, now, request_id)


def _claim_and_run(
    rt: Runtime,
    message: JobMessage,
    spec: dict[str, Any] | None,
    ttl: int,
    now: float,
    request_id: str | None,
) -> str:
    claim = rt.store.claim(message.nonce, ttl, owner())
    if claim is None:
        if rt.store.has_result(message.result_key):
            raise MessageRejected("replayed")
        return _run_and_store(rt, message, spec, ttl, request_id)
    if claim.state == "done":
        raise MessageRejected("replayed")
    # Ours, yet not running here (`_in_hand`): our own retry after OpenBao or Redis failed.
    retry = claim.owner == owner()
    fresh = 3 * rt.settings.heartbeat_seconds
    if not retry and rt.store.worker_alive(claim.owner, fresh, now):
        raise InFlight(message.task_id)
    if rt.store.has_result(message.result_key):
        _enqueue_staged(rt, message, spec, request_id)  # It died between storing and enqueuing.
        rt.store.finish_claim(message.nonce, ttl)
        return "recovered"
    if not retry and claim.attempts >= rt.settings.max_attempts:
        body = _failure(
            "worker_lost",
            f"the job's worker died {claim.attempts} times while "
            "running it; it is not retried again",
        )
        _finish(rt, message, spec, body, ttl, request_id)
        return "worker_lost"
    if not rt.store.take_over(message.nonce, ttl, owner(), claim, count=not retry):
        raise InFlight(message.task_id)
    return _run_and_store(rt, message, spec, ttl, request_id)


class _InHand:
    """Nonces of the messages this process is handling right now: a second delivery of one of
    them to this process waits (InFlight) instead of being taken for a retry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nonces: set[str] = set()

    @contextmanager
    def only(self, message: JobMessage) -> Iterator[None]:
        with self._lock:
            if message.nonce in self._nonces:
                raise InFlight(message.task_id)
            self._nonces.add(message.nonce)
        try:
            yield
        finally:
            with self._lock:
                self._nonces.discard(message.nonce)


_in_hand = _InHand()


def _open(rt: Runtime, message: JobMessage) -> dict[str, Any] | None:
    """The job's spec, with the carried value first among the arguments of a later workflow
    step; None when the job does not open (it then ends as `rejected`)."""
    try:
        spec = open_job(rt.transit, message)
    except SealBroken:
        return None
    workflow = spec.get("workflow")
    if workflow and workflow["step"] > 0:
        try:
            carried = open_carry(rt.transit, message)
        except SealBroken:
            # Only a worker can seal a carry: a later step without one was not enqueued by us.
            raise MessageRejected("bad carry") from None
        spec = {**spec, "args": [carried, *spec.get("args", [])]}
    return spec


def _run_and_store(
    rt: Runtime, message: JobMessage, spec: dict[str, Any] | None, ttl: int, request_id: str | None
) -> str:
    if spec is None:
        body = _failure("rejected", "the job could not be opened")
    elif not rt.store.start(message.result_key, message.client, message.task_id):
        body = _failure("revoked", "the job was revoked before it started")
    else:
        rt.audit.record(
            EventType.EXECUTION_STARTED,
            task_id=message.task_id,
            function=spec["function"],
            client=message.client,
            result_key=message.result_key,
            module_source=spec["module"],
            args=spec.get("args", []),
            kwargs=spec.get("kwargs", {}),
            request_id=request_id,
            **_step_fields(spec),
        )
        body = _run(rt, spec)
    return _finish(rt, message, spec, body, ttl, request_id)


def _step_fields(spec: dict[str, Any] | None) -> dict[str, Any]:
    workflow = (spec or {}).get("workflow")
    return {"workflow_id": workflow["id"], "step": workflow["step"]} if workflow else {}


def _finish(
    rt: Runtime,
    message: JobMessage,
    spec: dict[str, Any] | None,
    body: dict[str, Any],
    ttl: int,
    request_id: str | None,
) -> str:
    """Seal and store the result; in a workflow, enqueue the next step or skip the rest."""
    workflow = (spec or {}).get("workflow")
    if workflow is None:
        rt.store.put(
            message.result_key,
            message.client,
            seal_result(rt.transit, body, message.result_key, message.client),
        )
    elif body["status"] == "succeeded" and workflow["step"] + 1 < workflow["steps"]:
        _advance(rt, message, workflow, body, request_id)
    else:
        _end_workflow(rt, message, spec or {}, workflow, body)
    rt.store.finish_claim(message.nonce, ttl)
    status = str(body["error"]["code"] if body["error"] else "ok")
    finished: dict[str, Any] = {"client": message.client, "result_key": message.result_key}
    if spec is not None:
        finished.update(
            function=spec["function"], module_source=spec["module"], **_step_fields(spec)
        )
    if body.get("usage"):
        finished["usage"] = body["usage"]
    if body["status"] == "succeeded":
        finished["result"] = body["result"]
    rt.audit.record(
        EventType.EXECUTION_FINISHED,
        task_id=message.task_id,
        status=status,
        request_id=request_id,
        **finished,
    )
    JOBS.labels(status).inc()
    observe_usage(body.get("usage"))
    return status


def _advance(
    rt: Runtime,
    message: JobMessage,
    workflow: dict[str, Any],
    body: dict[str, Any],
    request_id: str | None,
) -> None:
    """Store this step's result and enqueue the next step, carrying the value to it sealed."""
    sealed = seal_result(rt.transit, body, message.result_key, message.client)
    step = workflow["step"] + 1
    stored = rt.store.workflow_messages(workflow["id"]).get(str(step))
    if stored is None:  # The workflow outlived its record (expired): the rest cannot run.
        log.warning("workflow %s: step %d is gone; it will not run", workflow["id"], step)
        rt.store.put(message.result_key, message.client, sealed)
        return
    nxt = attach_carry(rt.transit, JobMessage.from_wire(json.loads(stored)), body["result"])
    rt.store.put_and_stage(
        message.result_key, message.client, sealed, workflow["id"], step, json.dumps(nxt.to_wire())
    )
    _publish(rt, nxt, request_id)
    rt.store.unstage(workflow["id"], step)


def _publish(rt: Runtime, message: JobMessage, request_id: str | None) -> None:
    # On DependencyUnavailable the task is retried, and the retry enqueues the staged step.
    publish(app, rt.settings, message, request_id)


def _enqueue_staged(
    rt: Runtime, message: JobMessage, spec: dict[str, Any] | None, request_id: str | None
) -> None:
    """After a crash: enqueue the next step if the dead worker staged it but did not send it."""
    workflow = (spec or {}).get("workflow")
    if not workflow:
        return
    step = workflow["step"] + 1
    staged = rt.store.workflow_messages(workflow["id"]).get(f"ready:{step}")
    if staged is not None:
        nxt = JobMessage.from_wire(json.loads(staged))
        _publish(rt, nxt, request_id)
        rt.store.unstage(workflow["id"], step)


def _end_workflow(
    rt: Runtime,
    message: JobMessage,
    spec: dict[str, Any],
    workflow: dict[str, Any],
    body: dict[str, Any],
) -> None:
    """The last step, or a failed one: store its result and a `skipped` result for every step
    after it, and drop the workflow record, in one transaction."""
    later = [
        JobMessage.from_wire(json.loads(wire))
        for field, wire in rt.store.workflow_messages(workflow["id"]).items()
        if field.isdigit() and int(field) > workflow["step"]
    ]
    skipped = {
        "status": "skipped",
        "result": None,
        "stdout": "",
        "usage": None,
        "error": {
            "code": "skipped",
            "type": "WorkflowStepSkipped",
            "message": f"step {workflow['step']} ({spec.get('function', '?')}) did not "
            f"succeed: {body['error']['code'] if body['error'] else '?'}",
            "failed_step": workflow["step"],
            "failed_result_key": message.result_key,
        },
    }
    bodies = {message.result_key: body, **{m.result_key: skipped for m in later}}
    rt.store.put_many(
        seal_results(rt.transit, bodies, message.client), message.client, workflow["id"]
    )
    for m in later:
        rt.audit.record(
            EventType.EXECUTION_FINISHED,
            task_id=m.task_id,
            status="skipped",
            client=m.client,
            result_key=m.result_key,
            workflow_id=workflow["id"],
        )


def _run(rt: Runtime, spec: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs", {}))
    names = list(spec.get("secrets", []))
    values: dict[str, Any] = {}
    if names:
        refused = secrets_refused(names, spec.get("secret_globs", []))
        if refused is not None:
            return _failure("secret_not_allowed", refused)
        try:
            values = read_secrets(rt.transit.session, names, rt.settings.kv_mount)
        except (NotFound, SealBroken):
            return _failure("secret_unavailable", "a named secret does not exist")
        # Secrets reach the function as one keyword argument, `secrets`: {name: {field: value}}.
        kwargs["secrets"] = values
    try:
        with rt.sandboxes.borrow() as sb:
            outcome = sb.run(
                spec["module"],
                spec["function"],
                spec.get("args", []),
                kwargs,
                spec.get("limits", {}),
                spec.get("imports", []),
            )
    except sandbox.InvalidRequest as exc:
        return _failure("rejected", str(exc))
    return redact(result_body(outcome), values)


def secrets_refused(names: list[Any], globs: list[Any]) -> str | None:
    """Why the job may not read these secrets, or None. Defence in depth behind the API's
    check: each name must be well-formed and allowed by a glob of the client's policy that the
    API sealed into the job (`secret_globs`); a job sealed without globs reads no secret."""
    for name in names:
        try:
            check_secret_name(name)
        except BadRequest:
            return "a secret name is malformed"
        if not any(isinstance(glob, str) and glob_allows(glob, name) for glob in globs):
            return f"the client may not read secret {name!r}"
    return None


def redact(body: dict[str, Any], secret_values: dict[str, Any]) -> dict[str, Any]:
    """Replace every secret value that the function echoed (in its value, stdout or error)."""
    needles = sorted(
        {v for fields in secret_values.values() for v in _strings(fields) if len(v) >= 4},
        key=len,
        reverse=True,
    )
    if not needles:
        return body
    text = json.dumps(body)
    for needle in needles:
        text = text.replace(json.dumps(needle)[1:-1], "[redacted]")
    redacted: dict[str, Any] = json.loads(text)
    return redacted


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def _run_job(self: Task, message: Any) -> str:
    """The only task: its argument is identifiers and ciphertext."""
    request_id = getattr(self.request, "appliance_request_id", None)
    token = current_request_id.set(request_id)
    started = time.perf_counter()
    # The task id the message claims (the API's), else the broker's: refusals are audited
    # under the id that links them to a submission.
    claimed = message.get("task_id") if isinstance(message, dict) else None
    task_id = claimed if isinstance(claimed, str) else str(self.request.id)
    try:
        status = execute(runtime(), JobMessage.from_wire(message), request_id)
        JOB_DURATION.observe(time.perf_counter() - started)
        log.info("job finished", extra={"task_id": task_id, "status": status})
        return status
    except InFlight as exc:
        # Running on a live worker (a duplicate delivery): look again once it may have finished.
        raise self.retry(countdown=runtime().settings.heartbeat_seconds, exc=exc) from exc
    except MessageRejected as exc:
        log.warning("refused task message %s: %s", self.request.id, exc.reason)
        runtime().audit.record(
            EventType.TASK_REJECTED,
            code=exc.reason.replace(" ", "_"),
            task_id=task_id,
            request_id=request_id,
        )
        JOBS.labels("rejected").inc()
        return "rejected"
    except DependencyUnavailable as exc:
        # Accepted work is never dropped: wait for Redis or OpenBao to come back.
        raise self.retry(countdown=2, exc=exc) from exc
    finally:
        current_request_id.reset(token)


# Celery is untyped: its signals and task decorator are applied as calls, not decorators, so
# the functions keep their types. Signals hold their receivers weakly; the module keeps them.
signals.celeryd_init.connect(_on_setup_logging)
signals.setup_logging.connect(_on_setup_logging)
signals.worker_init.connect(_on_worker_init)
signals.worker_shutdown.connect(_on_worker_shutdown)
run_job = app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)(_run_job)
