"""The worker's `execute` state machine over stubs (store, key service, audit sink, sandbox,
broker) with an injected clock: claims, duplicates, retries after a dead worker, replays,
revocation before the start, and workflow advancement. No Redis, OpenBao or Celery."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import sandbox
from appliance.api._idempotency import Idempotency
from appliance.api._jobs import Submissions
from appliance.audit import UnsafeMemoryAuditSink
from appliance.jobs import JobMessage, MessageRejected, open_result
from appliance.keyservice import UnsafeMemoryKeyService
from appliance.registry import Client
from appliance.settings import Settings
from appliance.specs import JobSpec
from appliance.store import UnsafeMemoryIdempotency, UnsafeMemoryResultStore
from appliance.worker import InFlight, Runtime, execute, owner

NOW = 1_800_000_000.0
ALICE = Client("alice", "", allowed_functions=("*",))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Sandboxes:
    """Runs nothing: answers each call with `answer(args)` and remembers the arguments."""

    def __init__(self, answer: Callable[[list[Any]], sandbox.Outcome]) -> None:
        self.answer = answer
        self.calls: list[list[Any]] = []

    @contextmanager
    def borrow(self) -> Iterator[Sandboxes]:
        yield self

    def run(self, module: str, function: str, args: list[Any], *_: Any) -> sandbox.Outcome:
        self.calls.append(list(args))
        return self.answer(list(args))


def _ok(args: list[Any]) -> sandbox.Outcome:
    return sandbox.Outcome(status="ok", value=(args[0] if args else 0) + 1)


class World:
    def __init__(self, answer: Callable[[list[Any]], sandbox.Outcome] = _ok) -> None:
        self.clock = Clock()
        self.store = UnsafeMemoryResultStore(clock=self.clock)
        self.keys = UnsafeMemoryKeyService()
        self.audit = UnsafeMemoryAuditSink()
        self.published: list[JobMessage] = []
        self.sandboxes = Sandboxes(answer)
        self.rt = Runtime(
            settings=Settings(max_attempts=3, heartbeat_seconds=5),
            sandboxes=self.sandboxes,  # type: ignore[arg-type]
            transit=self.keys,  # type: ignore[arg-type]
            store=self.store,
            audit=self.audit,
            publish=lambda message, request_id: self.published.append(message),
            clock=self.clock,
        )
        self.api = Submissions(
            self.keys,  # type: ignore[arg-type]
            self.store,
            lambda message, request_id: self.published.append(message),
            self.audit,
            self.clock,
            Idempotency(self.keys, UnsafeMemoryIdempotency(self.clock), 330),  # type: ignore[arg-type]
        )

    def submit(self, args: list[Any] | None = None) -> JobMessage:
        spec = _spec(args)
        self.api.enqueue(ALICE, spec)
        return self.published.pop()

    def result(self, key: str) -> dict[str, Any]:
        stored = self.store.get(key)
        assert stored is not None and stored.sealed is not None, stored
        return open_result(self.keys, stored.sealed, key, "alice").to_json()


def _spec(args: list[Any] | None = None) -> JobSpec:
    return JobSpec("def f(x=0):\n    return x + 1\n", "f", args=args or [])


@pytest.fixture
def world() -> World:
    return World()


def test_a_job_runs_once_and_a_replay_is_refused(world: World) -> None:
    message = world.submit([41])
    assert execute(world.rt, message) == "ok"
    assert world.result(message.result_key)["result"] == 42
    with pytest.raises(MessageRejected, match="replayed"):
        execute(world.rt, message)
    assert len(world.sandboxes.calls) == 1


def test_a_duplicate_of_a_job_running_on_a_live_worker_waits(world: World) -> None:
    message = world.submit()
    world.store.claim(message.nonce, 60, "elsewhere:1")
    world.store.beat("elsewhere:1", NOW)
    with pytest.raises(InFlight):
        execute(world.rt, message)
    assert world.sandboxes.calls == []


def test_a_job_whose_worker_died_runs_again_and_counts_an_attempt(world: World) -> None:
    message = world.submit()
    world.store.claim(message.nonce, 60, "dead:1")
    world.store.beat("dead:1", NOW - 60)
    assert execute(world.rt, message) == "ok"
    assert len(world.sandboxes.calls) == 1


def test_after_max_attempts_the_job_ends_as_worker_lost(world: World) -> None:
    message = world.submit()
    world.store.claim(message.nonce, 60, "dead:1")
    seen = world.store.claim(message.nonce, 60, "x")
    assert seen is not None
    for i in range(2):
        assert world.store.take_over(message.nonce, 60, f"dead:{i + 2}", seen)
        seen = world.store.claim(message.nonce, 60, "x")
        assert seen is not None
    assert seen.attempts == 3
    assert execute(world.rt, message) == "worker_lost"
    assert world.result(message.result_key)["error"]["code"] == "worker_lost"
    assert world.sandboxes.calls == []


def test_a_dead_worker_that_stored_its_result_is_finished_without_running(world: World) -> None:
    message = world.submit()
    world.store.claim(message.nonce, 60, "dead:1")
    world.store.put(message.result_key, "alice", "sealed-by-the-dead-worker")
    assert execute(world.rt, message) == "recovered"
    assert world.sandboxes.calls == []
    with pytest.raises(MessageRejected, match="replayed"):
        execute(world.rt, message)


def test_our_own_retry_runs_without_counting_an_attempt(world: World) -> None:
    message = world.submit()
    world.store.claim(message.nonce, 60, owner())
    assert execute(world.rt, message) == "ok"


def test_a_job_revoked_before_it_started_does_not_run(world: World) -> None:
    message = world.submit()
    assert world.store.revoke(message.result_key, "alice") == "queued"
    assert execute(world.rt, message) == "revoked"
    assert world.sandboxes.calls == []
    assert world.result(message.result_key)["status"] == "failed"


def test_an_expired_or_forged_message_is_refused(world: World) -> None:
    message = world.submit()
    forged = JobMessage.from_wire({**message.to_wire(), "client": "mallory"})
    with pytest.raises(MessageRejected, match="bad signature"):
        execute(world.rt, forged)
    world.clock.now = message.expires + 1
    with pytest.raises(MessageRejected, match="expired"):
        execute(world.rt, message)
    assert world.sandboxes.calls == []


def _workflow(world: World, steps: int) -> tuple[list[str], JobMessage]:
    accepted = world.api.enqueue_workflow(ALICE, [_spec([1])] + [_spec() for _ in range(steps - 1)])
    return [s["result_key"] for s in accepted["steps"]], world.published.pop()


def test_a_workflow_advances_carrying_each_value(world: World) -> None:
    keys, first = _workflow(world, 3)
    assert execute(world.rt, first) == "ok"
    second = world.published.pop()
    assert second.result_key == keys[1] and second.carry
    assert execute(world.rt, second) == "ok"
    third = world.published.pop()
    assert execute(world.rt, third) == "ok"
    assert world.sandboxes.calls == [[1], [2], [3]]  # the carried value comes first
    assert [world.result(k)["result"] for k in keys] == [2, 3, 4]
    assert world.published == []


def test_a_failed_step_skips_the_rest_and_drops_the_record(world: World) -> None:
    world.sandboxes.answer = lambda args: sandbox.Outcome(
        status="runtime_error", error={"type": "ValueError", "message": "no"}
    )
    keys, first = _workflow(world, 3)
    workflow_id = world.audit.of_type("submission.accepted")[0]["workflow_id"]
    assert execute(world.rt, first) == "runtime_error"
    assert world.published == []
    assert [world.result(k)["status"] for k in keys] == ["failed", "skipped", "skipped"]
    assert world.result(keys[2])["error"]["failed_result_key"] == keys[0]
    assert world.store.workflow_messages(workflow_id) == {}


def test_a_staged_step_left_by_a_dead_worker_is_sent(world: World) -> None:
    keys, first = _workflow(world, 2)
    workflow_id = world.audit.of_type("submission.accepted")[0]["workflow_id"]
    step_one = world.store.workflow_messages(workflow_id)["1"]
    # A worker ran step 0, stored its result and staged step 1, then died before sending it.
    world.store.claim(first.nonce, 60, "dead:1")
    world.store.put_and_stage(first.result_key, "alice", "sealed", workflow_id, 1, step_one)
    assert execute(world.rt, first) == "recovered"
    assert [m.result_key for m in world.published] == [keys[1]]
    assert world.store.workflow_messages(workflow_id) == {}
    assert world.sandboxes.calls == []
