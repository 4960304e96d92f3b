"""The contract every idempotency store must meet: run against `UnsafeMemoryIdempotency` (unit
tests, tests/unit/store/test_idempotency.py) and against `RedisIdempotency` on a real Redis as
the API's ACL user (tests/integration/test_idempotency_contract.py).

A subclass provides two fixtures: `records` (a fresh `IdempotencyStore`) and `stored` (a
callable returning every key and value the backend holds, as text).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from appliance.store import IdempotencyRecord, IdempotencyStore, Reservation, keys

Stored = Callable[[], dict[str, str]]
TTL = 330
ACCEPTED = {"task_id": "t-1", "result_key": "f_1800000000000_abc", "status": "queued"}


def _reservation(
    client: str = "alice", key: str | None = None, fp: str = "vault:v1:fp"
) -> Reservation:
    return Reservation(client, key or f"retry-{uuid.uuid4().hex}", fp)


class IdempotencyContract:
    """The tests; not collected by itself (its name does not start with `Test`)."""

    def test_the_first_request_with_a_key_reserves_it(self, records: IdempotencyStore) -> None:
        first = _reservation()
        assert records.reserve(first, TTL) is None
        again = Reservation(first.client, first.key, "vault:v1:other")
        assert records.reserve(again, TTL) == IdempotencyRecord("pending", "vault:v1:fp")

    def test_an_accepted_request_is_answered_from_its_record(
        self, records: IdempotencyStore
    ) -> None:
        first = _reservation()
        records.reserve(first, TTL)
        records.accept(first, ACCEPTED, TTL)
        retry = Reservation(first.client, first.key, first.fingerprint)
        assert records.reserve(retry, TTL) == IdempotencyRecord("accepted", "vault:v1:fp", ACCEPTED)

    def test_keys_are_per_client(self, records: IdempotencyStore) -> None:
        alice = _reservation("alice")
        records.reserve(alice, TTL)
        records.accept(alice, ACCEPTED, TTL)
        assert records.reserve(_reservation("bob", alice.key), TTL) is None

    def test_an_abandoned_reservation_frees_the_key(self, records: IdempotencyStore) -> None:
        first = _reservation()
        records.reserve(first, TTL)
        records.abandon(first)
        assert records.reserve(Reservation(first.client, first.key, "vault:v1:fp"), TTL) is None

    def test_only_its_own_pending_reservation_is_abandoned(self, records: IdempotencyStore) -> None:
        first = _reservation()
        records.reserve(first, TTL)
        # Another request with the same key (its own token) cannot drop the first one's claim.
        records.abandon(Reservation(first.client, first.key, first.fingerprint))
        assert records.reserve(_reservation(key=first.key), TTL) is not None
        # Nor is an acceptance ever forgotten by an abandon.
        records.accept(first, ACCEPTED, TTL)
        records.abandon(first)
        got = records.reserve(_reservation(key=first.key), TTL)
        assert got is not None and got.acceptance == ACCEPTED

    def test_the_record_holds_no_key_and_no_request(
        self, records: IdempotencyStore, stored: Stored
    ) -> None:
        secret_key = f"my-retry-{uuid.uuid4().hex}"
        first = _reservation(key=secret_key)
        records.reserve(first, TTL)
        records.accept(first, ACCEPTED, TTL)
        ours = {k: v for k, v in stored().items() if k.startswith(keys.IDEMPOTENCY)}
        assert list(ours) == [first.name]
        assert first.name.startswith(keys.idempotency("alice", ""))
        assert secret_key not in first.name and secret_key not in ours[first.name]
