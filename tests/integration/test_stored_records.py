"""Records in Redis altered with the API role's Redis rights (red team of issue 12, items 4
and 5), on the real stack: a leased `database/creds/api` user writes what the red team wrote.

4: rewriting `acceptance.result_key` of an idempotency record made the client's retry answer
   another job's result key (202), and the client read that job's result as its own.
5: `{"v":1}` or `[]` at `result:<key>`, or `junk` at `pending:<key>`, made GET /get-result
   answer 500 and reset the connection; the worker crashed on a junk pending record.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import httpx
import pytest
import redis

from appliance.errors import RecordLost
from appliance.store import Claim, RedisResultStore, keys

from .conftest import Stack, is_problem, submit
from .test_workflow_chain import api_redis, worker_paused

pytestmark = pytest.mark.integration

ECHO = "def echo(x):\n    return x\n"


def _retry(client: Any, key: str, value: str) -> httpx.Response:
    body = {"module": ECHO, "function": "echo", "args": [value]}
    return client.request("POST", "/v1/tasks", body, headers={"Idempotency-Key": key})


def _wait_done(client: Any, key: str, timeout: float = 30) -> httpx.Response:
    """The answer for `key` once the worker stored its result (410 until it overwrites junk)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = client.request("GET", "/get-result", params={"key": key})
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        time.sleep(0.05)


def _audited(s: Stack, since: int, code: str) -> list[dict[str, Any]]:
    return [e for e in s.audit_entries()[since:] if e.get("code") == code]


def test_a_rewritten_idempotency_acceptance_is_refused(appliance_stack: Stack) -> None:
    s, client = appliance_stack, appliance_stack.client()
    other = submit(client, ECHO, "echo", args=["OLD-RESULT"]).json()["result_key"]
    assert s.wait_result(client, other).json()["result"] == "OLD-RESULT"
    key = f"k-{secrets.token_hex(8)}"
    first = _retry(client, key, "MINE")
    assert first.status_code == 202, first.text
    name = keys.idempotency("local", hashlib.sha256(key.encode()).hexdigest())
    before = len(s.audit_entries())
    with api_redis(s) as r:
        record = json.loads(r.get(name))
        assert record["acceptance"]["result_key"] == first.json()["result_key"]
        record["acceptance"]["result_key"] = other
        r.set(name, json.dumps(record), keepttl=True)
        again = _retry(client, key, "MINE")
        problem = is_problem(again, 409)
        assert problem["code"] == "idempotency_record_invalid"
        assert other not in again.text
        # A record that is no record at all, or of another Redis type, is refused the same way.
        for junk in (b"junk", b"[]", b'{"v":1}', b"\xff"):
            r.set(name, junk, keepttl=True)
            assert is_problem(_retry(client, key, "MINE"), 409)["code"] == (
                "idempotency_record_invalid"
            )
        r.delete(name)
        r.rpush(name, "x")
        assert is_problem(_retry(client, key, "MINE"), 409)["code"] == "idempotency_record_invalid"
        r.delete(name)
    refused = _audited(s, before, "idempotency_record_invalid")
    assert len(refused) == 6 and all(e["client"] == "local" for e in refused)
    # An unaltered retry is still answered from its record.
    key2 = f"k-{secrets.token_hex(8)}"
    assert _retry(client, key2, "TWICE").json() == _retry(client, key2, "TWICE").json()


#: Values the red team planted, and more of the kind: not JSON, JSON of another shape, fields
#: of the wrong type or value.
_JUNK_RESULTS = [b'{"v":1}', b"[]", b"junk", b"\xff\xfe", b'{"client":"local"}', b"[" * 5000]
_JUNK_PENDING = [b"junk", b"[]", b'{"client":"local","state":"lost"}', b'{"client":7}', b"null"]


def test_junk_at_a_result_key_is_410_result_lost_on_a_kept_alive_connection(
    appliance_stack: Stack,
) -> None:
    s, client = appliance_stack, appliance_stack.client()
    key = submit(client, ECHO, "echo", args=["V"]).json()["result_key"]
    assert s.wait_result(client, key).status_code == 200
    before = len(s.audit_entries())
    answers: list[tuple[int, str]] = []
    with api_redis(s) as r:
        for junk in _JUNK_RESULTS:
            r.set(keys.RESULT + key, junk, ex=60)
            resp = client.request("GET", "/get-result", params={"key": key})
            answers.append((resp.status_code, resp.json().get("code", "")))
        r.delete(keys.RESULT + key)
        r.hset(keys.RESULT + key, "client", "local")  # Another Redis type: WRONGTYPE.
        resp = client.request("GET", "/get-result", params={"key": key})
        answers.append((resp.status_code, resp.json().get("code", "")))
        r.delete(keys.RESULT + key)
    assert answers == [(410, "result_lost")] * (len(_JUNK_RESULTS) + 1)
    assert len(_audited(s, before, "result_lost")) == len(answers)
    # Still a live, kept-alive connection: the next request is answered on it.
    assert client.request("GET", "/get-result", params={"key": key}).status_code == 404


def test_junk_at_a_pending_key_is_410_and_the_worker_still_runs_the_job(
    appliance_stack: Stack,
) -> None:
    s, client = appliance_stack, appliance_stack.client()
    with api_redis(s) as r:
        for junk in _JUNK_PENDING:
            with worker_paused(s):
                key = submit(client, ECHO, "echo", args=[f"RAN-{junk!r}"]).json()["result_key"]
                r.set(keys.pending(key), junk, keepttl=True)
                resp = client.request("GET", "/get-result", params={"key": key})
                assert is_problem(resp, 410)["code"] == "result_lost", junk
                assert is_problem(client.request("DELETE", f"/v1/results/{key}"), 410)
            done = _wait_done(client, key)
            assert done.status_code == 200, (junk, done.text)
            assert done.json()["result"] == f"RAN-{junk!r}"


#: Junk as a string value, and junk of another Redis type (WRONGTYPE on every read).
_AS_STRING = [b"junk", b"[]", b'{"v":1}', b"\xff", b'{"state":"running","attempts":"x"}']


def _plant(r: redis.Redis, name: str, junk: bytes | None) -> None:
    r.delete(name)
    if junk is None:
        r.rpush(name, "x")  # a list where a string is written
    else:
        r.set(name, junk, ex=60)


@pytest.mark.parametrize("junk", [*_AS_STRING, None], ids=lambda v: repr(v))
def test_every_store_reader_on_real_redis_answers_junk_as_record_lost(
    appliance_stack: Stack, junk: bytes | None
) -> None:
    """The store's readers against real Redis (the admin writes, as an operator by hand
    would): RecordLost or the documented fallback, never a foreign exception."""
    r = appliance_stack.admin_redis()
    store = RedisResultStore(r)
    key, nonce = f"echo_1800000000000_{secrets.token_hex(16)}", secrets.token_hex(16)
    for name in (keys.RESULT + key, keys.pending(key)):
        _plant(r, name, junk)
        with pytest.raises(RecordLost) as lost:
            store.get(key)
        assert lost.value.code == "result_lost"
        r.delete(name)
    _plant(r, keys.pending(key), junk)
    for read in (lambda: store.state(key), lambda: store.revoke(key, "local")):
        with pytest.raises(RecordLost):
            read()
    assert store.start(key, "local", "t-1") is True  # overwritten: no revocation
    assert store.state(key) == "running"
    _plant(r, keys.claim(nonce), junk)
    with pytest.raises(RecordLost):
        store.claim(nonce, 60, "me:1")
    store.finish_claim(nonce, 60)  # overwrites the junk
    assert store.claim(nonce, 60, "me:1") == Claim("done")
    client = f"c{secrets.token_hex(8)}"
    r.hset(keys.storage(client), key, junk or b"x")
    assert all(isinstance(s.size, int) for s in store.storage_use(client))
    r.delete(keys.storage(client))
    _plant(r, keys.storage(client), junk)
    assert store.storage_use(client) == []
    r.delete(keys.storage(client))
    r.delete(keys.pending(key), keys.claim(nonce))
