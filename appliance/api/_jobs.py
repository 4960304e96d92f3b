"""The API's use cases: submit a job or a workflow, read or revoke a result.

Each class takes its collaborators explicitly (key service, store, broker, audit sink, clock),
so a unit test builds one with stubs and no service is reached through a bag of services.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from .. import workflows
from ..audit import AuditError, AuditSink, EventType
from ..errors import Conflict, DependencyUnavailable, Forbidden, NotFound, SealBroken
from ..jobs import (
    MESSAGE_TTL_SECONDS,
    JobMessage,
    open_client_result,
    seal_job,
    sign_message,
)
from ..keyservice import KeyService, keys_generation
from ..queue import TASK_NAME
from ..registry import Client
from ..results import check_result_key, new_result_key
from ..specs import JobSpec
from ..store import ResultStore, Stored
from ._idempotency import Idempotency, Retryable

Publish = workflows.Publish


class Submissions:
    """Seal, audit, record and publish accepted jobs, in that order: a job whose acceptance
    cannot be audited is never published (issue 12, finding 12). A submission with an
    Idempotency-Key is accepted at most once (`_idempotency`)."""

    def __init__(
        self,
        transit: KeyService,
        store: ResultStore,
        publish: Publish,
        audit: AuditSink,
        clock: Callable[[], float],
        idempotency: Idempotency,
    ) -> None:
        self.transit = transit
        self.store = store
        self.publish = publish
        self.audit = audit
        self.clock = clock
        self.idempotency = idempotency

    def enqueue(
        self,
        client: Client,
        spec: JobSpec,
        request_id: str | None = None,
        retry: Retryable | None = None,
    ) -> dict[str, Any]:
        """Accept the job once (see `_enqueue`); a retry gets the first acceptance again."""
        return self.idempotency.once(
            client.keyid, retry, lambda: self._enqueue(client, spec, request_id)
        )

    def _enqueue(self, client: Client, spec: JobSpec, request_id: str | None) -> dict[str, Any]:
        """Seal the job, audit its acceptance, record it as queued, and hand it to the broker."""
        message = self._sign_job(client, spec)
        self._audit_accepted(message, spec, request_id)
        with self._withdrawn_unless_published([message], request_id):
            self.store.mark(message.result_key, client.keyid, "queued", message.task_id)
            self.publish(message, request_id)
        return {"task_id": message.task_id, "result_key": message.result_key, "status": "queued"}

    def enqueue_workflow(
        self,
        client: Client,
        specs: list[JobSpec],
        request_id: str | None = None,
        retry: Retryable | None = None,
    ) -> dict[str, Any]:
        """Accept the workflow once (see `_enqueue_workflow`)."""
        return self.idempotency.once(
            client.keyid, retry, lambda: self._enqueue_workflow(client, specs, request_id)
        )

    def _enqueue_workflow(
        self, client: Client, specs: list[JobSpec], request_id: str | None
    ) -> dict[str, Any]:
        """Seal and sign every step up front, audit them, then queue the first. The signed
        messages of the later steps wait in Redis (`workflow:<id>`) until the worker that
        finishes a step enqueues the next one, with the step's value sealed to it."""
        workflow_id, steps, messages = workflows.sign_chain(
            specs, lambda spec: self._sign_job(client, spec)
        )
        for i, (message, spec) in enumerate(zip(messages, steps, strict=True)):
            self._audit_accepted(message, spec, request_id, workflow_id=workflow_id, step=i)
        with self._withdrawn_unless_published(messages, request_id, workflow_id=workflow_id):
            for message in messages:
                self.store.mark(message.result_key, client.keyid, "queued", message.task_id)
            workflows.save(self.store, workflow_id, messages, MESSAGE_TTL_SECONDS)
            self.publish(messages[0], request_id)
        return {
            "workflow_id": workflow_id,
            "result_key": messages[-1].result_key,
            "status": "queued",
            "steps": [{"task_id": m.task_id, "result_key": m.result_key} for m in messages],
        }

    def _sign_job(self, client: Client, spec: JobSpec) -> JobMessage:
        """Seal a job and sign its message: identifiers and ciphertext only. The job carries
        the transit keys' generation, so that the worker drops its cached data keys once the
        operator has rotated or retired a key (`keyservice.keys_generation`)."""
        task_id = str(uuid.uuid4())
        result_key = new_result_key(spec.function, int(self.clock() * 1000))
        generation = self.transit.generation()
        spec = replace(spec, keys_generation=generation)
        with keys_generation(generation):
            sealed = seal_job(self.transit, spec, task_id, result_key, client.keyid)
        message = JobMessage(task_id, result_key, client.keyid, sealed)
        return sign_message(self.transit, message, TASK_NAME, self.clock())

    @contextlib.contextmanager
    def _withdrawn_unless_published(
        self, messages: list[JobMessage], request_id: str | None, **workflow: Any
    ) -> Iterator[None]:
        """Audit `submission.withdrawn` for accepted jobs when their publication fails (the
        client gets the error, the job will not run), and forget their `queued` records."""
        try:
            yield
        except Exception as exc:
            code = exc.code if isinstance(exc, DependencyUnavailable) else "internal_error"
            for step, message in enumerate(messages):
                self._withdraw(
                    message, code, request_id, **workflow, **({"step": step} if workflow else {})
                )
            raise

    def _withdraw(
        self, message: JobMessage, code: str, request_id: str | None, **step: Any
    ) -> None:
        # Best effort: the failure being reported is the original one.
        with contextlib.suppress(DependencyUnavailable):
            self.store.delete(message.result_key)
        with contextlib.suppress(AuditError):
            self.audit.record(
                EventType.SUBMISSION_WITHDRAWN,
                client=message.client,
                task_id=message.task_id,
                result_key=message.result_key,
                code=code,
                request_id=request_id,
                **step,
            )

    def _audit_accepted(
        self, message: JobMessage, spec: JobSpec, request_id: str | None, **step: Any
    ) -> None:
        self.audit.record(
            EventType.SUBMISSION_ACCEPTED,
            client=message.client,
            function=spec.function,
            task_id=message.task_id,
            result_key=message.result_key,
            module_source=spec.module,
            args=spec.args,
            kwargs=spec.kwargs,
            request_id=request_id,
            **step,
        )


class Results:
    """Read or revoke a client's own results."""

    def __init__(
        self,
        transit: KeyService,
        store: ResultStore,
        audit: AuditSink,
        clock: Callable[[], float],
    ) -> None:
        self.transit = transit
        self.store = store
        self.audit = audit
        self.clock = clock

    def read(self, client: Client, untrusted_key: str) -> tuple[int, dict[str, Any]]:
        """The status and body for a result read by `client`."""
        key, stored = self._own_record(client, untrusted_key)
        if stored.sealed is None:
            # "queued", "running", or "revoked" until a worker drains the revoked message.
            return 202, {"key": key, "status": stored.state}
        try:
            # Sealed to the key the client had when the job was accepted: a key put in its
            # place since (`clients rotate-key`, or a write to the registry) does not open it.
            owner_key = client.public_key_sha256()
            with keys_generation(self.transit.generation()):
                body = open_client_result(self.transit, stored.sealed, key, client.keyid, owner_key)
        except SealBroken as exc:
            raise NotFound("the result cannot be opened", code="result_unavailable") from exc
        expires_at = self.clock() + stored.ttl_ms / 1000
        self.audit.record(
            EventType.RESULT_READ,
            client=client.keyid,
            result_key=key,
            status=body.status,
            http_status=200,
        )
        return 200, {
            "key": key,
            "status": body.status,
            "result": body.result,
            "error": body.error,
            "stdout": body.stdout,
            "usage": body.usage,
            "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)),
        }

    def revoke(self, client: Client, untrusted_key: str) -> dict[str, str]:
        """Revoke a queued job (it will not run), or forget a finished result early."""
        key, stored = self._own_record(client, untrusted_key)
        if stored.state == "done":
            self.store.delete(key)
            outcome = "deleted"
        elif stored.state == "revoked" or self.store.revoke(key, client.keyid) in (
            "queued",
            "revoked",
        ):
            outcome = "revoked"
        else:
            raise Conflict(
                "the job is already running; it cannot be revoked", code="already_running"
            )
        self.audit.record(
            EventType.TASK_REVOKED, client=client.keyid, result_key=key, status=outcome
        )
        return {"key": key, "status": outcome}

    def _own_record(self, client: Client, untrusted_key: str) -> tuple[str, Stored]:
        """The well-formed key and its record, when it exists and belongs to `client`."""
        key = check_result_key(untrusted_key)
        stored = self.store.get(key)
        if stored is None:
            raise NotFound("no such result, or it has expired", code="result_not_found")
        if stored.client != client.keyid:
            raise Forbidden("this result belongs to another client", code="not_your_result")
        return key, stored
