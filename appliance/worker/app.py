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
from dataclasses import dataclass
from typing import Any

from celery import Task, signals

import sandbox

from ..audit import AuditLog, AuditSink, EventType, TransitSigner
from ..errors import DependencyUnavailable, NotFound, SealBroken
from ..jobs import JobMessage, MessageRejected, open_job, seal_result, verify_message
from ..redis_conn import connect
from ..results import ResultStore
from ..settings import Settings, get_settings
from ..vault import Transit, VaultSession, read_secrets
from .celery_config import HEARTBEAT_KEY, TASK_NAME, make_celery
from .sandboxes import SandboxPool

log = logging.getLogger("appliance.worker")
HEARTBEAT_SECONDS = 5

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
    assert settings.vault_role_id_file and settings.vault_secret_id_wrap_file
    session = VaultSession.from_approle(
        settings.vault_addr, settings.vault_role_id_file, settings.vault_secret_id_wrap_file
    )
    store = ResultStore(connect(settings), settings.result_prefix, settings.result_ttl_seconds)
    transit = Transit(session, settings.transit_mount)
    assert settings.audit_log is not None
    audit = AuditLog.open(settings.audit_log, TransitSigner(transit), source="worker")
    audit.start_checkpoint_timer()
    return Runtime(settings, pool, transit, store, audit)


def runtime() -> Runtime:
    """The process's runtime (built at worker start)."""
    if _runtime is None:
        raise RuntimeError("worker runtime not initialised")
    return _runtime


@signals.worker_init.connect
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


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _runtime is not None:
        _runtime.sandboxes.close()


def _heartbeat() -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        try:
            runtime().store.redis.zadd(HEARTBEAT_KEY, {name: time.time()})
        except Exception:  # noqa: BLE001 - a missed heartbeat only delays readiness
            log.warning("heartbeat failed")
        time.sleep(HEARTBEAT_SECONDS)


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
    return {"status": "failed", "result": None, "stdout": "", "usage": None,
            "error": {"code": code, "type": "JobError", "message": message}}


def execute(rt: Runtime, message: JobMessage) -> str:
    """Run one job: verify, claim, open, sandbox, seal, store. Returns the outcome status only.

    A message the API did not sign, an expired one, or one already run (a replay) is refused
    before anything else happens. A message whose claim is "running" is a redelivery after a
    worker died mid-job: it runs again, since no result was stored.
    """
    now = time.time()
    verify_message(rt.transit, message, TASK_NAME, now)
    ttl = message.expires - int(now)
    if rt.store.claim(message.nonce, ttl) == "done" or rt.store.has_result(message.result_key):
        raise MessageRejected("replayed")
    rt.store.mark(message.result_key, message.client, "running", message.task_id)
    try:
        spec = open_job(rt.transit, message)
    except SealBroken:
        spec = None
        body = _failure("rejected", "the job could not be opened")
    else:
        rt.audit.record(
            EventType.EXECUTION_STARTED, task_id=message.task_id, function=spec["function"],
            client=message.client, result_key=message.result_key, module_source=spec["module"],
            args=spec.get("args", []), kwargs=spec.get("kwargs", {}),
        )
        body = _run(rt, spec)
    sealed = seal_result(rt.transit, body, message.result_key, message.client)
    rt.store.put(message.result_key, message.client, sealed)
    rt.store.finish_claim(message.nonce, ttl)
    status = str(body["error"]["code"] if body["error"] else "ok")
    finished: dict[str, Any] = {"client": message.client, "result_key": message.result_key}
    if spec is not None:
        finished.update(function=spec["function"], module_source=spec["module"])
    if body.get("usage"):
        finished["usage"] = body["usage"]
    if body["status"] == "succeeded":
        finished["result"] = body["result"]
    rt.audit.record(EventType.EXECUTION_FINISHED, task_id=message.task_id, status=status,
                    **finished)
    return status


def _run(rt: Runtime, spec: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs", {}))
    names = list(spec.get("secrets", []))
    values: dict[str, Any] = {}
    if names:
        try:
            values = read_secrets(rt.transit.session, names, rt.settings.kv_mount)
        except (NotFound, SealBroken):
            return _failure("secret_unavailable", "a named secret does not exist")
        # Secrets reach the function as one keyword argument, `secrets`: {name: {field: value}}.
        kwargs["secrets"] = values
    try:
        with rt.sandboxes.borrow() as sb:
            outcome = sb.run(
                spec["module"], spec["function"], spec.get("args", []), kwargs,
                spec.get("limits", {}), spec.get("imports", []),
            )
    except sandbox.InvalidRequest as exc:
        return _failure("rejected", str(exc))
    return redact(result_body(outcome), values)


def redact(body: dict[str, Any], secret_values: dict[str, Any]) -> dict[str, Any]:
    """Replace every secret value that the function echoed (in its value, stdout or error)."""
    needles = sorted({v for fields in secret_values.values() for v in _strings(fields)
                      if len(v) >= 4}, key=len, reverse=True)
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


@app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)
def run_job(self: Task, message: Any) -> str:
    """The only task: its argument is identifiers and ciphertext."""
    try:
        return execute(runtime(), JobMessage.from_wire(message))
    except MessageRejected as exc:
        log.warning("refused task message %s: %s", self.request.id, exc.reason)
        runtime().audit.record(EventType.TASK_REJECTED, code=exc.reason.replace(" ", "_"),
                               task_id=str(self.request.id))
        return "rejected"
    except DependencyUnavailable as exc:
        # Accepted work is never dropped: wait for Redis or OpenBao to come back.
        raise self.retry(countdown=2, exc=exc) from exc
