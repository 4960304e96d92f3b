"""Hypothesis: any source, arguments and limits give a well-formed outcome, or a clean refusal.

Never a crash or a hang of the fork server, never a reply that is not the contract's object.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sandbox
from sandbox._outcome import STATUSES

from .conftest import CANARY_VALUE

pytestmark = pytest.mark.timeout(300)

# Fragments that do reach the run time (loops, errors, denials, output, big values), mixed
# with arbitrary text that mostly does not compile.
BODIES = [
    "return x",
    "return [x, x]",
    "return {'k': x}",
    "return str(x) * 3",
    "print(x)\n    return printed",
    "raise ValueError(x)",
    "return getattr(x, '__class__')",
    "import os\n    return 1",
    "while True:\n        pass",
    "return f(x)",
    "return 1 / 0",
    "return float('inf')",
    "return {1, 2}",
    "return 'y' * 100000",
    "x = []\n    while True:\n        x.append('z' * 10000)",
    "while True:\n        print('w' * 100)",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
sources = st.one_of(
    st.sampled_from(BODIES).map(lambda body: f"def f(x=None, *a, **k):\n    {body}\n"),
    st.text(max_size=200),
    st.text(alphabet="def f():\n ()[]{}:=+-*/.'\"_abcxyz0123456789#\\", max_size=120),
)
# Valid limits always carry a short wall clock, so that a loop costs the suite 0.3 s at most.
valid_limits = st.fixed_dictionaries(
    {"wall_seconds": st.floats(0.01, 0.3)},
    optional={
        "cpu_seconds": st.floats(0.01, 1),
        "memory_mb": st.integers(1, 64),
        "output_bytes": st.integers(1, 100_000),
    },
)
invalid_values = st.one_of(
    st.integers(-5, 0),
    st.integers(10**9, 10**12),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
invalid_limits = st.one_of(
    st.dictionaries(
        st.sampled_from(["cpu_seconds", "wall_seconds", "memory_mb", "output_bytes"]),
        invalid_values,
        min_size=1,
        max_size=3,
    ),
    st.builds(lambda key, value: {key: value}, st.text(max_size=12), st.integers(1, 5)),
    st.lists(st.integers(), max_size=2),
    st.text(max_size=5),
)
any_limits = st.one_of(valid_limits, valid_limits, invalid_limits)


def _well_formed(outcome: sandbox.Outcome) -> None:
    body = outcome.to_dict()
    text = json.dumps(body, allow_nan=False)  # raises on NaN/inf anywhere
    assert CANARY_VALUE not in text
    assert body["status"] in STATUSES
    assert isinstance(body["stdout"], str)
    if body["status"] == "ok":
        assert body["error"] is None
    else:
        assert body["value"] is None
        assert set(body["error"]) == {"type", "message"}
    assert all(isinstance(v, int) and v >= 0 for v in body["usage"].values())
    assert not math.isnan(body["usage"]["wall_ms"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=sources,
    entry=st.one_of(st.just("f"), st.just("f"), st.just("f"), st.text(max_size=8)),
    args=st.one_of(st.lists(json_values, max_size=3), json_values),
    limits=any_limits,
)
def test_any_request_gives_an_outcome_or_a_clean_refusal(sb, source, entry, args, limits):
    try:
        outcome = sb.run(source, entry, args if isinstance(args, list) else [args], limits=limits)
    except sandbox.InvalidRequest:
        event("refused")
        return  # refused before anything ran: also well-formed
    event(outcome.status)
    _well_formed(outcome)
    assert sb._proc is not None and sb._proc.poll() is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(st.sampled_from(BODIES), min_size=1, max_size=3),
    args=st.lists(json_values, max_size=2),
    limits=valid_limits,
)
def test_runnable_requests_always_end_in_a_contract_status(sb, body, args, limits):
    source = (
        "def f(x=None, *a, **k):\n    "
        + "\n    ".join(line for chunk in body for line in chunk.split("\n    "))
        + "\n"
    )
    outcome = sb.run(source, "f", args, limits=limits)
    event(outcome.status)
    _well_formed(outcome)
    assert sb._proc is not None and sb._proc.poll() is None


@settings(max_examples=60, deadline=None)
@given(
    args=st.one_of(st.lists(json_values, max_size=3), st.builds(object)),
    kwargs=st.one_of(
        st.dictionaries(st.text(max_size=6), json_values, max_size=3), st.just({"x": math.nan})
    ),
)
def test_arguments_are_json_or_refused(sb, args, kwargs):
    try:
        outcome = sb.run(
            "def f(*a, **k):\n    return [a, k]\n",
            "f",
            args if isinstance(args, list) else [args],
            kwargs,
        )
    except sandbox.InvalidRequest:
        return
    _well_formed(outcome)
    assert outcome.status == "ok"
    assert outcome.value == [list(args), kwargs]
