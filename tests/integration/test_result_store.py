"""The store's lifecycle primitives on real Redis, as the ACL users that use them: claims (first
delivery, duplicate, dead owner taken over once), revocation racing the worker's start, and the
workflow record."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from appliance._stack import RedisHandle
from appliance.results import new_result_key
from appliance.store import Claim, RedisResultStore

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _clean(redis_server: RedisHandle) -> Iterator[None]:
    """Leave the session's Redis holding broker keys only, as other tests expect."""
    yield
    admin = redis_server.client("admin")
    ours = [k for k in admin.scan_iter(count=1000) if not k.startswith(b"celery:")]
    if ours:
        admin.delete(*ours)


@pytest.fixture
def worker(redis_server: RedisHandle) -> RedisResultStore:
    return RedisResultStore(redis_server.client("worker"))


@pytest.fixture
def api(redis_server: RedisHandle) -> RedisResultStore:
    return RedisResultStore(redis_server.client("api"))


def _nonce() -> str:
    return f"n{time.time_ns()}"


def test_first_delivery_claims_then_a_duplicate_sees_the_owner(worker: RedisResultStore) -> None:
    nonce = _nonce()
    assert worker.claim(nonce, 60, "host:1") is None
    assert worker.claim(nonce, 60, "host:2") == Claim("running", "host:1", 1)
    worker.finish_claim(nonce, 60)
    assert worker.claim(nonce, 60, "host:3") == Claim("done", "", 0)


def test_a_dead_owner_is_taken_over_exactly_once(worker: RedisResultStore) -> None:
    nonce = _nonce()
    worker.claim(nonce, 60, "dead:1")
    seen = worker.claim(nonce, 60, "a:2")
    assert seen is not None
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        wins.append(worker.take_over(nonce, 60, f"w:{i}", seen))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    after = worker.claim(nonce, 60, "late:9")
    assert after is not None and after.attempts == 2 and after.owner.startswith("w:")


def test_liveness_comes_from_the_heartbeat(worker: RedisResultStore) -> None:
    now = time.time()
    worker.beat("alive:1", now)
    worker.beat("stale:2", now - 60)
    assert worker.worker_alive("alive:1", 15, now)
    assert not worker.worker_alive("stale:2", 15, now)
    assert not worker.worker_alive("never:3", 15, now)


def test_revoke_wins_or_loses_against_start_never_both(
    api: RedisResultStore, worker: RedisResultStore
) -> None:
    for _ in range(30):
        key = new_result_key("f", int(time.time() * 1000))
        api.mark(key, "alice", "queued", "t")
        results: dict[str, object] = {}
        barrier = threading.Barrier(2)

        def revoke(key: str = key) -> None:
            barrier.wait()
            results["revoke"] = api.revoke(key, "alice")

        def start(key: str = key) -> None:
            barrier.wait()
            results["start"] = worker.start(key, "alice", "t")

        threads = [threading.Thread(target=revoke), threading.Thread(target=start)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        revoked = results["revoke"] == "queued"
        assert revoked != results["start"], results  # exactly one of them took effect
        assert worker.state(key) == ("revoked" if revoked else "running")


def test_concurrent_revocations_of_one_job_all_see_it_revoked(api: RedisResultStore) -> None:
    # A revocation that loses the WATCH race to another one must not report "running" (a 409
    # for a job that never ran); exactly one call does the revoking.
    for _ in range(30):
        key = new_result_key("f", int(time.time() * 1000))
        api.mark(key, "alice", "queued", "t")
        barrier = threading.Barrier(4)
        answers: list[str | None] = []

        def revoke(key: str = key) -> None:
            barrier.wait()
            answers.append(api.revoke(key, "alice"))

        threads = [threading.Thread(target=revoke) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers, key=str) == ["queued", "revoked", "revoked", "revoked"], answers
        assert api.state(key) == "revoked"


def test_revoke_is_for_the_owner_and_queued_jobs_only(api: RedisResultStore) -> None:
    key = new_result_key("f", int(time.time() * 1000))
    assert api.revoke(key, "alice") is None  # unknown
    api.mark(key, "alice", "queued", "t")
    assert api.revoke(key, "mallory") is None  # not hers: looks unknown
    assert api.state(key) == "queued"
    api.mark(key, "alice", "running", "t")
    assert api.revoke(key, "alice") == "running"
    assert api.state(key) == "running"


def test_workflow_record_stages_and_drops(api: RedisResultStore, worker: RedisResultStore) -> None:
    wid = f"wf-{time.time_ns()}"
    api.save_workflow(wid, {1: '{"m": 1}', 2: '{"m": 2}'}, 60)
    assert worker.workflow_messages(wid) == {"1": '{"m": 1}', "2": '{"m": 2}'}
    key = new_result_key("f", int(time.time() * 1000))
    worker.put_and_stage(key, "alice", "sealed", wid, 1, '{"m": 1, "carry": "c"}')
    assert worker.workflow_messages(wid)["ready:1"] == '{"m": 1, "carry": "c"}'
    assert worker.has_result(key)
    worker.unstage(wid, 1)
    assert worker.workflow_messages(wid) == {"2": '{"m": 2}'}
    other = new_result_key("g", int(time.time() * 1000))
    worker.put_many({other: "sealed2"}, "alice", wid)
    assert worker.workflow_messages(wid) == {}
    assert json.loads(worker.redis.get(f"result:{other}"))["sealed"] == "sealed2"


def test_flower_cannot_touch_workflow_records(redis_server: RedisHandle) -> None:
    flower = redis_server.client("flower")
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.hgetall("workflow:anything")
