"""Operability on the real stack: Prometheus metrics after known traffic (and only for the
token's bearer), JSON logs whose request id follows a job from the API into the worker, and
per-client rate limits and quotas answered with 429 and Retry-After."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.results import RESULT_KEY_PATTERN

from .conftest import Stack, is_problem, submit
from .test_workflows import audit_entries

pytestmark = pytest.mark.integration

ADD = "def add(a, b):\n    return a + b\n"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _token(stk: Stack) -> str:
    return Path(stk.status["metrics"]["token_file"]).read_text().strip()


def _scrape(url: str, token: str) -> Samples:
    resp = httpx.get(url, headers={"authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_are_not_public(appliance_stack: Stack) -> None:
    metrics = appliance_stack.status["metrics"]
    assert is_problem(httpx.get(metrics["api"]), 401)["code"] == "metrics_unauthorized"
    wrong = {"authorization": "Bearer " + secrets.token_urlsafe(32)}
    assert httpx.get(metrics["api"], headers=wrong).status_code == 401
    assert httpx.get(metrics["worker"]).status_code == 401
    assert httpx.get(metrics["worker"], headers=wrong).status_code == 401
    assert "/metrics" not in httpx.get(appliance_stack.status["api_url"] + "/openapi.json").text


def test_metrics_count_known_traffic(appliance_stack: Stack) -> None:
    metrics, token = appliance_stack.status["metrics"], _token(appliance_stack)
    api_before, worker_before = _scrape(metrics["api"], token), _scrape(metrics["worker"], token)

    client = appliance_stack.client()
    keys = [submit(client, ADD, "add", args=[i, 1]).json()["result_key"] for i in range(3)]
    for key in keys:
        body = appliance_stack.wait_result(client, key).json()
        assert body["result"] is not None, body
    failing = submit(client, "def f():\n    raise KeyError('x')\n", "f").json()["result_key"]
    assert appliance_stack.wait_result(client, failing).json()["status"] == "failed"
    unsigned = httpx.post(appliance_stack.status["api_url"] + "/v1/tasks", json={})
    assert unsigned.status_code == 401
    time.sleep(0.5)  # the worker counts just after storing the result

    api, worker = _scrape(metrics["api"], token), _scrape(metrics["worker"], token)

    def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    requests = "appliance_http_requests_total"
    assert delta(api, api_before, requests, route="/v1/tasks", method="POST", status="202") == 4
    assert delta(api, api_before, requests, route="/v1/tasks", method="POST", status="401") == 1
    assert (
        delta(
            api,
            api_before,
            "appliance_http_request_duration_seconds_count",
            route="/v1/tasks",
            method="POST",
        )
        == 5
    )
    assert delta(worker, worker_before, "appliance_jobs_total", status="ok") == 3
    assert delta(worker, worker_before, "appliance_jobs_total", status="runtime_error") == 1
    assert delta(worker, worker_before, "appliance_job_duration_seconds_count") == 4
    assert delta(worker, worker_before, "appliance_sandbox_cpu_seconds_count") == 4
    assert delta(worker, worker_before, "appliance_sandbox_max_rss_bytes_count") == 4
    # Labels are route templates and status words: no result key, ever.
    for name, labels in (*api, *worker):
        for _, value in labels:
            assert not RESULT_KEY_PATTERN.search(value), (name, value)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name}: not a JSON log line: {line[:200]!r}")
    return parsed


def test_logs_are_json_and_the_request_id_follows_the_job(appliance_stack: Stack) -> None:
    rid = f"req-{secrets.token_hex(8)}"
    client = appliance_stack.client()
    resp = client.request(
        "POST",
        "/v1/tasks",
        {"module": ADD, "function": "add", "args": [2, 3]},
        headers={"x-request-id": rid},
    )
    assert resp.status_code == 202 and resp.headers["x-request-id"] == rid
    accepted = resp.json()
    assert appliance_stack.wait_result(client, accepted["result_key"]).json()["result"] == 5
    fresh = client.request("GET", "/healthz")
    assert len(fresh.headers["x-request-id"]) == 32  # one is made when none is offered
    ignored = client.request("GET", "/healthz", headers={"x-request-id": "bad id {}"})
    assert ignored.headers["x-request-id"] != "bad id {}"

    run = appliance_stack.state / "run"
    deadline = time.monotonic() + 10
    while True:
        worker_lines = _json_lines(run / "worker" / "worker.log")
        if any(e.get("request_id") == rid for e in worker_lines) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    api_lines = _json_lines(run / "api" / "api.log")
    assert all({"event", "level", "timestamp", "service"} <= set(e) for e in api_lines)
    assert any(e.get("request_id") == rid for e in api_lines)
    job_lines = [e for e in worker_lines if e.get("request_id") == rid]
    assert job_lines and job_lines[-1]["service"] == "worker"
    audited = [e for e in audit_entries(appliance_stack) if e.get("request_id") == rid]
    assert {e["type"] for e in audited} >= {"submission.accepted", "execution.finished"}


def _until_minute_has(seconds: float) -> None:
    """Wait for a fresh minute window if this one ends too soon for the test to fit in it."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.2)


def test_rate_limit_is_429_with_retry_after_and_queues_nothing(appliance_stack: Stack) -> None:
    client = appliance_stack.client(
        "metered", appliance_stack.add_client("metered", rate_per_minute=3)
    )
    _until_minute_has(20)
    for i in range(3):
        assert submit(client, ADD, "add", args=[i, i]).status_code == 202
    admin = appliance_stack.admin_redis()
    pending = {k for k in admin.scan_iter("pending:*")}
    over = submit(client, ADD, "add", args=[1, 1])
    assert is_problem(over, 429)["code"] == "rate_limited"
    assert 1 <= int(over.headers["retry-after"]) <= 61
    workflow = client.request(
        "POST", "/v1/workflows", {"steps": [{"module": ADD, "function": "add", "args": [1, 1]}]}
    )
    assert is_problem(workflow, 429)["code"] == "rate_limited"
    assert {k for k in admin.scan_iter("pending:*")} <= pending
    refused = [
        e
        for e in audit_entries(appliance_stack)
        if e["type"] == "submission.rejected" and e.get("client") == "metered"
    ]
    assert [e["code"] for e in refused] == ["rate_limited", "rate_limited"]
    # Another client is not affected.
    assert submit(appliance_stack.client(), ADD, "add", args=[1, 1]).status_code == 202


def test_daily_quota_counts_workflow_steps(appliance_stack: Stack) -> None:
    client = appliance_stack.client(
        "quota", appliance_stack.add_client("quota", rate_per_minute=100, daily_quota=3)
    )
    step = {"module": ADD, "function": "add", "args": [1, 1]}
    assert client.request("POST", "/v1/workflows", {"steps": [step, step]}).status_code == 202
    too_many = client.request("POST", "/v1/workflows", {"steps": [step, step]})
    assert is_problem(too_many, 429)["code"] == "rate_limited"
    assert "per day" in too_many.json()["detail"]
    assert 1 <= int(too_many.headers["retry-after"]) <= 86401
    assert submit(client, ADD, "add", args=[1, 2]).status_code == 202  # the one left
    assert is_problem(submit(client, ADD, "add", args=[1, 2]), 429)


def test_an_idle_connection_does_not_block_the_workers_scrapes(appliance_stack: Stack) -> None:
    # Issue 12, finding 17: the worker's endpoint served one connection at a time, with no
    # timeout, so one idle connection blocked every scrape.
    import socket
    from urllib.parse import urlsplit

    metrics, token = appliance_stack.status["metrics"], _token(appliance_stack)
    where = urlsplit(metrics["worker"])
    idle = socket.create_connection((where.hostname, where.port))
    try:
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, then nothing
        assert _scrape(metrics["worker"], token)
    finally:
        idle.close()
