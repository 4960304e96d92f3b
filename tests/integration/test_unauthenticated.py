"""What an unauthenticated caller can cost and learn, against the running stack (issue 12,
findings 10, 18, 19, 20 and 21).

10: 2,000 requests with made-up key ids once added 2,020 audit entries and 2,000 OpenBao reads
    (and as many registry cache entries, never evicted); a body refused before its signature
    could be checked (413) cost an entry each too.
18: an unknown key id answered `unknown_key`, a wrong signature `invalid_signature`.
19: a request signed for another server's authority was accepted.
20: a second `appliance`-tagged signature escaped the time and nonce checks.
21: `auth.failed` entries carried no claimed key id, request id or route.
"""

from __future__ import annotations

import datetime
import re
import secrets
import socket
import time
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import stack
from appliance.signatures import sign_request

from .conftest import Stack, is_problem

pytestmark = pytest.mark.integration

#: A result key that exists nowhere: a signed GET for it answers 404 once authenticated.
_NOWHERE = f"add_1_{'0' * 32}"


def _signed_get(api_url: str, keyid: str, key: Ed25519PrivateKey, **sign: Any) -> httpx.Request:
    req = httpx.Request("GET", f"{api_url}/get-result", params={"key": _NOWHERE})
    sign_request(req, keyid, key, None, **sign)
    return req


def _metrics(appliance_stack: Stack) -> dict[str, float]:
    token = stack.metrics_token_file(appliance_stack.state).read_text().strip()
    page = httpx.get(
        appliance_stack.status["api_url"] + "/metrics",
        headers={"authorization": f"Bearer {token}"},
    ).text
    wanted = re.compile(
        r"^(appliance_client_registry_reads_total\{operation=\"(\w+)\"\}"
        r"|appliance_client_registry_cached_entries) ([0-9.e+]+)$"
    )
    figures: dict[str, float] = {"entry": 0.0, "list": 0.0, "cached": 0.0}
    for line in page.splitlines():
        match = wanted.match(line)
        if match:
            figures[match[2] or "cached"] = float(match[3])
    return figures


def _mine(appliance_stack: Stack, since: int) -> list[dict[str, Any]]:
    return [
        e
        for e in appliance_stack.audit_entries()[since:]
        if e.get("type") in ("auth.failed", "auth.failures")
    ]


def test_a_flood_of_made_up_key_ids_costs_bounded_audit_entries_and_no_registry_reads(
    appliance_stack: Stack,
) -> None:
    api_url = appliance_stack.status["api_url"]
    before_entries = len(appliance_stack.audit_entries())
    before = _metrics(appliance_stack)
    flood, key = 2000, Ed25519PrivateKey.generate()
    started = time.monotonic()
    with httpx.Client() as http:
        for i in range(flood):
            resp = http.send(_signed_get(api_url, f"made-up-{i}-{secrets.token_hex(4)}", key))
            assert resp.status_code == 401, resp.text
    took = time.monotonic() - started
    after = _metrics(appliance_stack)
    window = 10.0  # APPLIANCE_AUTH_FAILURE_WINDOW_SECONDS's default
    # Every failure is recorded once the windows have ended: the samples and the counts.
    deadline = time.monotonic() + window + 30
    while True:
        entries = _mine(appliance_stack, before_entries)
        recorded = sum(1 if e["type"] == "auth.failed" else e["count"] for e in entries)
        if recorded >= flood or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    added = len(appliance_stack.audit_entries()) - before_entries
    print(
        f"\n{flood} unauthenticated requests in {took:.1f} s: {added} audit entries "
        f"({len(entries)} auth entries), registry reads {after['entry'] - before['entry']:.0f}, "
        f"listings {after['list'] - before['list']:.0f}, cached entries {after['cached']:.0f}"
    )
    assert recorded == flood
    windows = int(took // window) + 2
    assert len(entries) <= 2 * windows  # one sample and one count per window, not one per request
    assert after["entry"] - before["entry"] == 0  # a made-up key id costs no OpenBao read
    assert after["list"] - before["list"] <= took / 5 + 2  # the key ids, listed each TTL at most
    assert after["cached"] <= len(appliance_stack.registry().keyids())
    sample = next(e for e in entries if e["type"] == "auth.failed")
    assert sample["claimed_keyid"].startswith("made-up-")
    assert sample["reason"] == "unknown_key"
    assert sample["route"] == "/get-result"
    assert sample["request_id"] and sample["remote_addr"] == "127.0.0.1"
    # A real client is still served at once.
    assert appliance_stack.client().request("GET", f"/v1/results/{_NOWHERE}").status_code == 404


def test_an_unknown_key_id_is_answered_as_a_wrong_signature(appliance_stack: Stack) -> None:
    api_url = appliance_stack.status["api_url"]
    stranger = Ed25519PrivateKey.generate()
    with httpx.Client() as http:
        unknown = http.send(_signed_get(api_url, "nobody-at-all", stranger))
        wrong = http.send(_signed_get(api_url, "local", stranger))
    assert is_problem(unknown, 401) == is_problem(wrong, 401)
    assert unknown.json()["code"] == "invalid_signature"


def test_a_signature_for_another_authority_is_refused(appliance_stack: Stack) -> None:
    """A request signed for `other.example` is sent here with its Host header, as a relayed or
    replayed request would be."""
    api_url = appliance_stack.status["api_url"]
    port = httpx.URL(api_url).port
    elsewhere = _signed_get(f"http://other.example:{port}", "local", appliance_stack.local_key())
    with httpx.Client(transport=httpx.HTTPTransport()) as http:
        resp = http.send(
            httpx.Request(
                "GET",
                f"{api_url}/get-result",
                params={"key": _NOWHERE},
                headers={**dict(elsewhere.headers), "host": f"other.example:{port}"},
            )
        )
    assert is_problem(resp, 401)["code"] == "wrong_authority"
    here = _signed_get(api_url, "local", appliance_stack.local_key())
    assert httpx.Client().send(here).status_code == 404  # the stack's own authority is accepted


def test_a_second_appliance_signature_is_refused(appliance_stack: Stack) -> None:
    """A valid signature with a stale second one beside it: the stale one was never checked."""
    api_url, key = appliance_stack.status["api_url"], appliance_stack.local_key()
    first = _signed_get(api_url, "local", key)
    stale = _signed_get(
        api_url,
        "local",
        key,
        created=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30),
        nonce="reused",
    )
    headers = dict(first.headers)
    for name in ("signature-input", "signature"):
        headers[name] = first.headers[name] + ", " + stale.headers[name].replace("sig1=", "sig2=")
    resp = httpx.Client().send(httpx.Request("GET", first.url, headers=headers))
    assert is_problem(resp, 401)["code"] == "invalid_signature"


def _counted(entries: list[dict[str, Any]], code: str) -> int:
    """How many failures of `code` the entries account for (samples and counts)."""
    samples = sum(1 for e in entries if e.get("type") != "auth.failures" and e.get("code") == code)
    return samples + sum(
        e["codes"].get(code, 0) for e in entries if e.get("type") == "auth.failures"
    )


def test_bodies_refused_before_their_signature_is_checked_cost_bounded_entries(
    appliance_stack: Stack,
) -> None:
    """A declared body over the cap is refused (413) before anything is verified: no more an
    audit entry per request."""
    port = httpx.URL(appliance_stack.status["api_url"]).port
    assert port is not None
    head = (
        f"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 999999\r\n\r\n"
    ).encode()
    before_entries, flood = len(appliance_stack.audit_entries()), 300
    started = time.monotonic()
    for _ in range(flood):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(head)
            assert b" 413 " in conn.recv(4096).split(b"\r\n", 1)[0]
    took = time.monotonic() - started
    deadline = time.monotonic() + 10.0 + 30
    while True:
        added = appliance_stack.audit_entries()[before_entries:]
        if _counted(added, "body_too_large") >= flood or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert _counted(added, "body_too_large") == flood
    windows = int(took // 10.0) + 2
    mine = [e for e in added if "body_too_large" in (e.get("code"), *e.get("codes", {}))]
    assert len(mine) <= 2 * windows  # a sample and a count per window, not an entry per request


def test_a_forwarded_for_header_does_not_choose_the_audited_source(
    appliance_stack: Stack,
) -> None:
    """Red team of issue 12, item 3: uvicorn trusted X-Forwarded-For from 127.0.0.1, so every
    local caller named its own source: 300 failures, each from another made-up address, added
    303 audit entries (one window per source) and wrote `remote_addr` at will."""
    api_url = appliance_stack.status["api_url"]
    before_entries, flood, key = (
        len(appliance_stack.audit_entries()),
        300,
        Ed25519PrivateKey.generate(),
    )
    started = time.monotonic()
    with httpx.Client() as http:
        for i in range(flood):
            req = _signed_get(api_url, f"spoofer-{i}-{secrets.token_hex(4)}", key)
            req.headers["x-forwarded-for"] = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
            assert http.send(req).status_code == 401
    took = time.monotonic() - started
    deadline = time.monotonic() + 10.0 + 30
    while True:
        entries = _mine(appliance_stack, before_entries)
        spoofer = [e for e in entries if "spoofer-" in str(e.get("claimed_keyid", ""))]
        recorded = len(spoofer) + sum(e["count"] for e in entries if e["type"] == "auth.failures")
        if recorded >= flood or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    print(
        f"\n{flood} failures with spoofed X-Forwarded-For in {took:.1f} s: {len(entries)} entries"
    )
    assert recorded >= flood
    assert len(entries) <= 2 * (int(took // 10.0) + 2)  # O(1) per window, not one per address
    assert {e["remote_addr"] for e in entries} == {"127.0.0.1"}
