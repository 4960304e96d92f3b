"""The child's reply (`sandbox._reply`): three capped parts, untrusted until parsed."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox._outcome import STATUSES
from sandbox._reply import (
    MAX_VALUE_CONTAINERS,
    MAX_VALUE_DEPTH,
    ReplyTooLarge,
    check_depth,
    decode,
    encode,
    split,
)

CAP = 1024 * 1024


def _frames(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _header(status: str = "ok", error: object = None) -> bytes:
    return json.dumps({"status": status, "error": error}).encode()


def test_well_formed_replies_decode():
    reply = decode(encode("ok", None, json.dumps({"a": [1, 2.5, None]}), "hi\n"), CAP)
    assert reply == {
        "status": "ok",
        "value": {"a": [1, 2.5, None]},
        "stdout": "hi\n",
        "error": None,
    }
    err = {"type": "ValueError", "message": "x"}
    assert decode(encode("runtime_error", err, "", ""), CAP)["error"] == err


def test_stdout_travels_unescaped_with_lone_surrogates():
    text = "\x01\ud800é" * 3
    assert decode(encode("ok", None, "1", text), CAP)["stdout"] == text


@pytest.mark.parametrize(
    "untrusted",
    [
        b"",
        b"not frames",
        _frames(_header()),  # one part only
        _frames(_header(), b"1", b"", b""),  # a fourth part
        _frames(_header(), b"1", b"") + b"x",  # trailing bytes
        _frames(_header(), b"1", b"")[:-1],
        _frames(b"[]", b"1", b""),
        _frames(b"\xff\xfe", b"1", b""),
        _frames(_header(), b"NaN", b""),
        _frames(_header(), b"Infinity", b""),
        _frames(_header(), b"1e999", b""),
        _frames(_header(), b"[-1e400]", b""),
        _frames(_header(), b"", b""),  # ok without a value
        _frames(_header(), b"1", b"\xff"),  # stdout not UTF-8
        _frames(_header("escaped"), b"1", b""),
        _frames(_header("ok", {"type": "x", "message": "y"}), b"1", b""),  # ok with an error
        _frames(_header("denied"), b"", b""),  # an error status without an error
        _frames(_header("denied", {"type": "x"}), b"", b""),
        _frames(_header("denied", {"type": "x", "message": 1}), b"", b""),
        _frames(_header("denied", {"type": "x", "message": "y", "z": "w"}), b"", b""),
        _frames(_header("denied", {"type": "x", "message": "y"}), b"1", b""),  # value on error
        _frames(
            json.dumps({"status": "ok", "error": None, "degraded": []}).encode(), b"1", b""
        ),  # an extra key: the parent alone decides what is degraded
        _frames(b"{" * 50000 + b"}" * 50000, b"1", b""),
        _frames(_header(), b"[" * 50000 + b"]" * 50000, b""),
    ],
)
def test_malformed_replies_are_rejected(untrusted):
    assert decode(untrusted, CAP) is None


@pytest.mark.parametrize(
    "untrusted",
    [
        _frames(_header(), b'"' + b"x" * CAP + b'"', b""),
        _frames(_header(), b"1", b"y" * (CAP + 1)),
        _frames(_header(), b"[" + b"[]," * MAX_VALUE_CONTAINERS + b"[]]", b""),
    ],
)
def test_parts_over_their_caps_are_refused_before_parsing(untrusted):
    with pytest.raises(ReplyTooLarge):
        decode(untrusted, 4 * CAP if len(untrusted) > 2 * CAP else CAP)


def test_the_container_count_is_bounded_for_values_within_the_byte_cap():
    value = b"[" + b"[]," * (MAX_VALUE_CONTAINERS // 2) + b"[]]"
    assert len(decode(_frames(_header(), value, b""), 8 * CAP)["value"]) > 1
    with pytest.raises(ReplyTooLarge):
        decode(_frames(_header(), value * 3, b""), 8 * CAP)


def test_depth_check_bounds_returned_values():
    value: list = []
    for _ in range(MAX_VALUE_DEPTH - 1):
        value = [value]
    assert check_depth(value)
    assert not check_depth([value])
    assert not check_depth({"a": [value]})


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(untrusted):
    try:
        reply = decode(untrusted, 100)
    except ReplyTooLarge:
        return
    assert reply is None or reply["status"] in STATUSES


@given(st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40))
def test_arbitrary_parts_never_raise(header, value, stdout):
    assert split(_frames(header, value, stdout)) == (header, value, stdout)
    try:
        reply = decode(_frames(header, value, stdout), 100)
    except ReplyTooLarge:
        return
    if reply is not None:
        assert set(reply) == {"status", "value", "stdout", "error"}
        assert reply["status"] in STATUSES and type(reply["stdout"]) is str
        json.dumps(reply, allow_nan=False)
