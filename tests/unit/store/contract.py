"""The contract every result store must meet: run against `UnsafeMemoryResultStore` (unit
tests, tests/unit/store/test_memory.py) and against `RedisResultStore` on a real Redis as the
worker's ACL user (tests/integration/test_result_store_contract.py).

A subclass provides two fixtures: `store` (a fresh `ResultStore`, empty of results, with a TTL
of 300 s) and `stored_keys` (a callable listing every key the backend holds).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from appliance.errors import StorageQuotaExceeded
from appliance.store import Claim, ResultStore, Stored, check_storage_budget, keys

StoredKeys = Callable[[], list[str]]


@dataclass(frozen=True)
class Budget:
    keyid: str
    storage_bytes: int


def _key() -> str:
    return f"f_1700000000000_{uuid.uuid4().hex}"


class ResultStoreContract:
    """The tests; not collected by itself (its name does not start with `Test`)."""

    # ---- pending records and results --------------------------------------------------------

    def test_a_marked_job_is_pending_for_its_client(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "queued", "t1")
        assert store.get(key) == Stored("alice", "queued")
        assert store.state(key) == "queued" and not store.has_result(key)

    def test_a_stored_result_replaces_the_pending_record(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "running", "t1")
        store.put(key, "alice", "sealed-bytes")
        got = store.get(key)
        assert got is not None and (got.client, got.state, got.sealed) == (
            "alice",
            "done",
            "sealed-bytes",
        )
        assert 0 < got.ttl_ms <= 300_000
        assert store.state(key) is None and store.has_result(key)

    def test_delete_forgets_result_and_pending_record(self, store: ResultStore) -> None:
        done, queued = _key(), _key()
        store.put(done, "alice", "s")
        store.mark(queued, "alice", "queued", "t")
        store.delete(done)
        store.delete(queued)
        assert store.get(done) is None and store.get(queued) is None

    def test_an_unknown_key_has_no_record(self, store: ResultStore) -> None:
        key = _key()
        assert store.get(key) is None and store.state(key) is None and not store.has_result(key)

    # ---- revocation racing the start ----------------------------------------------------------

    def test_revoking_a_queued_job_then_again(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "queued", "t1")
        assert store.revoke(key, "alice") == "queued"
        assert store.revoke(key, "alice") == "revoked"
        assert store.get(key) == Stored("alice", "revoked")

    def test_a_revoked_job_does_not_start(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "queued", "t1")
        store.revoke(key, "alice")
        assert store.start(key, "alice", "t1") is False
        assert store.state(key) == "revoked"

    def test_a_started_job_is_not_revoked(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "queued", "t1")
        assert store.start(key, "alice", "t1") is True
        assert store.revoke(key, "alice") == "running"
        assert store.state(key) == "running"

    def test_only_the_owner_revokes(self, store: ResultStore) -> None:
        key = _key()
        store.mark(key, "alice", "queued", "t1")
        assert store.revoke(key, "mallory") is None
        assert store.revoke(_key(), "alice") is None
        assert store.state(key) == "queued"

    # ---- claims -------------------------------------------------------------------------------

    def test_first_delivery_claims_then_a_duplicate_sees_the_owner(
        self, store: ResultStore
    ) -> None:
        nonce = uuid.uuid4().hex
        assert store.claim(nonce, 60, "host:1") is None
        assert store.claim(nonce, 60, "host:2") == Claim("running", "host:1", 1)
        store.finish_claim(nonce, 60)
        assert store.claim(nonce, 60, "host:3") == Claim("done", "", 0)

    def test_take_over_counts_an_attempt_and_refuses_a_stale_view(self, store: ResultStore) -> None:
        nonce = uuid.uuid4().hex
        store.claim(nonce, 60, "dead:1")
        seen = store.claim(nonce, 60, "x:2")
        assert seen == Claim("running", "dead:1", 1)
        assert store.take_over(nonce, 60, "me:3", seen) is True
        assert store.take_over(nonce, 60, "other:4", seen) is False  # it changed since
        mine = Claim("running", "me:3", 2)
        assert store.claim(nonce, 60, "late:5") == mine
        assert store.take_over(nonce, 60, "me:3", mine, count=False) is True
        assert store.claim(nonce, 60, "late:5") == mine

    # ---- heartbeats ---------------------------------------------------------------------------

    def test_liveness_comes_from_the_heartbeat(self, store: ResultStore) -> None:
        now = 1_800_000_000.0
        alive, stale = f"alive:{uuid.uuid4().hex}", f"stale:{uuid.uuid4().hex}"
        store.beat(alive, now)
        store.beat(stale, now - 60)
        assert store.worker_alive(alive, 15, now)
        assert not store.worker_alive(stale, 15, now)
        assert not store.worker_alive("never:1", 15, now)
        assert store.live_workers(now - 15) >= 1
        assert store.live_workers(now + 1) == 0
        assert store.ping()

    # ---- workflows ----------------------------------------------------------------------------

    def test_a_workflow_record_stages_and_unstages_steps(self, store: ResultStore) -> None:
        wf = uuid.uuid4().hex
        store.save_workflow(wf, {1: "m1", 2: "m2"}, 60)
        assert store.workflow_messages(wf) == {"1": "m1", "2": "m2"}
        key = _key()
        store.put_and_stage(key, "alice", "sealed0", wf, 1, "m1+carry")
        assert store.workflow_messages(wf) == {"1": "m1", "2": "m2", "ready:1": "m1+carry"}
        assert store.has_result(key)
        store.unstage(wf, 1)
        assert store.workflow_messages(wf) == {"2": "m2"}

    def test_ending_a_workflow_stores_every_result_and_drops_the_record(
        self, store: ResultStore
    ) -> None:
        wf = uuid.uuid4().hex
        store.save_workflow(wf, {1: "m1"}, 60)
        failed, skipped = _key(), _key()
        store.mark(skipped, "alice", "queued", "t2")
        store.put_many({failed: "s-failed", skipped: "s-skipped"}, "alice", wf)
        assert store.workflow_messages(wf) == {}
        got = store.get(skipped)
        assert got is not None and got.sealed == "s-skipped" and store.state(skipped) is None

    def test_an_empty_workflow_writes_nothing(
        self, store: ResultStore, stored_keys: StoredKeys
    ) -> None:
        wf = uuid.uuid4().hex
        store.save_workflow(wf, {}, 60)
        assert keys.workflow(wf) not in stored_keys()

    # ---- per-client stored bytes (issue 12, finding 8) -----------------------------------------

    def test_stored_bytes_count_per_client_until_deleted(self, store: ResultStore) -> None:
        first, second, other, wf = _key(), _key(), _key(), uuid.uuid4().hex
        store.put(first, "alice", "x" * 1000)
        store.put_and_stage(second, "alice", "y" * 2000, wf, 0, "m")
        store.put_many({other: "z" * 500}, "bob")
        alice = sorted(item.size for item in store.storage_use("alice"))
        assert len(alice) == 2 and 1000 < alice[0] < 1100 and 2000 < alice[1] < 2100
        assert all(0 < item.ttl_ms <= 300_000 for item in store.storage_use("alice"))
        assert [item.size > 500 for item in store.storage_use("bob")] == [True]
        store.delete(first)
        assert [item.size > 2000 for item in store.storage_use("alice")] == [True]
        assert store.storage_use("carol") == []

    def test_the_budget_refuses_a_client_over_it_until_its_results_go(
        self, store: ResultStore
    ) -> None:
        key = _key()
        store.put(key, "alice", "x" * 5000)
        check_storage_budget(store, Budget("alice", 10_000))
        with pytest.raises(StorageQuotaExceeded) as refused:
            check_storage_budget(store, Budget("alice", 1000))
        assert refused.value.code == "storage_quota" and refused.value.status == 429
        assert 1 <= refused.value.retry_after <= 300
        check_storage_budget(store, Budget("bob", 1000))  # Another client's bytes are its own.
        store.delete(key)
        check_storage_budget(store, Budget("alice", 1000))

    def test_within_the_budget_by_recorded_bytes_the_use_is_not_read(
        self, store: ResultStore
    ) -> None:
        kept, gone = _key(), _key()
        store.put(kept, "alice", "x" * 5000)
        store.put(gone, "alice", "y" * 5000)
        assert store.storage_over("alice", 20_000) is None
        store.delete(gone)
        # Over by what Redis records (the deleted result too): the live use is read, and it
        # holds the kept result only (the stub, exact, already knows it is within).
        use = store.storage_over("alice", 8000)
        assert use is None or [item.size > 5000 for item in use] == [True]
        check_storage_budget(store, Budget("alice", 8000))
        assert store.storage_over("alice", 8000) is None
        with pytest.raises(StorageQuotaExceeded):
            check_storage_budget(store, Budget("alice", 4000))

    # ---- the keyspace -------------------------------------------------------------------------

    def test_every_key_written_has_a_named_prefix(
        self, store: ResultStore, stored_keys: StoredKeys
    ) -> None:
        key, wf = _key(), uuid.uuid4().hex
        store.mark(key, "alice", "queued", "t")
        store.put(_key(), "alice", "s")
        store.claim(uuid.uuid4().hex, 60, "h:1")
        store.beat("h:1", 1.0)
        store.save_workflow(wf, {1: "m"}, 60)
        written = stored_keys()
        assert written
        assert [k for k in written if keys.prefix_of(k) is None] == []
