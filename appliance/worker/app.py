"""The Celery worker's entry module: `celery -A appliance.worker.app worker --pool threads`.

The only module that builds the worker's Celery app; the job itself runs in `_execute`.

Start-up order matters: the sandbox fork servers are spawned first, before this process logs in
to OpenBao or reads a Redis password, so the processes that fork user code never held one. When
the worker starts as root (`APPLIANCE_WORKER_USER`), the fork servers come from a launcher made
first, and the worker becomes that user before it logs in: root stays with the launcher and the
fork servers (`privileges.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task, signals

from sandbox import Sandbox

from ..audit import EventType
from ..errors import DependencyUnavailable
from ..jobs import (
    JobMessage,
    MessageRejected,
)
from ..observability import (
    JOB_DURATION,
    JOBS,
    configure_logging,
    current_request_id,
    read_token,
    serve_metrics,
)
from ..queue import TASK_NAME, make_celery, publish
from ..services import connect
from ..settings import Settings, get_settings
from ..vault import read_secrets
from ._execute import InFlight, Runtime, error_reason, execute, owner
from .privileges import drop_to, must_drop
from .sandboxes import SandboxPool

log = logging.getLogger("appliance.worker")

app = make_celery(get_settings())


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def build_runtime(settings: Settings, concurrency: int) -> Runtime:
    """Spawn the fork servers, drop root, then log in: the order is the security property."""
    dropping = must_drop(settings.worker_user)
    launcher = Sandbox.launcher(max_servers=2 * concurrency) if dropping else None
    pool = SandboxPool(concurrency, launcher)
    if dropping and settings.worker_user is not None:
        drop_to(settings.worker_user)
    connected = connect(settings, "worker")
    return Runtime(
        settings,
        pool,
        connected.transit,
        connected.stores.results,
        connected.audit,
        publish=functools.partial(publish, app, settings),
        read_secrets=functools.partial(read_secrets, connected.session, mount=settings.kv_mount),
    )


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


def while_redis_is_full(run: Callable[[], str], sleep: Callable[[float], None]) -> str:
    """`run()`, run again while Redis refuses writes for memory (`storage_full`).

    Celery's retry publishes a new message, which a full Redis refuses too, and Celery then
    rejects the delivery for good (the job was lost: issue 12, finding 8). So the job waits here,
    its message unacknowledged, until Redis has room; while Redis is full, a run fails at its
    first write (the claim) before anything runs. A job waits at most until its message
    expires (`MESSAGE_TTL_SECONDS`): then it is refused and audited like any expired message.
    """
    delay = 1.0
    while True:
        try:
            return run()
        except DependencyUnavailable as exc:
            if exc.code != "storage_full":
                raise
            log.warning("Redis is full: the job waits %.0f s", delay)
        sleep(delay)
        delay = min(2 * delay, 10.0)


def _heartbeat() -> None:
    name = owner()
    while True:
        try:
            runtime().store.beat(name, time.time())
        except Exception:  # noqa: BLE001 - a missed heartbeat only delays readiness
            log.warning("heartbeat failed")
        time.sleep(runtime().settings.heartbeat_seconds)


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
        job = JobMessage.from_wire(message)
        status = while_redis_is_full(lambda: execute(runtime(), job, request_id), time.sleep)
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
    except Exception as exc:  # noqa: BLE001 - the last resort of issue 12, finding 14
        # `execute` ends a verified job that fails unexpectedly as `internal_error` itself. What
        # reaches here failed before its message verified, or could not even store that
        # failure: nothing is written for it, and the refusal is audited (type, never message).
        log.error("task %s failed unexpectedly: %s", self.request.id, type(exc).__name__)
        runtime().audit.record(
            EventType.TASK_REJECTED,
            code="internal_error",
            reason=error_reason(exc),
            task_id=task_id,
            request_id=request_id,
        )
        JOBS.labels("internal_error").inc()
        return "internal_error"
    finally:
        current_request_id.reset(token)


# Celery is untyped: its signals and task decorator are applied as calls, not decorators, so
# the functions keep their types. Signals hold their receivers weakly; the module keeps them.
signals.celeryd_init.connect(_on_setup_logging)
signals.setup_logging.connect(_on_setup_logging)
signals.worker_init.connect(_on_worker_init)
signals.worker_shutdown.connect(_on_worker_shutdown)
run_job = app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)(_run_job)
