"""One client cannot fill Redis (issue 12, finding 8), on a stack of its own (these tests change
Redis's memory limit): Redis runs with `maxmemory` and `noeviction`; a client over its byte
budget of stored results gets `429 storage_quota` until its results are deleted or expire; a
Redis that refuses writes for memory gives `503 storage_full`, and a job whose result could not
be stored then is retried, not lost."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from appliance import stack
from appliance.cli import SignedClient

from .conftest import FREE_PORTS, Stack, is_problem, submit

pytestmark = pytest.mark.integration

BIG = "def big(n):\n    return 'x' * n\n"
#: A job that runs for a few seconds, so that Redis can be filled while it runs.
SLOW = "def slow(n):\n    total = 0\n    while total < n:\n        total += 1\n    return total\n"


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("storage-limits")
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


def _wait(condition: Callable[[], object], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


def _run(stack_: Stack, client: SignedClient, n: int) -> str:
    resp = submit(client, BIG, "big", args=[n])
    assert resp.status_code == 202, resp.text
    key: str = resp.json()["result_key"]
    assert stack_.wait_result(client, key).json()["status"] == "succeeded"
    return key


def test_redis_has_a_memory_limit_and_never_evicts(own_stack: Stack) -> None:
    config = own_stack.admin_redis().config_get("maxmemory*")
    assert config["maxmemory-policy"] == "noeviction"
    assert 256 * 2**20 <= int(config["maxmemory"]) <= 4096 * 2**20


def test_a_client_over_its_byte_budget_gets_429_storage_quota(own_stack: Stack) -> None:
    """The review's attack, scaled down: results kept until the client's budget is spent."""
    key_file = own_stack.add_client("hoarder", ("big",), storage_bytes=300_000)
    client = own_stack.client("hoarder", key_file)
    kept = [_run(own_stack, client, 100_000) for _ in range(3)]  # ~400 KB sealed in all.

    refused = submit(client, BIG, "big", args=[10])
    problem = is_problem(refused, 429)
    assert problem["code"] == "storage_quota"
    assert 1 <= int(refused.headers["Retry-After"]) <= 300
    # Nothing was queued or counted for the refused request.
    audit = [e for e in own_stack.audit_entries() if e.get("client") == "hoarder"]
    assert [e.get("type") for e in audit].count("submission.accepted") == 3

    # Another client's budget is its own.
    assert submit(own_stack.client(), BIG, "big", args=[10]).status_code == 202

    # Deleting results releases their bytes at once.
    for key in kept[:2]:
        assert client.request("DELETE", f"/v1/results/{key}").status_code == 200
    assert submit(client, BIG, "big", args=[10]).status_code == 202


def test_a_full_redis_is_503_storage_full_and_the_worker_keeps_the_job(own_stack: Stack) -> None:
    admin = own_stack.admin_redis()
    limit = admin.config_get("maxmemory")["maxmemory"]
    client = own_stack.client()
    accepted = submit(
        client, SLOW, "slow", args=[20_000_000], limits={"cpu_seconds": 20, "wall_seconds": 40}
    )
    assert accepted.status_code == 202, accepted.text
    key = accepted.json()["result_key"]
    _wait(lambda: _state(admin, key) == "running", 30, "the job never started")
    try:
        admin.config_set("maxmemory", 1)  # Every write is refused from now on.
        refused = submit(client, BIG, "big", args=[10])
        assert is_problem(refused, 503)["code"] == "storage_full"
        assert refused.headers["Retry-After"]
        # The job ends while Redis is full: its result cannot be stored, and stays pending.
        _wait(lambda: _refused_store_seen(own_stack), 60, "no refused store seen")
        assert not admin.exists(f"result:{key}")
    finally:
        admin.config_set("maxmemory", limit)
    # Redis has room again: the worker's retry stores the result; nothing was lost.
    result = own_stack.wait_result(client, key, timeout=60)
    assert result.status_code == 200, result.text
    assert result.json()["status"] == "succeeded"
    assert result.json()["result"] == 20_000_000


def _state(admin: redis.Redis, key: str) -> str | None:
    raw = admin.get(f"pending:{key}")
    return None if raw is None else str(json.loads(raw)["state"])


def _refused_store_seen(stack_: Stack) -> bool:
    """The worker reacted to the refused write: it waits (now), or it retried or rejected the
    delivery through Celery (before the fix, which lost the job)."""
    log = _worker_log(stack_)
    return any(sign in log for sign in ("Redis is full", "Retry in", "reject requeue"))


def _worker_log(stack_: Stack) -> str:
    return (stack_.state / "run" / "worker" / "worker.log").read_text(errors="replace")
