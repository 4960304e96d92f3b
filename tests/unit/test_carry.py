"""The value carried between workflow steps: sealed to one step of one client, and optional on
the wire only in the one field it may occupy."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.errors import SealBroken
from appliance.jobs import JobMessage, MessageRejected, attach_carry, open_carry


class DerivedTransit:
    """In memory, behind the same protocol as `appliance.vault.Transit`'s data keys: keys are
    derived per context, the wrapped key only opens under the same name and context."""

    def __init__(self) -> None:
        self.root = os.urandom(32)

    def _kek(self, name: str, context: str) -> AESGCM:
        return AESGCM(hashlib.sha256(self.root + f"{name}|{context}".encode()).digest())

    def data_key(self, name: str, context: str) -> tuple[bytes, str]:
        key, nonce = os.urandom(32), os.urandom(12)
        wrapped = nonce + self._kek(name, context).encrypt(nonce, key, None)
        return key, "vault:v1:" + base64.b64encode(wrapped).decode()

    def unwrap_key(self, name: str, wrapped: str, context: str) -> bytes:
        raw = base64.b64decode(wrapped.removeprefix("vault:v1:"))
        try:
            return self._kek(name, context).decrypt(raw[:12], raw[12:], None)
        except Exception as exc:
            raise SealBroken("wrong key or context") from exc


MESSAGE = JobMessage("task-2", "f_1_" + "a" * 32, "alice", "{}", "n" * 32, 2**40, "vault:v1:x")


def test_a_carried_value_opens_only_on_its_own_step() -> None:
    transit = DerivedTransit()
    carried = attach_carry(transit, MESSAGE, {"total": [1, 2, 3]})  # type: ignore[arg-type]
    assert "total" not in carried.carry
    assert open_carry(transit, JobMessage.from_wire(carried.to_wire())) == {"total": [1, 2, 3]}
    for moved in (
        replace(carried, task_id="task-3"),
        replace(carried, result_key="f_1_" + "b" * 32),
        replace(carried, client="mallory"),
    ):
        with pytest.raises(SealBroken):
            open_carry(transit, moved)  # type: ignore[arg-type]


def test_a_later_step_without_a_carry_does_not_open() -> None:
    with pytest.raises(SealBroken):
        open_carry(DerivedTransit(), MESSAGE)  # type: ignore[arg-type]


def test_carry_is_the_only_optional_field_and_must_be_text() -> None:
    wire = MESSAGE.to_wire()
    assert "carry" not in wire and JobMessage.from_wire(wire) == MESSAGE
    assert JobMessage.from_wire({**wire, "carry": "x"}).carry == "x"
    for bad in (
        {**wire, "carry": 1},
        {**wire, "extra": "x"},
        {k: v for k, v in wire.items() if k != "nonce"},
    ):
        with pytest.raises(MessageRejected):
            JobMessage.from_wire(bad)
