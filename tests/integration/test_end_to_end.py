"""The data path on the real stack: signed submission → JSON-only queue → sandbox → sealed
result in a TTL'd Redis key → /get-result; and every bad input of the contract's table."""

from __future__ import annotations

import datetime
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, algorithms

from appliance.signatures import _PrivateKey, sign_request

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration

KEY_RE = re.compile(r"^add_(\d{13})_[0-9a-f]{32}$")
ADD = "def add(a, b):\n    return {'sum': a + b}\n"


def test_signed_submission_returns_the_value(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    before_ms = int(time.time() * 1000)
    resp = submit(client, ADD, "add", args=[2, 40])
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert accepted["status"] == "queued"
    key = accepted["result_key"]
    match = KEY_RE.match(key)
    assert match and before_ms - 1000 <= int(match.group(1)) <= before_ms + 5000

    result = appliance_stack.wait_result(client, key)
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["status"] == "succeeded" and body["result"] == {"sum": 42}
    assert body["key"] == key and body["error"] is None and "expires_at" in body

    admin = appliance_stack.admin_redis()
    stored = admin.get(f"result:{key}")
    assert stored is not None
    ttl = admin.ttl(f"result:{key}")
    assert 0 < ttl <= 300
    envelope = json.loads(json.loads(stored)["sealed"])
    assert set(envelope) == {"v", "kid", "n", "ct"} and envelope["kid"].startswith("vault:v")
    assert b'"sum"' not in stored and b"succeeded" not in stored

    # Same answer by path.
    again = client.request("GET", f"/v1/results/{key}")
    assert again.status_code == 200 and again.json()["result"] == {"sum": 42}


def test_failing_function_reports_error(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    module = "def boom():\n    raise ValueError('no good')\n"
    key = submit(client, module, "boom").json()["result_key"]
    body = appliance_stack.wait_result(client, key).json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "runtime_error"
    assert body["error"]["type"] == "ValueError"


def test_unknown_result_is_404(appliance_stack: Stack) -> None:
    client = appliance_stack.client()
    resp = client.request("GET", "/get-result", params={"key": f"add_1_{'0' * 32}"})
    assert is_problem(resp, 404)["code"] == "result_not_found"


# ---- bad input: each gets its status and problem+json, and runs nothing ------------------------


def _queue_and_keys(stack: Stack) -> tuple[int, set[bytes]]:
    admin = stack.admin_redis()
    keys = {k for k in admin.scan_iter() if k.startswith((b"result:", b"pending:"))}
    return int(admin.llen("celery:appliance")), keys


def _raw(
    stack: Stack,
    method: str,
    path: str,
    content: bytes | None = None,
    content_type: str = "application/json",
    **sign: Any,
) -> httpx.Response:
    headers = {"content-type": content_type} if content is not None else {}
    req = httpx.Request(method, stack.status["api_url"] + path, content=content, headers=headers)
    key = sign.pop("key", None) or stack.local_key()
    keyid = sign.pop("keyid", "local")
    if sign.pop("unsigned", False) is False:
        sign_request(req, keyid, key, content, **sign)
    return httpx.Client().send(req)


def _body(**overrides: Any) -> bytes:
    return json.dumps({"module": ADD, "function": "add", "args": [1, 2], **overrides}).encode()


def _tamper(stack: Stack) -> httpx.Response:
    body = _body()
    req = httpx.Request(
        "POST",
        stack.status["api_url"] + "/v1/tasks",
        content=body,
        headers={"content-type": "application/json"},
    )
    sign_request(req, "local", stack.local_key(), body)
    tampered = body.replace(b"[1, 2]", b"[1, 3]")
    req2 = httpx.Request("POST", req.url, content=tampered, headers=dict(req.headers))
    return httpx.Client().send(req2)


def _untagged(stack: Stack) -> httpx.Response:
    body = _body()
    req = httpx.Request(
        "POST",
        stack.status["api_url"] + "/v1/tasks",
        content=body,
        headers={"content-type": "application/json"},
    )
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_PrivateKey(stack.local_key())
    )
    signer.sign(
        req,
        key_id="local",
        nonce=secrets.token_hex(8),
        covered_component_ids=("@method", "@target-uri", "content-type"),
        body=body,
    )
    return httpx.Client().send(req)


def _replayed(stack: Stack) -> httpx.Response:
    nonce = secrets.token_hex(8)
    first = _raw(stack, "GET", f"/get-result?key=add_1_{'0' * 32}", nonce=nonce)
    assert first.status_code == 404
    return _raw(stack, "GET", f"/get-result?key=add_1_{'0' * 32}", nonce=nonce)


def _now(offset: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)


BAD_INPUTS = {
    "unsigned": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(), unsigned=True),
        401,
        "missing_signature",
    ),
    "tampered body": (_tamper, 401, "invalid_signature"),
    "wrong key": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(), key=Ed25519PrivateKey.generate()),
        401,
        "invalid_signature",
    ),
    # Told apart from a wrong signature in the audit log only (issue 12, finding 18).
    "unknown key": (
        lambda s: _raw(
            s, "POST", "/v1/tasks", _body(), keyid="nobody", key=Ed25519PrivateKey.generate()
        ),
        401,
        "invalid_signature",
    ),
    "stale created": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(), created=_now(-301)),
        401,
        "stale_signature",
    ),
    "future created": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(), created=_now(60)),
        401,
        "stale_signature",
    ),
    "expired": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(), expires=_now(-5)),
        401,
        "stale_signature",
    ),
    "replayed nonce": (_replayed, 401, "replayed_nonce"),
    "missing tag": (_untagged, 401, "missing_tag"),
    "non-JSON": (
        lambda s: _raw(s, "POST", "/v1/tasks", b"module=x", "text/plain"),
        415,
        "unsupported_media_type",
    ),
    "malformed JSON": (
        lambda s: _raw(s, "POST", "/v1/tasks", b'{"module": '),
        400,
        "malformed_json",
    ),
    "oversized body": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(module="#" * (300 * 1024))),
        413,
        "body_too_large",
    ),
    "invalid function name": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(function="__import__")),
        400,
        "invalid_function",
    ),
    "unknown field": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(shell="rm -rf /")),
        400,
        "invalid_field",
    ),
    "limits above policy": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(limits={"memory_mb": 10**6})),
        403,
        "limits_not_allowed",
    ),
    # Issue 12, finding 13: a limit too large for a float once gave a 500 (OverflowError).
    "limit too large for a float": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(limits={"cpu_seconds": 10**400})),
        403,
        "limits_not_allowed",
    ),
    "limit beyond float range": (
        lambda s: _raw(
            s,
            "POST",
            "/v1/tasks",
            _body(limits={"cpu_seconds": 7}).replace(b": 7}", b": 1e999}"),
        ),
        400,
        "invalid_limits",
    ),
    "import never allowed": (
        lambda s: _raw(s, "POST", "/v1/tasks", _body(imports=["os"])),
        403,
        "import_not_allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_runs_nothing(appliance_stack: Stack, case: str) -> None:
    send, status, code = BAD_INPUTS[case]
    queued_before, keys_before = _queue_and_keys(appliance_stack)
    resp = send(appliance_stack)
    assert is_problem(resp, status)["code"] == code
    queued_after, keys_after = _queue_and_keys(appliance_stack)
    assert queued_after == queued_before
    assert keys_after - keys_before == set()


def test_function_the_client_may_not_call(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("limited", functions=("report_*",))
    client = appliance_stack.client("limited", key_file)
    _, keys_before = _queue_and_keys(appliance_stack)
    resp = submit(client, ADD, "add", args=[1, 2])
    assert is_problem(resp, 403)["code"] == "function_not_allowed"
    assert _queue_and_keys(appliance_stack)[1] == keys_before
    ok = submit(client, "def report_x():\n    return 1\n", "report_x")
    assert ok.status_code == 202


def test_another_clients_result_is_403(appliance_stack: Stack) -> None:
    owner = appliance_stack.client()
    key = submit(owner, ADD, "add", args=[1, 1]).json()["result_key"]
    assert appliance_stack.wait_result(owner, key).status_code == 200
    other = appliance_stack.client("other", appliance_stack.add_client("other"))
    resp = other.request("GET", "/get-result", params={"key": key})
    assert is_problem(resp, 403)["code"] == "not_your_result"


def test_forbidden_secret_is_403_before_queueing(appliance_stack: Stack) -> None:
    client = appliance_stack.client("secretless", appliance_stack.add_client("secretless"))
    queued_before, keys_before = _queue_and_keys(appliance_stack)
    resp = submit(client, ADD, "add", args=[1, 2], secrets=["appliance/db-password"])
    assert is_problem(resp, 403)["code"] == "secret_not_allowed"
    assert _queue_and_keys(appliance_stack) == (queued_before, keys_before)


# ---- nothing in plaintext at rest ------------------------------------------------------------


def test_no_canary_in_redis_or_logs(appliance_stack: Stack) -> None:
    src_canary, arg_canary, result_canary = (f"CANARY{secrets.token_hex(6)}" for _ in range(3))
    module = (
        f"# {src_canary}\n"
        "def leak(x):\n"
        f"    print('{src_canary}', x)\n"
        f"    return x + '{result_canary}'\n"
    )
    client = appliance_stack.client()
    # A slow job too, so that a message is still in the queue or running while we scan.
    slow = "def slow(x):\n    i = 0\n    while i < 3000000:\n        i += 1\n    return x\n"
    slow_key = submit(client, slow, "slow", args=[arg_canary]).json()["result_key"]
    key = submit(client, module, "leak", args=[arg_canary]).json()["result_key"]
    in_flight = appliance_stack.all_redis_bytes()
    body = appliance_stack.wait_result(client, key).json()
    assert body["result"] == arg_canary + result_canary
    appliance_stack.wait_result(client, slow_key)
    everything = in_flight + appliance_stack.all_redis_bytes() + appliance_stack.logs().encode()
    for canary in (src_canary, arg_canary, result_canary):
        assert canary.encode() not in everything


def test_pickle_message_is_refused_not_executed(appliance_stack: Stack, tmp_path: Path) -> None:
    """Someone holding broker credentials pushes a pickled task: the worker never unpickles it."""
    from appliance.queue import TASK_NAME

    marker = tmp_path / "pwned"
    attacker = appliance_stack.broker_producer(
        "attacker", task_serializer="pickle", accept_content=["pickle", "json"]
    )

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {marker}",))

    attacker.send_task(TASK_NAME, args=[Exploit()], queue="appliance", serializer="pickle")
    admin = appliance_stack.admin_redis()
    deadline = time.monotonic() + 15
    while admin.llen("celery:appliance") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert admin.llen("celery:appliance") == 0  # consumed and refused, not left to loop
    assert not marker.exists()
    assert "untrusted content" in appliance_stack.logs() or "ContentDisallowed" in (
        appliance_stack.logs()
    )
    # The worker is still alive and serving.
    client = appliance_stack.client()
    key = submit(client, ADD, "add", args=[1, 1]).json()["result_key"]
    assert appliance_stack.wait_result(client, key).json()["result"] == {"sum": 2}


def test_readyz_and_healthz(appliance_stack: Stack) -> None:
    base = appliance_stack.status["api_url"]
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "redis": True,
        "vault": True,
        "worker": True,
    }
    assert httpx.get(base + "/openapi.json").status_code == 200


def test_no_documentation_page_loads_scripts_from_a_cdn(appliance_stack: Stack) -> None:
    # Issue 12, finding 24: the running API served /docs and /redoc, whose pages load scripts
    # from a CDN. The schema itself stays (CONTRACT §2).
    base = appliance_stack.status["api_url"]
    for path in ("/docs", "/redoc"):
        assert httpx.get(base + path).status_code == 404, path
    assert "/v1/tasks" in httpx.get(base + "/openapi.json").json()["paths"]
