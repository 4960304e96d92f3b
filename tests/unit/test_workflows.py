"""The workflow chain (issue 12, finding 3) over the worker's stubs: the record in the store is
only a courier; a step's value goes only to the message its signed job names, and the end of a
workflow writes only the result keys its signed job names."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

import sandbox
from appliance.jobs import JobMessage, MessageRejected, open_job
from appliance.registry import Client
from appliance.specs import WorkflowPlace
from appliance.worker import execute
from appliance.workflows import verify_next

from .worker.test_execute import ALICE, World, _spec

MALLORY = Client("mallory", "", allowed_functions=("*",))


@pytest.fixture
def world() -> World:
    return World()


def _workflow(world: World, client: Client = ALICE, steps: int = 2) -> dict[str, Any]:
    specs = [_spec([1])] + [_spec() for _ in range(steps - 1)]
    accepted = world.api.enqueue_workflow(client, specs)
    accepted["first"] = world.published.pop()
    return accepted


def _record(world: World, accepted: dict[str, Any]) -> dict[str, str]:
    return world.store.workflow_messages(accepted["workflow_id"])


def _plant(world: World, accepted: dict[str, Any], fields: dict[int, str]) -> None:
    world.store.save_workflow(accepted["workflow_id"], fields, 60)


def _refusals(world: World) -> list[dict[str, Any]]:
    return [e for e in world.audit.of_type("task.rejected") if e["code"] == "bad_workflow"]


def _assert_refused_after_first(world: World, accepted: dict[str, Any]) -> None:
    keys = [s["result_key"] for s in accepted["steps"]]
    assert world.published == []
    assert world.result(keys[0])["status"] == "succeeded"
    assert {world.result(k)["error"]["code"] for k in keys[1:]} == {"bad_workflow"}
    [refusal] = _refusals(world)
    assert refusal["workflow_id"] == accepted["workflow_id"] and refusal["step"] == 1
    assert refusal["task_id"] == accepted["steps"][1]["task_id"]
    assert _record(world, accepted) == {}
    ended = {e["task_id"]: e["status"] for e in world.audit.of_type("execution.finished")}
    assert all(ended[s["task_id"]] == "bad_workflow" for s in accepted["steps"][1:])


def test_another_clients_message_in_the_record_gets_no_value(world: World) -> None:
    victim = _workflow(world)
    mallory = _workflow(world, MALLORY)
    _plant(world, victim, {1: _record(world, mallory)["1"]})
    assert execute(world.rt, victim["first"]) == "ok"
    _assert_refused_after_first(world, victim)


def test_reordered_steps_are_refused(world: World) -> None:
    accepted = _workflow(world, steps=3)
    record = _record(world, accepted)
    _plant(world, accepted, {1: record["2"], 2: record["1"]})
    assert execute(world.rt, accepted["first"]) == "ok"
    _assert_refused_after_first(world, accepted)


def test_a_step_of_another_workflow_of_the_same_client_is_refused(world: World) -> None:
    accepted = _workflow(world)
    other = _workflow(world)
    _plant(world, accepted, {1: _record(world, other)["1"]})
    assert execute(world.rt, accepted["first"]) == "ok"
    _assert_refused_after_first(world, accepted)


def test_a_missing_next_step_ends_the_workflow(world: World) -> None:
    accepted = _workflow(world, steps=3)
    world.store.unstage(accepted["workflow_id"], 1)  # drops field "1"
    assert execute(world.rt, accepted["first"]) == "ok"
    _assert_refused_after_first(world, accepted)
    assert _refusals(world)[0]["reason"] == "missing"


def test_a_staged_message_that_is_not_the_next_step_is_not_sent(world: World) -> None:
    accepted = _workflow(world)
    other = _workflow(world)
    first = accepted["first"]
    world.store.claim(first.nonce, 60, "dead:1")
    world.store.put_and_stage(
        first.result_key, "alice", "sealed", accepted["workflow_id"], 1, _record(world, other)["1"]
    )
    assert execute(world.rt, first) == "recovered"
    assert world.published == []
    assert world.result(accepted["steps"][1]["result_key"])["error"]["code"] == "bad_workflow"
    assert world.sandboxes.calls == []


def test_the_end_writes_only_the_result_keys_of_the_signed_chain(world: World) -> None:
    world.sandboxes.answer = lambda args: sandbox.Outcome(
        status="runtime_error", error={"type": "ValueError", "message": "no"}
    )
    target = world.submit([41])
    accepted = _workflow(world)
    planted = {**json.loads(_record(world, accepted)["1"]), "result_key": target.result_key}
    _plant(world, accepted, {1: json.dumps(planted), 7: json.dumps(planted)})
    assert execute(world.rt, accepted["first"]) == "runtime_error"
    assert world.store.get(target.result_key).state == "queued"  # type: ignore[union-attr]
    keys = [s["result_key"] for s in accepted["steps"]]
    assert [world.result(k)["status"] for k in keys] == ["failed", "skipped"]


@pytest.mark.parametrize("wire", [None, "", "{", "[]", '{"task_id": 1}'])
def test_verify_next_refuses_what_is_not_a_message(world: World, wire: str | None) -> None:
    place = _first_place(world, _workflow(world)["first"])
    with pytest.raises(MessageRejected, match="bad workflow"):
        verify_next(wire, place)


def test_a_step_sealed_without_a_chain_does_not_advance(world: World) -> None:
    """A job sealed before the chain was bound reads as an empty chain: it is refused."""
    accepted = _workflow(world)
    record = _record(world, accepted)
    place = replace(_first_place(world, accepted["first"]), next_sha256="")
    with pytest.raises(MessageRejected, match="bad workflow"):
        verify_next(record["1"], place)


def test_each_step_names_the_digest_of_the_next_and_every_later_step(world: World) -> None:
    accepted = _workflow(world, steps=3)
    record = _record(world, accepted)
    place = _first_place(world, accepted["first"])
    assert verify_next(record["1"], place).task_id == accepted["steps"][1]["task_id"]
    assert [(s.task_id, s.result_key) for s in place.later] == [
        (s["task_id"], s["result_key"]) for s in accepted["steps"][1:]
    ]


def _first_place(world: World, message: JobMessage) -> WorkflowPlace:
    place = open_job(world.keys, message).workflow  # type: ignore[arg-type]
    assert place is not None
    return place
