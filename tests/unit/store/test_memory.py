"""`UnsafeMemoryResultStore` held to the result-store contract, plus its expiry, which the
stub shows against an injected clock (the real store's expiry is Redis's own)."""

from __future__ import annotations

import pytest

from appliance.store import UnsafeMemoryResultStore, keys

from .contract import ResultStoreContract, StoredKeys


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory(clock: Clock) -> UnsafeMemoryResultStore:
    return UnsafeMemoryResultStore(ttl_seconds=300, clock=clock)


class TestUnsafeMemoryResultStore(ResultStoreContract):
    @pytest.fixture
    def store(self, memory: UnsafeMemoryResultStore) -> UnsafeMemoryResultStore:
        return memory

    @pytest.fixture
    def stored_keys(self, memory: UnsafeMemoryResultStore) -> StoredKeys:
        return memory.keys


def test_a_result_expires_after_its_ttl(memory: UnsafeMemoryResultStore, clock: Clock) -> None:
    memory.put("f_1_" + "0" * 32, "alice", "s")
    clock.now += 299
    got = memory.get("f_1_" + "0" * 32)
    assert got is not None and got.ttl_ms == 1000
    clock.now += 1
    assert memory.get("f_1_" + "0" * 32) is None


def test_a_revocation_keeps_the_pending_ttl(memory: UnsafeMemoryResultStore, clock: Clock) -> None:
    memory.mark("k", "alice", "queued", "t")
    clock.now += 24 * 3600 - 1
    assert memory.revoke("k", "alice") == "queued"
    clock.now += 1
    assert memory.state("k") is None


def test_a_claim_expires_with_its_message(memory: UnsafeMemoryResultStore, clock: Clock) -> None:
    memory.claim("n", 10, "h:1")
    clock.now += 10
    assert memory.claim("n", 10, "h:2") is None
    assert keys.claim("n") in memory.keys()


def test_stored_bytes_are_released_when_the_result_expires(
    memory: UnsafeMemoryResultStore, clock: Clock
) -> None:
    memory.put("f_1_a", "alice", "x" * 100)
    clock.now += 200
    memory.put("f_1_b", "alice", "x" * 100)
    assert len(memory.storage_use("alice")) == 2
    clock.now += 101  # The first has expired, the second has 199 s left.
    (left,) = memory.storage_use("alice")
    assert 198_000 < left.ttl_ms <= 199_000
    clock.now += 200
    assert memory.storage_use("alice") == []
