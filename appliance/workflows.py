"""Workflows: steps run in order, each receiving the previous step's value as its first
positional argument (docs/CONTRACT.md §2).

Every workflow step lives here, for both sides. The API seals and signs all steps up front and
keeps the later ones in the store (`workflow:<id>`), queueing only the first. The worker that
finishes a step either advances (stores the step's result and stages the next step's message
with the value sealed to it, in one transaction, then sends it) or ends the workflow (stores
the result and a `skipped` result for every later step, and drops the record). A worker that
died between staging and sending is recovered by `send_staged` on the redelivery. Each function
takes its collaborators explicitly.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

from .audit import AuditSink, EventType
from .jobs import JobMessage, attach_carry, seal_result, seal_results
from .keyservice import KeyService
from .specs import JobSpec, ResultBody, WorkflowPlace
from .store import ResultStore

log = logging.getLogger("appliance.workflows")

#: Hands a signed message to the broker, or raises DependencyUnavailable.
Publish = Callable[[JobMessage, str | None], None]


def plan(specs: list[JobSpec]) -> tuple[str, list[JobSpec]]:
    """A new workflow id and the specs of its steps, each told its place."""
    workflow_id = str(uuid.uuid4())
    steps = [spec.at(WorkflowPlace(workflow_id, i, len(specs))) for i, spec in enumerate(specs)]
    return workflow_id, steps


def save(
    store: ResultStore, workflow_id: str, messages: list[JobMessage], ttl_seconds: int
) -> None:
    """Keep the signed messages of the steps after the first until each is enqueued."""
    later = {i: json.dumps(m.to_wire()) for i, m in enumerate(messages) if i}
    store.save_workflow(workflow_id, later, ttl_seconds)


def advance(
    transit: KeyService,
    store: ResultStore,
    publish: Publish,
    message: JobMessage,
    workflow: WorkflowPlace,
    body: ResultBody,
    request_id: str | None,
) -> None:
    """Store this step's result and enqueue the next step, carrying the value to it sealed."""
    sealed = seal_result(transit, body, message.result_key, message.client)
    step = workflow.step + 1
    stored = store.workflow_messages(workflow.id).get(str(step))
    if stored is None:  # The workflow outlived its record (expired): the rest cannot run.
        log.warning("workflow %s: step %d is gone; it will not run", workflow.id, step)
        store.put(message.result_key, message.client, sealed)
        return
    nxt = attach_carry(transit, JobMessage.from_wire(json.loads(stored)), body.result)
    store.put_and_stage(
        message.result_key, message.client, sealed, workflow.id, step, json.dumps(nxt.to_wire())
    )
    publish(nxt, request_id)
    store.unstage(workflow.id, step)


def send_staged(
    store: ResultStore, publish: Publish, workflow: WorkflowPlace | None, request_id: str | None
) -> None:
    """After a crash: enqueue the next step if the dead worker staged it but did not send it."""
    if not workflow:
        return
    step = workflow.step + 1
    staged = store.workflow_messages(workflow.id).get(f"ready:{step}")
    if staged is not None:
        publish(JobMessage.from_wire(json.loads(staged)), request_id)
        store.unstage(workflow.id, step)


def end(
    transit: KeyService,
    store: ResultStore,
    audit: AuditSink,
    message: JobMessage,
    spec: JobSpec | None,
    workflow: WorkflowPlace,
    body: ResultBody,
) -> None:
    """The last step, or a failed one: store its result and a `skipped` result for every step
    after it, and drop the workflow record, in one transaction."""
    later = [
        JobMessage.from_wire(json.loads(wire))
        for field, wire in store.workflow_messages(workflow.id).items()
        if field.isdigit() and int(field) > workflow.step
    ]
    reason = body.error["code"] if body.error else "?"
    function = spec.function if spec is not None else "?"
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
    bodies = {message.result_key: body, **{m.result_key: skipped for m in later}}
    sealed = seal_results(transit, bodies, message.client)
    store.put_many(sealed, message.client, workflow.id)
    for m in later:
        audit.record(
            EventType.EXECUTION_FINISHED,
            task_id=m.task_id,
            status="skipped",
            client=m.client,
            result_key=m.result_key,
            workflow_id=workflow.id,
        )
