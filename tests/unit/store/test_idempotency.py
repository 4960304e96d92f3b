"""`UnsafeMemoryIdempotency` held to the idempotency contract, plus its expiry against an
injected clock (the real store's expiry is Redis's own, checked in the integration suite)."""

from __future__ import annotations

import json

import pytest

from appliance.store import Reservation, UnsafeMemoryIdempotency

from .idempotency_contract import ACCEPTED, TTL, IdempotencyContract, Stored


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory(clock: Clock) -> UnsafeMemoryIdempotency:
    return UnsafeMemoryIdempotency(clock)


class TestMemoryIdempotency(IdempotencyContract):
    @pytest.fixture
    def records(self, memory: UnsafeMemoryIdempotency) -> UnsafeMemoryIdempotency:
        return memory

    @pytest.fixture
    def stored(self, memory: UnsafeMemoryIdempotency) -> Stored:
        return lambda: {k: memory._records[k][0] for k in memory.keys()}


def test_a_record_lives_its_ttl_from_the_acceptance(
    memory: UnsafeMemoryIdempotency, clock: Clock
) -> None:
    first = Reservation("alice", "k1", "vault:v1:fp")
    memory.reserve(first, TTL)
    clock.now += TTL - 1
    memory.accept(first, ACCEPTED, TTL)
    clock.now += TTL - 1
    assert memory.reserve(Reservation("alice", "k1", "vault:v1:fp"), TTL) is not None
    clock.now += 1
    assert memory.keys() == []
    assert memory.reserve(Reservation("alice", "k1", "vault:v1:fp"), TTL) is None


def test_a_record_is_versioned_json() -> None:
    raw = json.loads(Reservation("alice", "k1", "vault:v1:fp").pending())
    assert raw["v"] == 1 and raw["state"] == "pending" and raw["acceptance"] is None
