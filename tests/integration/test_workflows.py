"""Workflows on the real stack: steps chained through the worker, each result sealed under its
own key, nothing in plaintext on the way, failures skipping what follows."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.jobs import JobMessage
from appliance.queue import TASK_NAME

from .conftest import Stack, is_problem

pytestmark = pytest.mark.integration

INC = "def inc(x):\n    return x + 1\n"
SCALE = "def scale(v, k):\n    return v * k\n"
BOOM = "def boom(v):\n    raise ValueError('step two says no')\n"
SLOW = "def slow(x):\n    i = 0\n    while i < 2000000:\n        i += 1\n    return x\n"


def _step(module: str, function: str, *args: Any, **extra: Any) -> dict[str, Any]:
    return {"module": module, "function": function, "args": list(args), **extra}


def audit_entries(stack: Stack) -> list[dict[str, Any]]:
    """The audit log's entries (checkpoints included)."""
    path = Path(stack.status["audit_log"])
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_audit(stack: Stack, match: Any, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_entries(stack) if match(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_three_steps_chain_their_results(appliance_stack: Stack) -> None:
    canary = f"CANARY{secrets.token_hex(6)}"
    tail = f"def wrap(v, tag):\n    return {{'total': v, 'tag': tag + '{canary}'}}\n"
    client = appliance_stack.client()
    resp = client.request(
        "POST",
        "/v1/workflows",
        {
            "steps": [
                _step(INC, "inc", 1),
                _step(SCALE, "scale", 10),
                _step(tail, "wrap", "t-"),
            ]
        },
    )
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert set(accepted) >= {"workflow_id", "result_key", "steps"}
    keys = [s["result_key"] for s in accepted["steps"]]
    assert len(keys) == 3 and accepted["result_key"] == keys[-1]
    in_flight = appliance_stack.all_redis_bytes()

    bodies = [appliance_stack.wait_result(client, k).json() for k in keys]
    assert [b["status"] for b in bodies] == ["succeeded"] * 3
    assert [b["result"] for b in bodies[:2]] == [2, 20]
    assert bodies[2]["result"] == {"total": 20, "tag": "t-" + canary}

    # The values travelled sealed: the canary is nowhere in Redis, a log or the audit log.
    everything = in_flight + appliance_stack.all_redis_bytes() + appliance_stack.logs().encode()
    assert canary.encode() not in everything
    assert not appliance_stack.admin_redis().exists(f"workflow:{accepted['workflow_id']}")
    finished = _wait_audit(
        appliance_stack,
        lambda e: (
            e["type"] == "execution.finished"
            and e.get("workflow_id") == accepted["workflow_id"]
            and e.get("step") == 2
        ),
    )
    assert finished


def test_failing_middle_step_skips_the_rest(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    resp = client.request(
        "POST",
        "/v1/workflows",
        {
            "steps": [
                _step(INC, "inc", 1),
                _step(BOOM, "boom"),
                _step(INC, "inc"),
                _step(INC, "inc"),
            ]
        },
    )
    assert resp.status_code == 202, resp.text
    steps = resp.json()["steps"]
    bodies = [appliance_stack.wait_result(client, s["result_key"]).json() for s in steps]
    assert [b["status"] for b in bodies] == ["succeeded", "failed", "skipped", "skipped"]
    assert bodies[1]["error"]["type"] == "ValueError"
    assert "step two says no" in bodies[1]["error"]["message"]
    for skipped in bodies[2:]:
        assert skipped["error"]["code"] == "skipped"
        assert skipped["error"]["failed_step"] == 1
        assert skipped["error"]["failed_result_key"] == steps[1]["result_key"]
    started = {
        e.get("task_id") for e in audit_entries(appliance_stack) if e["type"] == "execution.started"
    }
    assert steps[1]["task_id"] in started
    assert not {steps[2]["task_id"], steps[3]["task_id"]} & started  # never ran


def _nothing_queued(stack: Stack, submit: Any) -> None:
    admin = stack.admin_redis()
    before = {k for k in admin.scan_iter() if k.startswith((b"pending:", b"workflow:"))}
    length = admin.llen("celery:appliance")
    submit()
    after = {k for k in admin.scan_iter() if k.startswith((b"pending:", b"workflow:"))}
    assert after <= before and admin.llen("celery:appliance") <= length


def test_too_many_steps_is_400_and_queues_nothing(appliance_stack: Stack) -> None:
    client = appliance_stack.client()

    def submit() -> None:
        resp = client.request("POST", "/v1/workflows", {"steps": [_step(INC, "inc", 1)] * 11})
        assert is_problem(resp, 400)["code"] == "too_many_steps"

    _nothing_queued(appliance_stack, submit)


def test_a_step_over_its_limits_refuses_the_whole_workflow(appliance_stack: Stack) -> None:
    client = appliance_stack.client()

    def submit() -> None:
        resp = client.request(
            "POST",
            "/v1/workflows",
            {
                "steps": [
                    _step(INC, "inc", 1),
                    _step(INC, "inc", limits={"memory_mb": 1_000_000}),
                ]
            },
        )
        assert is_problem(resp, 403)["code"] == "limits_not_allowed"

    _nothing_queued(appliance_stack, submit)


@pytest.mark.parametrize(
    "body",
    [
        {"steps": []},
        {"steps": "x"},
        {"steps": [{"module": 1}]},
        {"steps": [_step(INC, "inc")], "extra": 1},
    ],
)
def test_malformed_workflow_is_400(appliance_stack: Stack, body: dict[str, Any]) -> None:
    resp = appliance_stack.client().request("POST", "/v1/workflows", body)
    assert is_problem(resp, 400)["code"] == "invalid_field"


def test_later_step_pushed_early_without_its_carry_is_refused(appliance_stack: Stack) -> None:
    """Someone with broker credentials copies step 1's signed message out of Redis and enqueues
    it before step 0 has finished: it carries no sealed value, so it is refused unrun, and the
    workflow still completes with the right values."""
    client = appliance_stack.client()
    resp = client.request(
        "POST",
        "/v1/workflows",
        {
            "steps": [
                _step(SLOW, "slow", 5),
                _step(INC, "inc"),
            ]
        },
    )
    accepted = resp.json()
    stored = appliance_stack.admin_redis().hget(f"workflow:{accepted['workflow_id']}", "1")
    assert stored is not None
    early = JobMessage.from_wire(json.loads(stored))
    intruder = appliance_stack.broker_producer("intruder", task_serializer="json")
    intruder.send_task(TASK_NAME, args=[early.to_wire()], queue="appliance")

    bodies = [
        appliance_stack.wait_result(client, s["result_key"]).json() for s in accepted["steps"]
    ]
    assert [b["result"] for b in bodies] == [5, 6]
    refused = _wait_audit(
        appliance_stack,
        lambda e: e["type"] == "task.rejected" and e.get("task_id") == early.task_id,
    )
    assert refused and refused[0]["code"] == "bad_carry"
    started = [
        e
        for e in audit_entries(appliance_stack)
        if e["type"] == "execution.started" and e.get("task_id") == early.task_id
    ]
    assert len(started) == 1  # only the real step 1 ran


def test_workflow_cli(appliance_stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "inc.py").write_text(INC)
    steps = tmp_path / "steps.json"
    steps.write_text(
        json.dumps(
            {
                "steps": [
                    {"module_file": "inc.py", "function": "inc", "args": [40]},
                    {"module_file": "inc.py", "function": "inc"},
                ]
            }
        )
    )
    state = ["--state", str(appliance_stack.state)]
    result = CliRunner().invoke(main, [*state, "workflow", str(steps), "--wait"])
    assert result.exit_code == 0, result.output
    assert [s["result"] for s in json.loads(result.output)["steps"]] == [41, 42]

    (tmp_path / "bad.json").write_text("[]")
    bad = CliRunner().invoke(main, [*state, "workflow", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "non-empty list of steps" in bad.output
