"""Workflows: steps run in order, each receiving the previous step's value as its first
positional argument (docs/CONTRACT.md §2).

Every workflow step lives here, for both sides. The API seals and signs all steps up front and
keeps the later ones in the store (`workflow:<id>`), queueing only the first. The worker that
finishes a step either advances (stores the step's result and stages the next step's message
with the value sealed to it, in one transaction, then sends it) or ends the workflow (stores
the result and a `skipped` result for every later step, and drops the record). A worker that
died between staging and sending is recovered by `send_staged` on the redelivery. Each function
takes its collaborators explicitly.

The chain is bound at submission (issue 12, finding 3): each step's sealed, signed job names the
digest of the next step's signed message and every later step's task id and result key. The
record in Redis is writable by the API's and the worker's Redis users, so it is only a courier:
a step's value is sealed to the next step only if the message found there has that digest, and
the results of the steps after a failed one are written under the keys the chain names, never
under keys read from the record.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .audit import AuditSink, EventType
from .jobs import JobMessage, MessageRejected, attach_carry, seal_result, seal_results
from .keyservice import KeyService
from .specs import JobSpec, LaterStep, ResultBody, WorkflowPlace
from .store import ResultStore

log = logging.getLogger("appliance.workflows")

#: Hands a signed message to the broker, or raises DependencyUnavailable.
Publish = Callable[[JobMessage, str | None], None]


def sign_chain(
    specs: list[JobSpec], sign: Callable[[JobSpec], JobMessage]
) -> tuple[str, list[JobSpec], list[JobMessage]]:
    """A new workflow id, and its steps' specs and signed messages, bound into one chain.

    Signed from the last step back, so that each step's sealed place can name the digest of the
    next step's signed message and the task id and result key of every later step: the worker
    then takes nothing from the workflow record in Redis that this chain does not vouch for.
    """
    workflow_id = str(uuid.uuid4())
    steps: list[JobSpec] = []
    messages: list[JobMessage] = []
    for i in reversed(range(len(specs))):
        place = WorkflowPlace(
            workflow_id,
            i,
            len(specs),
            next_sha256=messages[0].digest() if messages else "",
            later=tuple(LaterStep(m.task_id, m.result_key) for m in messages),
        )
        spec = specs[i].at(place)
        steps.insert(0, spec)
        messages.insert(0, sign(spec))
    return workflow_id, steps, messages


def save(
    store: ResultStore, workflow_id: str, messages: list[JobMessage], ttl_seconds: int
) -> None:
    """Keep the signed messages of the steps after the first until each is enqueued."""
    later = {i: json.dumps(m.to_wire()) for i, m in enumerate(messages) if i}
    store.save_workflow(workflow_id, later, ttl_seconds)


def verify_next(untrusted_wire: str | None, workflow: WorkflowPlace) -> JobMessage:
    """The next step's message, read from the workflow record, when it is the very message this
    step's signed job names (`next_sha256`); raise MessageRejected (`bad workflow`) otherwise:
    absent, malformed, another client's, another workflow's or another step's."""
    if untrusted_wire is None or not workflow.next_sha256:
        raise MessageRejected("bad workflow")
    try:
        candidate = JobMessage.from_wire(json.loads(untrusted_wire))
    except ValueError:
        raise MessageRejected("bad workflow") from None
    except MessageRejected:
        raise MessageRejected("bad workflow") from None
    if not hmac.compare_digest(candidate.digest(), workflow.next_sha256):
        raise MessageRejected("bad workflow")
    return candidate


@dataclass(frozen=True)
class Outcomes:
    """Where a step's outcomes go: sealed (transit), stored, audited, under one request id."""

    transit: KeyService
    store: ResultStore
    audit: AuditSink
    request_id: str | None = None
    #: The client's key (SHA-256) when the workflow was accepted: its results are sealed to it.
    owner_key: str = ""


def advance(
    out: Outcomes,
    publish: Publish,
    message: JobMessage,
    workflow: WorkflowPlace,
    body: ResultBody,
) -> None:
    """Store this step's result and enqueue the next step, carrying the value to it sealed.

    The value goes only to the message this step's signed job names as its next step: any other
    message in the record (missing, moved from another workflow or client, reordered) ends the
    workflow instead, every later step `bad_workflow`, and the refusal is audited.
    """
    step = workflow.step + 1
    stored = out.store.workflow_messages(workflow.id).get(str(step))
    try:
        nxt = verify_next(stored, workflow)
    except MessageRejected:
        refuse_rest(out, message, workflow, body, "missing" if stored is None else "altered")
        return
    sealed = seal_result(out.transit, body, message.result_key, message.client, out.owner_key)
    nxt = attach_carry(out.transit, nxt, body.result)
    out.store.put_and_stage(
        message.result_key, message.client, sealed, workflow.id, step, json.dumps(nxt.to_wire())
    )
    publish(nxt, out.request_id)
    out.store.unstage(workflow.id, step)


def send_staged(
    out: Outcomes, publish: Publish, message: JobMessage, workflow: WorkflowPlace | None
) -> None:
    """After a crash: enqueue the next step if the dead worker staged it but did not send it,
    and only if it is the message this step names (else the rest ends as `bad_workflow`)."""
    if not workflow or not workflow.has_next:
        return
    step = workflow.step + 1
    staged = out.store.workflow_messages(workflow.id).get(f"ready:{step}")
    if staged is None:
        return
    try:
        nxt = verify_next(staged, workflow)
    except MessageRejected:
        refuse_rest(out, message, workflow, None, "altered")
        return
    publish(nxt, out.request_id)
    out.store.unstage(workflow.id, step)


def end(
    out: Outcomes,
    message: JobMessage,
    function: str,
    workflow: WorkflowPlace,
    body: ResultBody,
) -> None:
    """The last step, or a failed one: store its result and a `skipped` result for every step
    after it, and drop the workflow record, in one transaction."""
    reason = body.error["code"] if body.error else "?"
    skipped = ResultBody(
        "skipped",
        error={
            "code": "skipped",
            "type": "WorkflowStepSkipped",
            "message": f"step {workflow.step} ({function}) did not succeed: {reason}",
            "failed_step": workflow.step,
            "failed_result_key": message.result_key,
        },
    )
    _close(out, message, workflow, body, skipped)


def refuse_rest(
    out: Outcomes,
    message: JobMessage,
    workflow: WorkflowPlace,
    body: ResultBody | None,
    why: str,
) -> None:
    """The next step's message is not the one submitted: store this step's result (unless it is
    stored already, `body` None), end every later step as `bad_workflow` unrun, drop the record,
    and audit the refusal. Its value goes to no one."""
    step = workflow.step + 1
    log.warning(
        "workflow %s: step %d's message is %s; the rest will not run", workflow.id, step, why
    )
    first = workflow.later[0] if workflow.later else None
    out.audit.record(
        EventType.TASK_REJECTED,
        code="bad_workflow",
        reason=why,
        task_id=first.task_id if first else None,
        client=message.client,
        workflow_id=workflow.id,
        step=step,
        request_id=out.request_id,
    )
    refused = ResultBody.failure(
        "bad_workflow",
        f"the message of step {step} is not the one submitted; it and the steps after it "
        "did not run",
        "WorkflowRefused",
    )
    _close(out, message, workflow, body, refused)


def _close(
    out: Outcomes,
    message: JobMessage,
    workflow: WorkflowPlace,
    body: ResultBody | None,
    rest: ResultBody,
) -> None:
    """Store `body` for this step and `rest` for each later step the chain names (never a
    result key read from Redis), drop the record, and audit each later step's end."""
    bodies = {s.result_key: rest for s in workflow.later}
    if body is not None:
        bodies[message.result_key] = body
    sealed = seal_results(out.transit, bodies, message.client, out.owner_key)
    out.store.put_many(sealed, message.client, workflow.id)
    for i, later in enumerate(workflow.later, start=workflow.step + 1):
        out.audit.record(
            EventType.EXECUTION_FINISHED,
            task_id=later.task_id,
            status=rest.code,
            client=message.client,
            result_key=later.result_key,
            workflow_id=workflow.id,
            step=i,
            request_id=out.request_id,
        )
