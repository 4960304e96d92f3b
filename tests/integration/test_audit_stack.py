"""The audit log of a running stack: API and worker both write it, and it verifies."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from appliance.cli import main

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration


def _events(stack: Stack) -> list[dict[str, object]]:
    path = stack.state / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_stack_activity_is_audited_and_verifies(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    key = submit(client, "def audited(x):\n    return x\n", "audited", args=[3]).json()[
        "result_key"
    ]
    assert appliance_stack.wait_result(client, key).status_code == 200
    unsigned = client.http.post("/v1/tasks", json={"module": "", "function": "f"})
    is_problem(unsigned, 401)
    time.sleep(0.5)
    events = _events(appliance_stack)
    by_type = {(e.get("type") or e.get("event")) for e in events}
    for wanted in (
        "submission.accepted",
        "execution.started",
        "execution.finished",
        "result.read",
        "auth.failed",
    ):
        assert wanted in by_type, (wanted, by_type)
    mine = [e for e in events if e.get("result_key") == key]
    assert {e.get("source") for e in mine} >= {"api", "worker"}
    runner = CliRunner()
    res = runner.invoke(main, ["--state", str(appliance_stack.state), "audit", "verify"])
    assert res.exit_code == 0, res.output
    shown = runner.invoke(
        main,
        ["--state", str(appliance_stack.state), "audit", "show", "--function", "audited", "--json"],
    )
    assert shown.exit_code == 0, shown.output
    assert any(json.loads(line).get("result_key") == key for line in shown.output.splitlines())
