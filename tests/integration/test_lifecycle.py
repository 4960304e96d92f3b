"""Task lifecycle on a stack of its own, tuned through `<state>/appliance.env` so that a dead
worker's message comes back within seconds: a worker SIGKILLed mid-job, the job completed exactly
once afterwards; a job whose worker dies every time ends as failed; revoking a queued job."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance import stack

from .conftest import FREE_PORTS, Stack, is_problem, submit
from .test_workflows import audit_entries

pytestmark = pytest.mark.integration

SLOW = "def slow(n):\n    i = 0\n    while i < n:\n        i += 1\n    return n\n"
TUNING = (
    "APPLIANCE_VISIBILITY_TIMEOUT_SECONDS=4\n"
    "APPLIANCE_HEARTBEAT_SECONDS=1\n"
    "APPLIANCE_MAX_ATTEMPTS=2\n"
)


@pytest.fixture(scope="module")
def tuned_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("lifecycle")
    (state / "appliance.env").write_text(TUNING)
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


def _pending_state(stk: Stack, key: str) -> str | None:
    raw = stk.admin_redis().get(f"pending:{key}")
    return None if raw is None else str(json.loads(raw)["state"])


def _kill_worker_while_running(stk: Stack, key: str) -> None:
    """SIGKILL the worker once the job is running, then restart it as an operator would."""
    deadline = time.monotonic() + 20
    while _pending_state(stk, key) != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)
    pid = stack.status(stk.state)["services"]["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    while stack.status(stk.state)["services"]["worker"]["state"] == "running":
        time.sleep(0.05)
    stack.up(stk.state)


def _events(stk: Stack, kind: str, task_id: str) -> list[dict[str, Any]]:
    return [e for e in audit_entries(stk) if e["type"] == kind and e.get("task_id") == task_id]


def test_job_of_a_killed_worker_completes_exactly_once(tuned_stack: Stack) -> None:
    client = tuned_stack.client()
    accepted = submit(client, SLOW, "slow", args=[8_000_000]).json()
    _kill_worker_while_running(tuned_stack, accepted["result_key"])

    resp = tuned_stack.wait_result(client, accepted["result_key"], timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "succeeded" and resp.json()["result"] == 8_000_000
    time.sleep(2)  # any duplicate delivery would have run by now
    started = _events(tuned_stack, "execution.started", accepted["task_id"])
    finished = _events(tuned_stack, "execution.finished", accepted["task_id"])
    assert len(started) == 2  # the killed attempt, then the one that completed
    assert len(finished) == 1 and finished[0]["status"] == "ok"


def test_job_whose_worker_always_dies_ends_as_failed(tuned_stack: Stack) -> None:
    """With max_attempts 2: killed twice, the third delivery stores `worker_lost` unrun."""
    client = tuned_stack.client()
    accepted = submit(client, SLOW, "slow", args=[8_000_000]).json()
    key = accepted["result_key"]
    _kill_worker_while_running(tuned_stack, key)
    # The redelivered job starts again: kill that attempt too.
    deadline = time.monotonic() + 30
    while len(_events(tuned_stack, "execution.started", accepted["task_id"])) < 2:
        assert time.monotonic() < deadline, "the job was not delivered again"
        time.sleep(0.05)
    _kill_worker_while_running(tuned_stack, key)

    resp = tuned_stack.wait_result(client, key, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
    assert len(_events(tuned_stack, "execution.started", accepted["task_id"])) == 2
    finished = _events(tuned_stack, "execution.finished", accepted["task_id"])
    assert [e["status"] for e in finished] == ["worker_lost"]


def test_revoking_a_queued_job(tuned_stack: Stack) -> None:
    client = tuned_stack.client()
    # Two slow jobs hold both worker threads; the third waits in the queue.
    busy = [submit(client, SLOW, "slow", args=[6_000_000]).json() for _ in range(2)]
    queued = submit(client, "def f():\n    return 1\n", "f").json()
    running = busy[0]["result_key"]
    deadline = time.monotonic() + 20
    while _pending_state(tuned_stack, running) != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)

    resp = client.request("DELETE", f"/v1/results/{queued['result_key']}")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"key": queued["result_key"], "status": "revoked"}
    assert is_problem(client.request("DELETE", f"/v1/results/{running}"), 409)["code"] == (
        "already_running"
    )

    body = tuned_stack.wait_result(client, queued["result_key"], timeout=60).json()
    assert body["status"] == "failed" and body["error"]["code"] == "revoked"
    assert not _events(tuned_stack, "execution.started", queued["task_id"])  # never ran

    # A finished result can be deleted early; another client cannot touch it.
    done = tuned_stack.wait_result(client, running, timeout=60)
    assert done.json()["status"] == "succeeded"
    other = tuned_stack.client("other", tuned_stack.add_client("other"))
    assert is_problem(other.request("DELETE", f"/v1/results/{running}"), 403)
    from click.testing import CliRunner

    from appliance.cli import main

    deleted = CliRunner().invoke(main, ["--state", str(tuned_stack.state), "revoke", running])
    assert deleted.exit_code == 0 and json.loads(deleted.output)["status"] == "deleted"
    assert is_problem(client.request("GET", "/get-result", params={"key": running}), 404)
