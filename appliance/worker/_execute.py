"""Running one job: verify, open, claim, sandbox, seal, store, audit.

`execute` is the worker's state machine over a signed message. A message the API did not sign,
an expired one, or one already run (a replay) is refused before anything else happens. Claims
(`claim:<nonce>` in the store) tell a first delivery from a duplicate (its claimer is alive:
wait), from a redelivery after a crash (its claimer is dead: run again, at most `max_attempts`
times in all, or finish the dead worker's work if it stored a result) and from this process's
own retry. Every collaborator is in `Runtime`, so the machine runs over stubs in unit tests.

Every verified job ends with a stored result: a dependency that is down is retried until it is
back, and any other error ends the job as failed `internal_error` (`_LEFT_TO_THE_TASK`, `_fail`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sandbox

from .. import workflows
from ..audit import AuditSink, EventType
from ..errors import (
    ApplianceError,
    BadRequest,
    DependencyUnavailable,
    Forbidden,
    NotFound,
    SealBroken,
)
from ..jobs import JobMessage, MessageRejected, open_carry, open_job, seal_result, verify_message
from ..keyservice import KeyService, keys_generation
from ..observability import JOBS, observe_usage
from ..queue import TASK_NAME
from ..secret_names import check_secret_name, glob_allows
from ..settings import Settings
from ..specs import JobSpec, ResultBody, WorkflowPlace
from ..store import ResultStore
from .sandboxes import SandboxPool

log = logging.getLogger("appliance.worker")


@dataclass
class Runtime:
    """Everything a job needs, built once per worker process (stubs in unit tests)."""

    settings: Settings
    sandboxes: SandboxPool
    transit: KeyService
    store: ResultStore
    audit: AuditSink
    #: Hands a signed message to the broker, or raises DependencyUnavailable.
    publish: Callable[[JobMessage, str | None], None]
    #: The job's secrets by name, from OpenBao's KV (NotFound or SealBroken when absent).
    read_secrets: Callable[[list[str]], dict[str, Any]] = field(
        default=lambda names: _no_secrets(names)
    )
    clock: Callable[[], float] = time.time


def _no_secrets(names: list[str]) -> dict[str, Any]:
    raise NotFound("this runtime reads no secret", code="secret_not_found")


def result_body(outcome: sandbox.Outcome) -> ResultBody:
    """The result a client reads: value on success, the sandbox's error otherwise."""
    ok = outcome.status == "ok"
    return ResultBody(
        "succeeded" if ok else "failed",
        result=outcome.value if ok else None,
        error=None if ok else {"code": outcome.status, **(outcome.error or {})},
        stdout=outcome.stdout,
        usage=outcome.to_dict()["usage"],
    )


class InFlight(ApplianceError):
    """Raised when a message is already running on a live worker (a duplicate delivery)."""

    code, title = "in_flight", "Running elsewhere"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} is running on a live worker")


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
    now = rt.clock()
    verify_message(rt.transit, message, TASK_NAME, now)
    ttl = message.expires - int(now)
    with _in_hand.only(message):
        spec: JobSpec | None = None
        try:
            spec = _open(rt, message)
            # The transit keys' generation the API sealed into the job: a new one clears this
            # process's cached data keys before it seals the result (a rotation takes effect).
            with keys_generation(spec.keys_generation if spec is not None else None):
                carried = _carried(rt, message, spec)
                return _claim_and_run(rt, message, carried, ttl, now, request_id)
        except _LEFT_TO_THE_TASK:
            raise
        except Exception as exc:  # noqa: BLE001 - the line drawn in `_LEFT_TO_THE_TASK`'s comment
            return _fail(rt, message, spec, ttl, request_id, exc)


#: Where the line is drawn (issue 12, finding 14). These leave the job to Celery: a duplicate
#: delivery waits (InFlight), a refused message is audited unrun (MessageRejected), and a
#: dependency that is down or sealed (Redis, OpenBao, the broker, the audit log) is retried
#: until it is back (SECURITY.md, "Outage"). Every other exception, once the message verified,
#: is not going to pass on a retry: the job ends as failed `internal_error` (`_fail`).
_LEFT_TO_THE_TASK = (InFlight, MessageRejected, DependencyUnavailable)


def error_reason(exc: BaseException) -> str:
    """An audit `reason` for an unexpected error: its appliance code, else its type's name as a
    slug. Never its message, which may quote a secret's path or a job's data."""
    if isinstance(exc, ApplianceError):
        return exc.code
    slug = re.sub(r"[^a-z0-9_.:-]", "", type(exc).__name__.lower()).lstrip("_.:-")
    return slug[:64] or "unknown"


def _fail(
    rt: Runtime,
    message: JobMessage,
    spec: JobSpec | None,
    ttl: int,
    request_id: str | None,
    exc: Exception,
) -> str:
    """End a verified job that hit an unexpected error as failed `internal_error`, so that it
    never stays `running`. The client reads a fixed sentence; the log and the audit entry get
    the error's code or type (never its message, which may quote data)."""
    reason = error_reason(exc)
    log.error("job %s ended by an unexpected %s", message.task_id, type(exc).__name__)
    if rt.store.has_result(message.result_key):
        # The error came after the result was stored (an audit entry, a step sent on): the
        # result stands, and the failure is still audited.
        rt.store.finish_claim(message.nonce, ttl)
        rt.audit.record(
            EventType.EXECUTION_FINISHED,
            task_id=message.task_id,
            status="internal_error",
            reason=reason,
            client=message.client,
            result_key=message.result_key,
            request_id=request_id,
        )
        return "internal_error"
    body = ResultBody.failure(
        "internal_error", "the appliance failed while running the job", "InternalError"
    )
    return _finish(rt, message, spec, body, ttl, request_id, reason=reason)


def _claim_and_run(
    rt: Runtime,
    message: JobMessage,
    spec: JobSpec | None,
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
        # It died between storing the result and enqueuing the next step.
        workflows.send_staged(_outcomes(rt, request_id, spec), rt.publish, message, _place(spec))
        rt.store.finish_claim(message.nonce, ttl)
        return "recovered"
    if not retry and claim.attempts >= rt.settings.max_attempts:
        body = ResultBody.failure(
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


def _open(rt: Runtime, message: JobMessage) -> JobSpec | None:
    """The job's spec; None when the job does not open (it then ends as `rejected`)."""
    try:
        return open_job(rt.transit, message)
    except SealBroken:
        return None


def _carried(rt: Runtime, message: JobMessage, spec: JobSpec | None) -> JobSpec | None:
    """The spec with the carried value first among the arguments of a later workflow step."""
    if spec is None or spec.workflow is None or spec.workflow.step == 0:
        return spec
    try:
        carried = open_carry(rt.transit, message)
    except SealBroken:
        # Only a worker can seal a carry: a later step without one was not enqueued by us.
        raise MessageRejected("bad carry") from None
    return spec.with_carried(carried)


def _run_and_store(
    rt: Runtime, message: JobMessage, spec: JobSpec | None, ttl: int, request_id: str | None
) -> str:
    if spec is None:
        body = ResultBody.failure("rejected", "the job could not be opened")
    elif not rt.store.start(message.result_key, message.client, message.task_id):
        body = ResultBody.failure("revoked", "the job was revoked before it started")
    else:
        rt.audit.record(
            EventType.EXECUTION_STARTED,
            task_id=message.task_id,
            function=spec.function,
            client=message.client,
            result_key=message.result_key,
            module_source=spec.module,
            args=spec.args,
            kwargs=spec.kwargs,
            request_id=request_id,
            **_step_fields(spec),
        )
        body = _run(rt, spec)
    return _finish(rt, message, spec, body, ttl, request_id)


def _place(spec: JobSpec | None) -> WorkflowPlace | None:
    return spec.workflow if spec is not None else None


def _outcomes(rt: Runtime, request_id: str | None, spec: JobSpec | None) -> workflows.Outcomes:
    return workflows.Outcomes(rt.transit, rt.store, rt.audit, request_id, _owner_key(spec))


def _owner_key(spec: JobSpec | None) -> str:
    """The key the client had when the job was accepted (none when the job did not open)."""
    return spec.owner_key_sha256 if spec is not None else ""


def _step_fields(spec: JobSpec | None) -> dict[str, Any]:
    workflow = _place(spec)
    return {"workflow_id": workflow.id, "step": workflow.step} if workflow else {}


def _finish(
    rt: Runtime,
    message: JobMessage,
    spec: JobSpec | None,
    body: ResultBody,
    ttl: int,
    request_id: str | None,
    reason: str | None = None,
) -> str:
    """Seal and store the result; in a workflow, enqueue the next step or skip the rest."""
    workflow = _place(spec)
    if workflow is None:
        rt.store.put(
            message.result_key,
            message.client,
            seal_result(rt.transit, body, message.result_key, message.client, _owner_key(spec)),
        )
    elif body.succeeded and workflow.has_next:
        workflows.advance(_outcomes(rt, request_id, spec), rt.publish, message, workflow, body)
    else:
        function = spec.function if spec is not None else "?"
        workflows.end(_outcomes(rt, request_id, spec), message, function, workflow, body)
    rt.store.finish_claim(message.nonce, ttl)
    status = body.code
    finished: dict[str, Any] = {"client": message.client, "result_key": message.result_key}
    if spec is not None:
        finished.update(function=spec.function, module_source=spec.module, **_step_fields(spec))
    if body.usage:
        finished["usage"] = body.usage
    if body.succeeded:
        finished["result"] = body.result
    rt.audit.record(
        EventType.EXECUTION_FINISHED,
        task_id=message.task_id,
        status=status,
        reason=reason,
        request_id=request_id,
        **finished,
    )
    JOBS.labels(status).inc()
    observe_usage(body.usage)
    return status


def _run(rt: Runtime, spec: JobSpec) -> ResultBody:
    kwargs = dict(spec.kwargs)
    names = list(spec.secrets)
    values: dict[str, Any] = {}
    if names:
        refused = secrets_refused(names, spec.secret_globs)
        if refused is not None:
            return ResultBody.failure("secret_not_allowed", refused)
        try:
            values = rt.read_secrets(names)
        except (NotFound, Forbidden, SealBroken):
            # OpenBao refusing a path reads like a missing secret: whether another client's
            # secret exists is not for this job to learn.
            return ResultBody.failure(
                "secret_unavailable", "a named secret does not exist or may not be read"
            )
        # Secrets reach the function as one keyword argument, `secrets`: {name: {field: value}}.
        kwargs["secrets"] = values
    try:
        with rt.sandboxes.borrow() as sb:
            outcome = sb.run(
                spec.module,
                spec.function,
                spec.args,
                kwargs,
                spec.limits,
                spec.imports,
            )
    except sandbox.InvalidRequest as exc:
        return ResultBody.failure("rejected", str(exc))
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


def redact(body: ResultBody, secret_values: dict[str, Any]) -> ResultBody:
    """Replace every secret value that the function echoed (in its value, stdout or error)."""
    needles = sorted(
        {v for fields in secret_values.values() for v in _strings(fields) if len(v) >= 4},
        key=len,
        reverse=True,
    )
    if not needles:
        return body
    text = json.dumps(body.to_json())
    for needle in needles:
        text = text.replace(json.dumps(needle)[1:-1], "[redacted]")
    return ResultBody.from_json(json.loads(text))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []
