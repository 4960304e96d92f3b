"""`RedisResultStore` on a real Redis, as the worker's ACL user, held to the same contract as
the in-memory stub (tests/unit/store/contract.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance._stack import RedisHandle
from appliance.store import RedisResultStore
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
