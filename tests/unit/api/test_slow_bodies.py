"""The app's own body deadline (issue 12, finding 11): a body that stops arriving is refused
with 408 `body_timeout` after `api_body_timeout_seconds`; the server-side deadlines are tested
against the real stack (tests/integration/test_slow_clients.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi import Request

from appliance.api._requests import read_body
from appliance.api._server import BODY_GRACE_SECONDS, ReadLimits
from appliance.errors import BadRequest, RequestTimeout
from appliance.settings import Settings


def _stalled_request(first: bytes) -> Request:
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.sleep(3600)  # The client never sends the rest.
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/v1/tasks", "headers": []}
    return Request(scope, receive)


def test_a_stalled_body_is_refused_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as caught:
        asyncio.run(read_body(_stalled_request(b'{"mod'), 1024, 0.2))
    assert caught.value.status == 408 and caught.value.code == "body_timeout"
    assert time.monotonic() - started < 2


def test_a_client_that_goes_away_mid_body_is_a_4xx() -> None:
    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(BadRequest) as caught:
        asyncio.run(read_body(request, 1024, 5))
    assert caught.value.code == "client_disconnected"


def test_the_defaults_bound_what_a_slow_client_may_hold() -> None:
    limits = ReadLimits.from_settings(Settings())
    assert (limits.header_seconds, limits.body_seconds) == (10, 30)
    assert limits.limit_concurrency == 512 and limits.max_connections == 2048
    assert BODY_GRACE_SECONDS > 0  # The app's 408 goes out before the server cuts the body.
