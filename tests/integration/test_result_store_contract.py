"""`RedisResultStore` on a real Redis, as the worker's ACL user, held to the same contract as
the in-memory stub (tests/unit/store/contract.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from appliance._stack import RedisHandle
from appliance.store import RedisResultStore
from appliance.store import keys as keys_module
from tests.unit.store.contract import ResultStoreContract, StoredKeys

pytestmark = pytest.mark.integration


class TestRedisResultStore(ResultStoreContract):
    @pytest.fixture
    def store(self, redis_server: RedisHandle) -> Iterator[RedisResultStore]:
        yield RedisResultStore(redis_server.client("worker"), ttl_seconds=300)
        # Leave the session's Redis holding broker keys only, as other tests expect.
        admin = redis_server.client("admin")
        ours = [k for k in admin.scan_iter(count=1000) if not k.startswith(b"celery:")]
        if ours:
            admin.delete(*ours)

    @pytest.fixture
    def stored_keys(self, redis_server: RedisHandle) -> StoredKeys:
        admin = redis_server.client("admin")
        return lambda: [k.decode() for k in admin.scan_iter(count=1000)]


def test_the_stored_bytes_hash_is_swept_while_within_the_budget(redis_server: RedisHandle) -> None:
    """Gone results are dropped from `storage:<keyid>` even when no submission is ever over its
    budget (`storage_over` skips the per-result PTTLs then, issue 16), so the hash stays
    bounded: at most twice what was live at the last sweep, plus a slack."""
    store = RedisResultStore(redis_server.client("worker"), ttl_seconds=300)
    admin = redis_server.client("admin")
    client = f"sweep-{uuid.uuid4().hex[:8]}"
    try:
        for round_ in range(5):
            keys = [f"f_1700000000000_{uuid.uuid4().hex}" for _ in range(40)]
            for key in keys:
                store.put(key, client, "x" * 100)
                use = store.storage_over(client, 10**9)  # the live use when it sweeps
                assert use is None or [item.size for item in use] == [142]
                store.delete(key)  # fetched and deleted, as a tidy client does
            assert admin.hlen(keys_module.storage(client)) <= 2 * 1 + 32, round_
    finally:
        admin.delete(keys_module.storage(client))
