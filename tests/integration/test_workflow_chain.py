"""Issue 12, finding 3, on the real stack: the workflow record in Redis (`workflow:<id>`) is
writable with the API's Redis rights, and it must not decide where a step's value goes, which
message runs next, or which result keys the end of a workflow writes.

Each test takes the API role's Redis rights as the review did (a leased user from OpenBao's
`database/creds/api`), pauses the worker (SIGSTOP) so that the tampering happens before the
victim's first step finishes, then lets it run and checks what each client can read and what
the audit log says.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hvac
import pytest
import redis

from appliance import stack
from appliance._stack import Pki, generate_root_token

from .conftest import Stack

pytestmark = pytest.mark.integration

SECRET_VALUE = "def secret(x):\n    return 'VICTIM' + str(x)\n"
INC = "def inc(x):\n    return x + 1\n"
GRAB = "def grab(v):\n    return v\n"
BOOM = "def boom():\n    raise ValueError('no')\n"


@contextmanager
def api_redis(s: Stack) -> Iterator[redis.Redis]:
    """A Redis connection with exactly the API role's rights: a user leased from OpenBao."""
    addr = s.status["vault_addr"]
    root = hvac.Client(url=addr, token=generate_root_token(addr, s.state))
    lease = root.adapter.get("/v1/database/creds/api")
    cert, key = Pki(s.state / "tls").client("api")
    r = s.status["redis"]
    conn = redis.Redis(
        host=r["host"],
        port=r["port"],
        ssl=True,
        ssl_ca_certs=r["tls"]["ca"],
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        username=lease["data"]["username"],
        password=lease["data"]["password"],
    )
    try:
        yield conn
    finally:
        conn.close()
        root.sys.revoke_lease(lease["lease_id"])
        root.auth.token.revoke_self()


@contextmanager
def worker_paused(s: Stack) -> Iterator[None]:
    """The worker stopped (SIGSTOP) until the block ends: nothing queued meanwhile runs."""
    pid = stack.status(s.state)["services"]["worker"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _steps(*steps: tuple[str, str, list[Any]]) -> dict[str, Any]:
    return {"steps": [{"module": m, "function": f, "args": a} for m, f, a in steps]}


def _submit(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.request("POST", "/v1/workflows", body)
    assert resp.status_code == 202, resp.text
    accepted: dict[str, Any] = resp.json()
    return accepted


def _wait_audit(s: Stack, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in s.audit_entries() if match(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _refused(s: Stack, workflow: dict[str, Any], step: int) -> list[dict[str, Any]]:
    return _wait_audit(
        s,
        lambda e: (
            e["type"] == "task.rejected"
            and e.get("workflow_id") == workflow["workflow_id"]
            and e.get("code") == "bad_workflow"
            and e.get("step") == step
        ),
    )


def _record(s: Stack, workflow: dict[str, Any]) -> str:
    return f"workflow:{workflow['workflow_id']}"


def test_swapped_in_next_step_of_another_client_gets_no_value(appliance_stack: Stack) -> None:
    """The review's attack: with the API's Redis rights, Mallory puts her own validly signed
    step-1 message in place of the victim's. She must not receive the victim's value; the
    victim's workflow ends `bad_workflow`, audited."""
    victim = appliance_stack.client()
    mallory = appliance_stack.client("mallory-wf", appliance_stack.add_client("mallory-wf"))
    tag = secrets.randbelow(10**9)
    with api_redis(appliance_stack) as api, worker_paused(appliance_stack):
        wf = _submit(victim, _steps((SECRET_VALUE, "secret", [tag]), (INC, "inc", [])))
        own = _submit(mallory, _steps((INC, "inc", [0]), (GRAB, "grab", [])))
        hers = api.hget(_record(appliance_stack, own), "1")
        assert hers is not None
        api.hset(_record(appliance_stack, wf), "1", hers)
        api.hdel(_record(appliance_stack, own), "1")

    first = appliance_stack.wait_result(victim, wf["steps"][0]["result_key"]).json()
    assert first["result"] == f"VICTIM{tag}"
    grabbed = appliance_stack.wait_result(mallory, own["steps"][1]["result_key"], timeout=10)
    assert f"VICTIM{tag}" not in grabbed.text
    assert grabbed.status_code == 202 or grabbed.json()["status"] != "succeeded"
    second = appliance_stack.wait_result(victim, wf["steps"][1]["result_key"]).json()
    assert second["status"] == "failed" and second["error"]["code"] == "bad_workflow"
    assert _refused(appliance_stack, wf, 1)


def test_reordered_steps_do_not_run(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    with api_redis(appliance_stack) as api, worker_paused(appliance_stack):
        wf = _submit(client, _steps((INC, "inc", [1]), (INC, "inc", []), (GRAB, "grab", [])))
        record = _record(appliance_stack, wf)
        one, two = api.hget(record, "1"), api.hget(record, "2")
        assert one is not None and two is not None
        api.hset(record, mapping={"1": two, "2": one})

    bodies = [appliance_stack.wait_result(client, s["result_key"]).json() for s in wf["steps"]]
    assert [b["status"] for b in bodies] == ["succeeded", "failed", "failed"]
    assert {b["error"]["code"] for b in bodies[1:]} == {"bad_workflow"}
    assert _refused(appliance_stack, wf, 1)
    started = {
        e.get("task_id")
        for e in appliance_stack.audit_entries()
        if e["type"] == "execution.started"
    }
    assert not {s["task_id"] for s in wf["steps"][1:]} & started


def test_a_step_of_another_workflow_of_the_same_client_does_not_run(
    appliance_stack: Stack,
) -> None:
    client = appliance_stack.client()
    with api_redis(appliance_stack) as api, worker_paused(appliance_stack):
        wf = _submit(client, _steps((SECRET_VALUE, "secret", [7]), (INC, "inc", [])))
        other = _submit(client, _steps((INC, "inc", [100]), (GRAB, "grab", [])))
        foreign = api.hget(_record(appliance_stack, other), "1")
        assert foreign is not None
        api.hset(_record(appliance_stack, wf), "1", foreign)

    second = appliance_stack.wait_result(client, wf["steps"][1]["result_key"]).json()
    assert second["error"]["code"] == "bad_workflow"
    assert _refused(appliance_stack, wf, 1)
    # The other workflow's own step 1 still runs, on its own value, exactly once.
    mine = appliance_stack.wait_result(client, other["steps"][1]["result_key"]).json()
    assert (mine["status"], mine["result"]) == ("succeeded", 101)


def test_the_end_of_a_workflow_writes_no_result_key_taken_from_redis(
    appliance_stack: Stack,
) -> None:
    """A failing step skips the rest: the keys it writes come from its signed job, not from
    messages planted in the record (here: one naming another job's finished result)."""
    client = appliance_stack.client()
    done = client.request("POST", "/v1/tasks", {"module": INC, "function": "inc", "args": [41]})
    target = done.json()["result_key"]
    assert appliance_stack.wait_result(client, target).json()["result"] == 42
    with api_redis(appliance_stack) as api, worker_paused(appliance_stack):
        wf = _submit(client, _steps((BOOM, "boom", []), (INC, "inc", [])))
        record = _record(appliance_stack, wf)
        planted = json.loads(api.hget(record, "1") or b"{}")
        planted["result_key"] = target
        api.hset(record, mapping={"1": json.dumps(planted), "2": json.dumps(planted)})

    failed = appliance_stack.wait_result(client, wf["steps"][0]["result_key"]).json()
    assert failed["status"] == "failed"
    untouched = appliance_stack.wait_result(client, target).json()
    assert (untouched["status"], untouched["result"]) == ("succeeded", 42)
    skipped = appliance_stack.wait_result(client, wf["steps"][1]["result_key"]).json()
    assert skipped["status"] == "skipped"
