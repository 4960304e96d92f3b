"""Against the real stack: an acceptance is audited before its job is published, and a retry
with the same `Idempotency-Key` runs the job exactly once (issue 12, finding 12).

The audit write is made to fail for real: the API's writer refuses a log whose file was removed
from under it (`audit_log_corrupt`, a 503), so the log is moved aside for one request and then
put back, the same file, which the writer accepts again.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.cli import SignedClient
from appliance.store import Reservation

from .conftest import Stack, is_problem

pytestmark = pytest.mark.integration


@contextmanager
def audit_log_removed(stack: Stack) -> Iterator[None]:
    log = Path(stack.status["audit_log"])
    aside = log.with_name(log.name + ".aside")
    os.rename(log, aside)
    try:
        yield
    finally:
        os.rename(aside, log)


def _submit(client: SignedClient, body: dict[str, Any], key: str) -> httpx.Response:
    return client.request("POST", "/v1/tasks", body, headers={"Idempotency-Key": key})


def _job(function: str, value: int = 42) -> dict[str, Any]:
    return {"module": f"def {function}():\n    return {value}\n", "function": function}


def _keys_naming(stack: Stack, function: str) -> list[str]:
    admin = stack.admin_redis()
    return sorted(k.decode() for k in admin.scan_iter(match=f"*{function}*", count=1000))


def _executions(stack: Stack, function: str) -> list[dict[str, Any]]:
    return [
        e
        for e in stack.audit_entries()
        if e["type"] == "execution.finished" and e.get("function") == function
    ]


def _drain(stack: Stack, client: SignedClient) -> None:
    """Wait until the worker has run everything queued before now (one worker, in order)."""
    fn = f"sentinel_{uuid.uuid4().hex[:8]}"
    resp = client.request("POST", "/v1/tasks", _job(fn))
    assert resp.status_code == 202, resp.text
    assert stack.wait_result(client, resp.json()["result_key"]).status_code == 200


def test_a_job_whose_acceptance_cannot_be_audited_is_never_published(
    appliance_stack: Stack,
) -> None:
    client = appliance_stack.client()
    fn = f"unaudited_{uuid.uuid4().hex[:8]}"
    with audit_log_removed(appliance_stack):
        is_problem(client.request("POST", "/v1/tasks", _job(fn)), 503)
    _drain(appliance_stack, client)
    # Nothing of the job anywhere: not queued, not recorded, not run.
    assert _keys_naming(appliance_stack, fn) == []
    assert _executions(appliance_stack, fn) == []


def test_a_retry_after_a_503_runs_the_job_exactly_once(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    fn = f"retried_{uuid.uuid4().hex[:8]}"
    key = f"order-{uuid.uuid4().hex}"
    with audit_log_removed(appliance_stack):
        is_problem(_submit(client, _job(fn), key), 503)
    first = _submit(client, _job(fn), key)
    assert first.status_code == 202, first.text
    again = _submit(client, _job(fn), key)
    assert again.status_code == 202 and again.json() == first.json()
    result = appliance_stack.wait_result(client, first.json()["result_key"])
    assert result.status_code == 200 and result.json()["result"] == 42
    _drain(appliance_stack, client)
    assert [e["task_id"] for e in _executions(appliance_stack, fn)] == [first.json()["task_id"]]


def test_a_retry_after_a_lost_response_runs_the_job_exactly_once(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    fn = f"lost_{uuid.uuid4().hex[:8]}"
    key = f"order-{uuid.uuid4().hex}"
    first = _submit(client, _job(fn), key)  # The client never sees this answer.
    assert first.status_code == 202, first.text
    again = _submit(client, _job(fn), key)  # New signature, new nonce, same key and body.
    assert again.status_code == 202 and again.json() == first.json()
    conflict = is_problem(_submit(client, _job(fn, 43), key), 409)
    assert conflict["code"] == "idempotency_conflict"
    assert appliance_stack.wait_result(client, first.json()["result_key"]).status_code == 200
    _drain(appliance_stack, client)
    assert [e["task_id"] for e in _executions(appliance_stack, fn)] == [first.json()["task_id"]]
    # The record: keyed by the client and a digest of its key, for at least the signature
    # window, holding neither the key nor anything of the request in plaintext.
    admin = appliance_stack.admin_redis()
    name = Reservation("local", key, "").name
    value = admin.get(name) or b""
    assert key not in name and key.encode() not in value and b"return 42" not in value
    assert json.loads(value)["acceptance"] == first.json()
    assert admin.ttl(name) >= 300 - 60  # 330 s from the acceptance, less this test's time.
