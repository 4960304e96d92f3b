"""The data-key cache (issue 16): each bound of a cached data key (age, messages, bytes, how
many keys), the wipe on eviction, and that a cached open answers only what the key service said
for that key name and context."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.envelope import Envelope
from appliance.errors import SealBroken
from appliance.keyservice import (
    CacheBounds,
    DataKeyCache,
    UnsafeMemoryKeyService,
    keys_generation,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(clock: Clock, **bounds: Any) -> UnsafeMemoryKeyService:
    return UnsafeMemoryKeyService(cache=DataKeyCache(CacheBounds(**bounds), clock))


def wrapped_keys(keys: UnsafeMemoryKeyService, n: int, size: int = 10) -> list[str]:
    return [keys.seal_envelope("jobs", "alice", b"x" * size, b"aad").wrapped_key for _ in range(n)]


def test_a_data_key_seals_until_its_max_age() -> None:
    clock = Clock()
    keys = service(clock, max_age_seconds=60)
    first = wrapped_keys(keys, 3)
    assert len(set(first)) == 1 and keys.calls == 1
    clock.now += 59.9
    assert wrapped_keys(keys, 1) == first[:1]
    clock.now += 0.1
    assert wrapped_keys(keys, 1) != first[:1]
    assert keys.calls == 2


def test_a_data_key_seals_at_most_max_messages() -> None:
    keys = service(Clock(), max_messages=3)
    wrapped = wrapped_keys(keys, 7)
    assert [wrapped.count(w) for w in dict.fromkeys(wrapped)] == [3, 3, 1]
    assert keys.calls == 3


def test_a_data_key_seals_at_most_max_bytes() -> None:
    keys = service(Clock(), max_bytes=100)
    wrapped = wrapped_keys(keys, 5, size=40)  # 40 + 40 fit, a third would be 120
    assert [wrapped.count(w) for w in dict.fromkeys(wrapped)] == [2, 2, 1]


def test_a_message_larger_than_max_bytes_gets_a_key_of_its_own_and_it_is_not_kept() -> None:
    keys = service(Clock(), max_bytes=100)
    a, b = (keys.seal_envelope("jobs", "alice", b"y" * 101, b"") for _ in range(2))
    assert a.wrapped_key != b.wrapped_key
    assert keys.cache is not None and keys.cache.held() == 0


def test_keys_are_per_key_name_and_context() -> None:
    keys = service(Clock())
    seen = {
        keys.seal_envelope(name, client, b"v", b"").wrapped_key
        for name in ("jobs", "results")
        for client in ("alice", "bob")
    }
    assert len(seen) == 4


def test_zero_bounds_turn_caching_off() -> None:
    keys = service(Clock(), max_age_seconds=0)
    assert len(set(wrapped_keys(keys, 3))) == 3
    sealed = keys.seal_envelope("jobs", "alice", b"v", b"aad")
    for _ in range(2):
        assert keys.open_envelope("jobs", "alice", sealed, b"aad") == b"v"
    assert keys.calls == 3 + 1 + 2
    assert keys.cache is not None and keys.cache.held() == 0


def test_eviction_wipes_the_plaintext_key() -> None:
    clock = Clock()
    keys = service(clock, max_messages=1)
    assert keys.cache is not None
    keys.seal_envelope("jobs", "alice", b"v", b"")
    held = next(iter(keys.cache._sealing.values())).key
    before = bytes(held)
    assert before != bytes(32)
    keys.seal_envelope("jobs", "alice", b"v", b"")  # used up: evicted, a new key minted
    assert held == bytearray(32)


def test_the_oldest_key_is_evicted_and_wiped_beyond_max_keys() -> None:
    keys = service(Clock(), max_keys=2)
    assert keys.cache is not None
    keys.seal_envelope("jobs", "c0", b"v", b"")
    first = next(iter(keys.cache._sealing.values())).key
    for client in ("c1", "c2"):
        keys.seal_envelope("jobs", client, b"v", b"")
    assert first == bytearray(32)
    assert [slot[1] for slot in keys.cache._sealing] == ["c1", "c2"]


def test_clear_wipes_every_key() -> None:
    keys = service(Clock())
    assert keys.cache is not None
    sealed = keys.seal_envelope("jobs", "alice", b"v", b"")
    keys.open_envelope("jobs", "alice", sealed, b"")
    held = [e.key for e in keys.cache._sealing.values()]
    held += [e.key for e in keys.cache._opening.values()]
    keys.cache.clear()
    assert len(held) == 2 and all(k == bytearray(32) for k in held)
    assert keys.cache.held() == 0


def test_an_unwrapped_key_opens_until_its_max_age() -> None:
    clock = Clock()
    keys = service(clock, max_age_seconds=60)
    sealed = [keys.seal_envelope("results", "alice", b"%d" % i, b"aad") for i in range(3)]
    calls = keys.calls
    assert [keys.open_envelope("results", "alice", s, b"aad") for s in sealed] == [
        b"0",
        b"1",
        b"2",
    ]
    assert keys.calls == calls + 1  # one unwrap for the three
    clock.now += 60
    keys.open_envelope("results", "alice", sealed[0], b"aad")
    assert keys.calls == calls + 2


def test_a_cached_key_does_not_open_for_another_context_or_binding() -> None:
    keys = service(Clock())
    sealed = keys.seal_envelope("results", "alice", b"secret", b"result|k|alice")
    assert keys.open_envelope("results", "alice", sealed, b"result|k|alice") == b"secret"
    with pytest.raises(SealBroken):
        keys.open_envelope("results", "mallory", sealed, b"result|k|alice")
    with pytest.raises(SealBroken):
        keys.open_envelope("jobs", "alice", sealed, b"result|k|alice")
    with pytest.raises(SealBroken):
        keys.open_envelope("results", "alice", sealed, b"result|other|alice")
    moved = Envelope(sealed.wrapped_key, sealed.nonce, sealed.ciphertext[:-1] + b"\0")
    with pytest.raises(SealBroken):
        keys.open_envelope("results", "alice", moved, b"result|k|alice")


def test_a_refused_unwrap_is_not_cached() -> None:
    keys = service(Clock())
    assert keys.cache is not None
    sealed = keys.seal_envelope("jobs", "alice", b"v", b"")
    with pytest.raises(SealBroken):
        keys.open_envelope("jobs", "mallory", sealed, b"")
    assert not keys.cache._opening


def test_a_new_keys_generation_drops_and_wipes_every_cached_key() -> None:
    keys = service(Clock())
    assert keys.cache is not None
    with keys_generation("g1"):
        sealed = keys.seal_envelope("results", "alice", b"v", b"")
        keys.open_envelope("results", "alice", sealed, b"")
        held = [e.key for e in keys.cache._sealing.values()]
        held += [e.key for e in keys.cache._opening.values()]
    with keys_generation("g2"):  # `appliance keys rotate` renewed the generation
        again = keys.seal_envelope("results", "alice", b"v", b"")
    assert all(k == bytearray(32) for k in held)
    assert again.wrapped_key != sealed.wrapped_key


def test_an_older_generation_seen_before_clears_nothing() -> None:
    keys = service(Clock())
    with keys_generation("g1"):
        keys.seal_envelope("jobs", "alice", b"v", b"")
    with keys_generation("g2"):
        current = keys.seal_envelope("jobs", "alice", b"v", b"").wrapped_key
    with keys_generation("g1"):  # a job queued before the rotation
        assert keys.seal_envelope("jobs", "alice", b"v", b"").wrapped_key == current
    with keys_generation(None):  # no generation known: no check
        assert keys.seal_envelope("jobs", "alice", b"v", b"").wrapped_key == current
