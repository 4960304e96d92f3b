"""Every reader of a JSON record the store keeps in Redis, over values it never wrote (red team
of issue 12, item 5): the record as written, or `RecordLost` with its code, never another
exception (which was a 500 at the API and a crash in the worker). The same values on the real
stack: tests/integration/test_stored_records.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.errors import RecordLost
from appliance.store import Claim, UnsafeMemoryResultStore, keys
from appliance.store._idempotency import _decode
from appliance.store._results import Pending, revoke_record, stored_record
from appliance.worker import execute
from tests.unit.worker.test_execute import World

#: Each reader, and the code of its RecordLost.
READERS: dict[str, tuple[Callable[[bytes], Any], str]] = {
    "result": (lambda raw: stored_record(raw, 0, None), "result_lost"),
    "pending": (lambda raw: stored_record(None, 0, raw), "result_lost"),
    "pending.parse": (Pending.parse, "result_lost"),
    "revoke": (lambda raw: revoke_record(raw, "alice"), "result_lost"),
    "claim": (Claim.parse, "record_lost"),
    "idempotency": (_decode, "idempotency_record_invalid"),
}

#: The red team's values and their kin: not JSON, not UTF-8, too deep, JSON of another shape,
#: fields missing or of the wrong type or value.
JUNK = [
    b"",
    b"junk",
    b"\xff\xfe",
    b"[" * 100_000,
    b"[]",
    b"null",
    b"7",
    b'"text"',
    b'{"v":1}',
    b"{}",
    b'{"client":7,"state":"queued","sealed":"s"}',
    b'{"client":"alice","state":["queued"],"sealed":null}',
    b'{"client":"alice","state":"lost","sealed":{}}',
    b'{"state":"running","owner":"x","attempts":"3"}',
    b'{"state":"running","owner":"x","attempts":true}',
    b'{"state":"running","owner":"x","attempts":-1}',
    b'{"state":"done","owner":null,"attempts":0,"client":null}',
    b'{"v":"1","state":"accepted","fingerprint":"f","acceptance":{}}',
    b'{"v":1,"state":"accepted","fingerprint":"f","acceptance":[]}',
    b'{"v":1,"state":"pending","fingerprint":"f","acceptance":{"result_key":"x"}}',
    b'{"v":1,"state":"accepted","fingerprint":"f","acceptance":{},"acceptance_mac":1}',
]


@pytest.mark.parametrize("junk", JUNK, ids=lambda v: repr(v[:40]))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_junk_is_record_lost_with_the_readers_code(reader: str, junk: bytes) -> None:
    read, code = READERS[reader]
    with pytest.raises(RecordLost) as raised:
        read(junk)
    assert raised.value.code == code and raised.value.status == 410


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_fields = st.sampled_from(
    ["client", "state", "sealed", "task_id", "owner", "attempts", "v", "fingerprint"]
    + ["acceptance", "acceptance_mac", "token"]
)
_records = st.dictionaries(_fields, _json | st.sampled_from(["queued", "done", "accepted", 1]))
_raw = st.binary(max_size=64) | _json.map(json.dumps).map(str.encode)
_raw |= _records.map(json.dumps).map(str.encode)


@given(raw=_raw, reader=st.sampled_from(sorted(READERS)))
def test_any_stored_value_is_a_record_or_record_lost(raw: bytes, reader: str) -> None:
    read, code = READERS[reader]
    try:
        read(raw)
    except RecordLost as exc:
        assert exc.code == code


def test_what_the_store_writes_still_reads() -> None:
    store = UnsafeMemoryResultStore()
    store.mark("k", "alice", "queued", "t-1")
    assert store.state("k") == "queued" and store.revoke("k", "alice") == "queued"
    assert store.get("k") is not None and store.get("k").state == "revoked"  # type: ignore[union-attr]
    store.put("k2", "alice", "sealed")
    assert store.get("k2").sealed == "sealed"  # type: ignore[union-attr]
    assert store.claim("n", 60, "me") is None and store.claim("n", 60, "x") == Claim(
        "running", "me", 1
    )


@pytest.mark.parametrize("junk", [b"junk", b"[]", b'{"client":"alice","state":"lost"}'])
def test_the_worker_overwrites_a_junk_pending_record_and_runs_the_job(
    junk: bytes, world: World
) -> None:
    message = world.submit([1])
    world.store._set(keys.pending(message.result_key), junk, None)
    with pytest.raises(RecordLost):
        world.store.get(message.result_key)
    assert execute(world.rt, message) == "ok"
    stored = world.store.get(message.result_key)
    assert stored is not None and stored.state == "done"


@pytest.mark.parametrize("junk", [b"junk", b"[]", b'{"state":"running","attempts":"x"}'])
def test_a_junk_claim_ends_the_job_as_failed_not_as_a_crash(junk: bytes, world: World) -> None:
    message = world.submit([1])
    world.store._set(keys.claim(message.nonce), junk, None)
    assert execute(world.rt, message) == "internal_error"
    assert world.sandboxes.calls == []
    finished = [e for e in world.audit.events if e.get("reason") == "record_lost"]
    assert finished and finished[-1]["status"] == "internal_error"


@pytest.fixture
def world() -> World:
    return World()
