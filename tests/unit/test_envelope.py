"""Envelopes: opaque, versioned, bound to their additional data."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.envelope import Envelope, open_envelope, seal
from appliance.errors import SealBroken
from appliance.jobs import JobMessage, MessageRejected
from appliance.results import check_result_key, new_result_key

KEY = os.urandom(32)


def test_round_trip_and_binding() -> None:
    env = seal(KEY, "vault:v1:wrapped", b"secret result", b"result|k|alice")
    back = Envelope.from_json(env.to_json())
    assert open_envelope(KEY, back, b"result|k|alice") == b"secret result"
    with pytest.raises(SealBroken):
        open_envelope(KEY, back, b"result|k|bob")
    with pytest.raises(SealBroken):
        open_envelope(os.urandom(32), back, b"result|k|alice")
    assert b"secret result" not in env.to_json().encode()


@given(st.text(max_size=300))
def test_malformed_envelopes_raise_seal_broken(text: str) -> None:
    try:
        Envelope.from_json(text)
    except SealBroken:
        pass


def test_result_keys_have_the_contract_shape() -> None:
    key = new_result_key("my_func", 1_795_314_965_485)
    assert check_result_key(key) == key
    name, ms, rand = key.rsplit("_", 2)
    assert name == "my_func" and ms == "1795314965485" and len(rand) == 32
    assert new_result_key("f", 1) != new_result_key("f", 1)


@given(st.one_of(st.none(), st.integers(), st.text(), st.dictionaries(st.text(), st.text())))
def test_job_messages_from_the_broker_are_validated(untrusted: object) -> None:
    with pytest.raises(MessageRejected):
        JobMessage.from_wire(untrusted)
