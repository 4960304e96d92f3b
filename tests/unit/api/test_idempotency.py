"""Submissions audited before they are published, and retries made safe by the
`Idempotency-Key` of CONTRACT §5 (issue 12, finding 12), through `create_app` over stubs.

The real-stack counterpart is tests/integration/test_submission_retries.py."""

from __future__ import annotations

import datetime
from typing import Any

import httpx
import pytest

from appliance.audit import AuditUnavailable, EventType
from appliance.errors import DependencyUnavailable
from appliance.signatures import sign_request

from .harness import Harness

TASK = {"module": "def f(x=1):\n    return x\n", "function": "f", "args": [1]}
STEPS = {"steps": [TASK, {**TASK, "args": []}]}


class FailingAudit:
    """The harness's audit sink, failing `submission.accepted` while `down` is set."""

    def __init__(self, api: Harness) -> None:
        self.inner = api.audit
        self.down = True
        api.services.submissions.audit = self

    def record(self, event_type: Any, /, **fields: Any) -> Any:
        if self.down and event_type == EventType.SUBMISSION_ACCEPTED:
            raise AuditUnavailable("the audit log cannot be written")
        return self.inner.record(event_type, **fields)


@pytest.fixture
def api() -> Harness:
    return Harness()


def _post(api: Harness, body: Any, key: str | None, path: str = "/v1/tasks") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else None
    return api.request("POST", path, body, headers=headers)


def test_an_acceptance_that_cannot_be_audited_publishes_nothing(api: Harness) -> None:
    FailingAudit(api)
    resp = _post(api, TASK, None)
    assert resp.status_code == 503, resp.text
    assert api.published == [] and api.store.keys() == []


def test_a_workflow_that_cannot_be_audited_publishes_nothing(api: Harness) -> None:
    FailingAudit(api)
    assert _post(api, STEPS, None, "/v1/workflows").status_code == 503
    assert api.published == [] and api.store.keys() == []


def test_a_retry_after_a_lost_response_answers_the_first_acceptance(api: Harness) -> None:
    first = _post(api, TASK, "order-17")
    assert first.status_code == 202, first.text
    api.clock.now += 60  # A retry, with a new signature and a new nonce.
    again = _post(api, TASK, "order-17")
    assert again.status_code == 202 and again.json() == first.json()
    assert [m.task_id for m in api.published] == [first.json()["task_id"]]
    assert len(api.audit.of_type("submission.accepted")) == 1


def test_a_retry_after_a_failed_audit_runs_the_job_once(api: Harness) -> None:
    audit = FailingAudit(api)
    assert _post(api, TASK, "order-18").status_code == 503
    audit.down = False
    first = _post(api, TASK, "order-18")
    second = _post(api, TASK, "order-18")
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert [m.task_id for m in api.published] == [first.json()["task_id"]]


def test_a_retry_after_a_failed_publish_runs_the_job_once(api: Harness) -> None:
    published = api.published

    def broker_down(message: Any, request_id: Any) -> None:
        raise DependencyUnavailable("the broker is unreachable")

    api.services.submissions.publish = broker_down
    failed = _post(api, TASK, "order-19")
    assert failed.status_code == 503
    # The acceptance was audited first, so its withdrawal is on the record too.
    [accepted] = api.audit.of_type("submission.accepted")
    [withdrawn] = api.audit.of_type("submission.withdrawn")
    assert withdrawn["task_id"] == accepted["task_id"]
    assert withdrawn["code"] == "dependency_unavailable"
    assert api.store.keys() == []
    api.services.submissions.publish = lambda message, request_id: published.append(message)
    first = _post(api, TASK, "order-19")
    assert _post(api, TASK, "order-19").json() == first.json()
    assert len(published) == 1


def test_the_same_key_with_another_body_is_a_conflict(api: Harness) -> None:
    assert _post(api, TASK, "order-20").status_code == 202
    other = _post(api, {**TASK, "args": [2]}, "order-20")
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"
    on_workflows = _post(api, TASK, "order-20", "/v1/workflows")
    assert on_workflows.status_code in (400, 409)
    assert len(api.published) == 1


def test_keys_are_per_client(api: Harness) -> None:
    bob = api.add_client("bob", allowed_functions=("*",))
    first = _post(api, TASK, "shared")
    theirs = api.request(
        "POST", "/v1/tasks", TASK, keyid="bob", key=bob, headers={"Idempotency-Key": "shared"}
    )
    assert theirs.status_code == 202 and theirs.json() != first.json()
    assert len(api.published) == 2


def test_a_workflow_retry_answers_the_first_acceptance(api: Harness) -> None:
    first = _post(api, STEPS, "wf-1", "/v1/workflows")
    again = _post(api, STEPS, "wf-1", "/v1/workflows")
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert len(api.published) == 1


def test_a_published_job_whose_acceptance_was_not_recorded_is_not_run_again(
    api: Harness,
) -> None:
    def redis_down(*args: Any) -> None:
        raise DependencyUnavailable("Redis is unreachable")

    # Published, then Redis failed before the acceptance was recorded: the client gets a 503,
    # the reservation stays pending, and a retry must not run the job a second time.
    api.idempotency.accept = redis_down  # type: ignore[method-assign]
    assert _post(api, TASK, "order-21").status_code == 503
    retry = _post(api, TASK, "order-21")
    assert retry.status_code == 409 and retry.json()["code"] == "idempotency_in_progress"
    assert len(api.published) == 1


@pytest.mark.parametrize("key", ["", "a" * 65, "has space", "semi;colon", "a/b", "a.b"])
def test_a_malformed_key_is_refused_and_runs_nothing(api: Harness, key: str) -> None:
    resp = _post(api, TASK, key)
    assert resp.status_code in (400, 401), resp.text
    assert api.published == []
    if resp.status_code == 400:
        assert resp.json()["code"] == "invalid_idempotency_key"


def test_the_key_must_be_covered_by_the_signature(api: Harness) -> None:
    import asyncio
    import json

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            content = json.dumps(TASK).encode()
            req = http.build_request(
                "POST", "/v1/tasks", content=content, headers={"content-type": "application/json"}
            )
            created = datetime.datetime.fromtimestamp(api.clock(), datetime.UTC)
            sign_request(req, "alice", api.alice_key, content, created=created)
            # Added after signing: whoever could change the key could redirect the answer.
            req.headers["Idempotency-Key"] = "unsigned"
            return await http.send(req)

    resp = asyncio.run(send())
    assert resp.status_code == 401, resp.text
    assert api.published == []
