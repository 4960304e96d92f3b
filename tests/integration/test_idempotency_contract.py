"""`RedisIdempotency` on a real Redis, as the API's ACL user, held to the same contract as the
in-memory stub (tests/unit/store/idempotency_contract.py), and Redis's own expiry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance._stack import RedisHandle
from appliance.store import RedisIdempotency, Reservation, keys
from tests.unit.store.idempotency_contract import ACCEPTED, TTL, IdempotencyContract, Stored

pytestmark = pytest.mark.integration


class TestRedisIdempotency(IdempotencyContract):
    @pytest.fixture
    def records(self, redis_server: RedisHandle) -> Iterator[RedisIdempotency]:
        yield RedisIdempotency(redis_server.client("api"))
        admin = redis_server.client("admin")
        ours = list(admin.scan_iter(match=keys.IDEMPOTENCY + "*", count=1000))
        if ours:
            admin.delete(*ours)

    @pytest.fixture
    def stored(self, redis_server: RedisHandle) -> Stored:
        admin = redis_server.client("admin")
        return lambda: {
            k.decode(): (admin.get(k) or b"").decode()
            for k in admin.scan_iter(match=keys.IDEMPOTENCY + "*", count=1000)
        }


def test_the_record_expires_with_its_ttl_from_the_acceptance(redis_server: RedisHandle) -> None:
    records = RedisIdempotency(redis_server.client("api"))
    first = Reservation("alice", "ttl-check", "vault:v1:fp")
    records.reserve(first, 5)
    admin = redis_server.client("admin")
    assert 0 < admin.ttl(first.name) <= 5
    records.accept(first, ACCEPTED, TTL)
    assert TTL - 5 <= admin.ttl(first.name) <= TTL
    admin.delete(first.name)


def test_only_the_api_may_touch_the_records(redis_server: RedisHandle) -> None:
    import redis

    worker = RedisIdempotency(redis_server.client("worker"))
    with pytest.raises(Exception) as caught:
        worker.reserve(Reservation("alice", "acl-check", "vault:v1:fp"), TTL)
    assert isinstance(caught.value.__cause__, redis.exceptions.NoPermissionError)
