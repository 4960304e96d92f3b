"""The worker runs only tasks the API enqueued: a message injected straight into Redis by
someone holding broker credentials, a replayed message and an expired one are refused."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from appliance.jobs import JobMessage, seal_job, sign_message
from appliance.queue import TASK_NAME
from appliance.results import new_result_key
from appliance.specs import JobSpec

from .conftest import Stack

pytestmark = pytest.mark.integration

SPEC = {
    "module": "def f():\n    return 7\n",
    "function": "f",
    "args": [],
    "kwargs": {},
    "limits": {},
    "imports": [],
    "secrets": [],
}


def _message(stack: Stack) -> JobMessage:
    task_id = str(uuid.uuid4())
    key = new_result_key("f", int(time.time() * 1000))
    sealed = seal_job(stack.root_transit(), JobSpec.from_json(SPEC), task_id, key, "local")
    return JobMessage(task_id, key, "local", sealed)


def _send(stack: Stack, message: dict[str, Any]) -> None:
    intruder = stack.broker_producer("intruder", task_serializer="json")
    intruder.send_task(TASK_NAME, args=[message], queue="appliance")


def _wait_log(stack: Stack, needle: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in stack.logs():
            return True
        time.sleep(0.1)
    return False


def _result_exists(stack: Stack, key: str, wait: float = 0) -> bool:
    admin = stack.admin_redis()
    deadline = time.monotonic() + wait
    while True:
        if admin.exists(f"result:{key}"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_unsigned_injected_message_is_refused(appliance_stack: Stack) -> None:
    message = _message(appliance_stack)
    forged = replace(
        message, nonce="n" * 32, expires=int(time.time()) + 600, signature="vault:v1:" + "A" * 44
    )
    _send(appliance_stack, forged.to_wire())
    assert _wait_log(appliance_stack, "bad signature")
    assert not _result_exists(appliance_stack, message.result_key, wait=1)


def test_message_with_foreign_fields_is_refused(appliance_stack: Stack) -> None:
    _send(appliance_stack, {"task_id": "x", "module": "import os"})
    assert _wait_log(appliance_stack, ": malformed")


def test_replayed_message_runs_once(appliance_stack: Stack) -> None:
    signed = sign_message(
        appliance_stack.root_transit(), _message(appliance_stack), TASK_NAME, time.time()
    )
    _send(appliance_stack, signed.to_wire())
    assert _result_exists(appliance_stack, signed.result_key, wait=15)
    admin = appliance_stack.admin_redis()
    first = admin.get(f"result:{signed.result_key}")
    _send(appliance_stack, signed.to_wire())
    assert _wait_log(appliance_stack, ": replayed")
    assert admin.get(f"result:{signed.result_key}") == first  # not run again


def test_expired_message_is_refused(appliance_stack: Stack) -> None:
    signed = sign_message(
        appliance_stack.root_transit(), _message(appliance_stack), TASK_NAME, time.time() - 7200
    )
    _send(appliance_stack, signed.to_wire())
    assert _wait_log(appliance_stack, ": expired")
    assert not _result_exists(appliance_stack, signed.result_key, wait=1)


def test_signature_does_not_transfer_to_other_arguments(appliance_stack: Stack) -> None:
    signed = sign_message(
        appliance_stack.root_transit(), _message(appliance_stack), TASK_NAME, time.time()
    )
    other = _message(appliance_stack)
    swapped = replace(signed, sealed_job=other.sealed_job)
    before = appliance_stack.logs().count("bad signature")
    _send(appliance_stack, swapped.to_wire())
    deadline = time.monotonic() + 15
    while appliance_stack.logs().count("bad signature") == before:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not _result_exists(appliance_stack, signed.result_key, wait=1)
