"""Unauthenticated failures are each recorded, at a bounded cost in audit entries (issue 12,
findings 10 and 21): the first of a source and window alone, the rest counted."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

from appliance.api import create_app
from appliance.api._auth_failures import OVERFLOW, AuthFailures, Failure
from appliance.audit import UnsafeMemoryAuditSink

from .harness import Clock, Harness


def _failure(source: str = "192.0.2.1", **kw: Any) -> Failure:
    fields: dict[str, Any] = {"code": "invalid_signature", "route": "/v1/tasks", **kw}
    return Failure(source=source, **fields)


def _recorded(audit: UnsafeMemoryAuditSink) -> int:
    """How many failures the entries account for."""
    singles = len(audit.of_type("auth.failed"))
    return singles + sum(e["count"] for e in audit.of_type("auth.failures"))


def test_a_flood_from_one_source_costs_two_entries_and_records_every_failure() -> None:
    audit, clock = UnsafeMemoryAuditSink(), Clock()
    failures = AuthFailures(audit, clock, window_seconds=60)
    for i in range(2000):
        failures.refused(_failure(claimed_keyid=f"made-up-{i}", reason="unknown_key"))
    assert len(audit.events) == 1  # the sample, at once
    first = audit.events[0]
    assert (first["type"], first["claimed_keyid"], first["route"]) == (
        "auth.failed",
        "made-up-0",
        "/v1/tasks",
    )
    clock.now += 60
    failures.flush_ended()
    [counted] = audit.of_type("auth.failures")
    assert counted["count"] == 1999 and counted["codes"] == {"unknown_key": 1999}
    assert counted["remote_addr"] == "192.0.2.1"
    assert _recorded(audit) == 2000


def test_each_window_and_each_source_has_its_own_sample() -> None:
    audit, clock = UnsafeMemoryAuditSink(), Clock()
    failures = AuthFailures(audit, clock, window_seconds=60)
    failures.refused(_failure("192.0.2.1"))
    failures.refused(_failure("192.0.2.2"))
    clock.now += 61
    failures.refused(_failure("192.0.2.1"))  # a new window of that source
    assert [e["remote_addr"] for e in audit.of_type("auth.failed")] == [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.1",
    ]
    assert audit.of_type("auth.failures") == []  # nothing beyond the samples to count


def test_junk_cannot_hide_an_attempt_on_a_real_client() -> None:
    """An attacker who floods first and then tries a registered client's key id still leaves
    an entry naming that key id, written at once."""
    audit, clock = UnsafeMemoryAuditSink(), Clock()
    failures = AuthFailures(audit, clock)
    for _ in range(100):
        failures.refused(_failure(reason="unknown_key", claimed_keyid="junk"))
    failures.refused(_failure(reason="wrong_key", claimed_keyid="alice"))
    alone = [e for e in audit.of_type("auth.failed") if e.get("claimed_keyid") == "alice"]
    assert alone and alone[0]["reason"] == "wrong_key"


def test_many_sources_cost_a_bounded_number_of_entries() -> None:
    audit, clock = UnsafeMemoryAuditSink(), Clock()
    failures = AuthFailures(audit, clock, max_sources=50)
    for i in range(3000):
        failures.refused(_failure(f"10.0.{i // 250}.{i % 250}"))
    failures.close()
    assert len(audit.of_type("auth.failed")) == 51  # 50 sources and `other`
    assert {e["remote_addr"] for e in audit.of_type("auth.failures")} == {OVERFLOW}
    assert _recorded(audit) == 3000


def test_concurrent_failures_are_all_counted() -> None:
    audit, clock = UnsafeMemoryAuditSink(), Clock()
    failures = AuthFailures(audit, clock)
    start = threading.Barrier(8)

    def flood() -> None:
        start.wait()
        for _ in range(500):
            failures.refused(_failure(code="missing_signature"))

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures.close()  # the shutdown writes the window that is still open
    assert _recorded(audit) == 4000
    assert len(audit.events) == 2


def test_a_window_that_ends_is_written_without_another_request() -> None:
    audit = UnsafeMemoryAuditSink()
    failures = AuthFailures(audit, time.time, window_seconds=0.2)
    failures.start()
    try:
        for _ in range(3):
            failures.refused(_failure())
        deadline = time.monotonic() + 10
        while not audit.of_type("auth.failures") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert audit.of_type("auth.failures")[0]["count"] == 2
    finally:
        failures.close()


def test_the_api_records_what_an_auth_failure_claimed() -> None:
    """Issue 12, finding 21: `auth.failed` carried no key id, request id or route."""
    api = Harness()
    resp = api.request("GET", "/get-result", params={"key": "x"}, keyid="nobody")
    assert resp.status_code == 401
    [entry] = api.audit.of_type("auth.failed")
    assert entry["claimed_keyid"] == "nobody"
    assert entry["reason"] == "unknown_key"
    assert entry["route"] == "/get-result"
    assert entry["request_id"] == resp.headers["x-request-id"]
    assert entry["remote_addr"]


def test_unknown_and_wrong_keys_get_the_same_answer_over_http() -> None:
    api = Harness()
    api.add_client("bob", allowed_functions=("*",))
    unknown = api.request("GET", "/get-result", params={"key": "x"}, keyid="nobody")
    wrong = api.request("GET", "/get-result", params={"key": "x"}, keyid="bob")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.json()["code"] == "invalid_signature"


def test_a_replay_is_never_aggregated() -> None:
    """A replayed nonce has a signature that verified: each gets its own entry."""
    api = Harness()
    api.request("GET", "/get-result", params={"key": "x"}, nonce="n1")
    for _ in range(3):
        assert api.request("GET", "/get-result", params={"key": "x"}, nonce="n1").status_code == 401
    replays = [e for e in api.audit.of_type("auth.failed") if e["code"] == "replayed_nonce"]
    assert len(replays) == 3 and replays[0]["claimed_keyid"] == "alice"


def test_the_api_writes_the_open_windows_when_it_stops() -> None:
    """The lifespan starts the flush and closes it at shutdown: nothing counted is lost."""
    api = Harness()
    app = create_app(lambda: api.services)

    async def serve_then_stop() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                for _ in range(3):
                    assert (await http.get("/get-result?key=x")).status_code == 401
            assert len(api.audit.of_type("auth.failed")) == 1
            assert api.audit.of_type("auth.failures") == []  # the window is still open

    asyncio.run(serve_then_stop())
    [counted] = api.audit.of_type("auth.failures")
    assert counted["count"] == 2 and counted["codes"] == {"missing_signature": 2}


def test_bodies_refused_before_any_signature_check_are_counted_too() -> None:
    """A body over the cap is refused before it can be verified: nobody is authenticated, so it
    is counted like a 401, its sample a `submission.rejected` entry."""
    api = Harness()

    async def send_three() -> list[int]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            big = b"{" + b" " * (300 * 1024) + b"}"
            headers = {"content-type": "application/json"}
            return [
                (await http.post("/v1/tasks", content=big, headers=headers)).status_code
                for _ in range(3)
            ]

    assert asyncio.run(send_three()) == [413, 413, 413]
    [sample] = api.audit.of_type("submission.rejected")
    assert sample["code"] == "body_too_large" and "client" not in sample
    api.services.auth_failures.close()
    [counted] = api.audit.of_type("auth.failures")
    assert counted["codes"] == {"body_too_large": 2}
