"""prepare(): every untrusted field of a run request is checked before anything runs."""

from __future__ import annotations

import math

import pytest

from sandbox import ImportNotAllowed, InvalidRequest, Limits, Policy
from sandbox._request import MAX_SOURCE_BYTES, from_wire, prepare

POLICY = Policy.load()
SOURCE = "def f():\n    return 1\n"


def test_valid_request_round_trips_through_the_wire():
    run = prepare(POLICY, SOURCE, "f", (1, "a"), {"k": [None]}, {"cpu_seconds": 2}, ["math"])
    assert from_wire(POLICY, run.to_wire()) == run
    assert run.args == [1, "a"] and run.limits.cpu_seconds == 2 and run.imports == ("math",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"raw_source": b"def f(): pass"}, "source must be a string"),
        ({"raw_source": "x" * (MAX_SOURCE_BYTES + 1)}, "larger than"),
        ({"entry": "_private"}, "entry must be"),
        ({"entry": "f()"}, "entry must be"),
        ({"entry": "a" * 101}, "entry must be"),
        ({"entry": None}, "entry must be"),
        ({"args": {"a": 1}}, "args must be a JSON list"),
        ({"args": "abc"}, "args must be a JSON list"),
        ({"args": [math.nan]}, "not JSON"),
        ({"args": [math.inf]}, "not JSON"),
        ({"args": [object()]}, "not JSON"),
        ({"args": [{1: "non-string key"}]}, "not a string"),
        ({"args": [b"bytes"]}, "not JSON"),
        ({"kwargs": [("a", 1)]}, "kwargs must be"),
        ({"kwargs": {"_hidden": 1}}, "kwargs must be"),
        ({"kwargs": {"a": {1, 2}}}, "not JSON"),
        ({"limits": [1]}, "limits must be a JSON object"),
        ({"limits": "fast"}, "limits must be a JSON object"),
        ({"limits": {"cpu_seconds": math.nan}}, "positive finite"),
        ({"allow_imports": "math"}, "imports must be a list"),
        ({"allow_imports": [1]}, "imports must be a list"),
        ({"allow_imports": 5}, "imports must be a list"),
    ],
)
def test_bad_fields_are_refused(kwargs, message):
    request = {
        "raw_source": SOURCE,
        "entry": "f",
        "args": [],
        "kwargs": {},
        "limits": {},
        "allow_imports": [],
    }
    request.update(kwargs)
    with pytest.raises(InvalidRequest, match=message):
        prepare(POLICY, **request)


def test_arguments_nested_too_deeply_are_refused():
    deep: list = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="deeper"):
        prepare(POLICY, SOURCE, "f", [deep])


def test_limits_object_is_still_checked_against_the_maxima():
    with pytest.raises(InvalidRequest):
        prepare(POLICY, SOURCE, "f", limits=Limits(cpu_seconds=1000))


def test_imports_the_policy_never_allows_are_named():
    with pytest.raises(ImportNotAllowed, match="subprocess"):
        prepare(POLICY, SOURCE, "f", allow_imports=["math", "subprocess"])


@pytest.mark.parametrize("wire", [[], "x", None, 3])
def test_wire_request_must_be_an_object(wire):
    with pytest.raises(InvalidRequest):
        from_wire(POLICY, wire)
