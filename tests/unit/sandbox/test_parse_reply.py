"""parse_reply: the child's reply is untrusted JSON (depth, NaN, wrong shapes)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox._outcome import STATUSES
from sandbox._supervisor import MAX_VALUE_DEPTH, _check_depth, parse_reply


def _reply(**fields):
    body = {"status": "ok", "value": 1, "stdout": "", "error": None}
    body.update(fields)
    return json.dumps(body).encode()


def test_well_formed_replies_parse():
    assert parse_reply(_reply(value={"a": [1, 2.5, None]}))["value"] == {"a": [1, 2.5, None]}
    err = {"type": "ValueError", "message": "x"}
    assert parse_reply(_reply(status="runtime_error", value=None, error=err))["error"] == err


@pytest.mark.parametrize(
    "untrusted",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"status": "ok", "value": NaN, "stdout": "", "error": null}',
        b'{"status": "ok", "value": Infinity, "stdout": "", "error": null}',
        b'{"status": "ok", "value": -Infinity, "stdout": "", "error": null}',
        b'{"status": "ok", "value": 1e999, "stdout": "", "error": null}',
        b'{"status": "ok", "value": [-1e400], "stdout": "", "error": null}',
        b'{"status": "ok", "value": ' + b"9" * 5000 + b', "stdout": "", "error": null}',
        b'{"status": "ok", "value": ' + b"[" * 50000 + b"]" * 50000 + b', "stdout": "", '
        b'"error": null}',
        _reply(status="escaped"),
        _reply(stdout=None),
        _reply(stdout=["x"]),
        _reply(error={"type": "x", "message": "y"}),  # ok with an error
        _reply(status="denied", value=None, error=None),
        _reply(status="denied", value=None, error={"type": "x"}),
        _reply(status="denied", value=None, error={"type": "x", "message": 1}),
        _reply(status="denied", value=None, error={"type": "x", "message": "y", "z": "w"}),
        _reply(degraded=[]),  # an extra key: the parent alone decides what is degraded
        json.dumps({"status": "ok", "value": 1, "stdout": ""}).encode(),
    ],
)
def test_malformed_replies_are_rejected(untrusted):
    assert parse_reply(untrusted) is None


def test_depth_check_bounds_returned_values():
    value: list = []
    for _ in range(MAX_VALUE_DEPTH - 1):
        value = [value]
    assert _check_depth(value)
    assert not _check_depth([value])
    assert not _check_depth({"a": [value]})


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(untrusted):
    reply = parse_reply(untrusted)
    assert reply is None or reply["status"] in STATUSES


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20,
))
def test_arbitrary_json_gives_none_or_a_contract_shaped_reply(document):
    reply = parse_reply(json.dumps(document).encode())
    if reply is not None:
        assert set(reply) == {"status", "value", "stdout", "error"}
        assert reply["status"] in STATUSES and isinstance(reply["stdout"], str)
        json.dumps(reply, allow_nan=False)
