"""Limits: validation of untrusted JSON, direct construction, and the policy's maxima."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox import InvalidRequest, LimitNotAllowed, Limits, Policy


def test_defaults_fill_gaps():
    limits = Limits.from_mapping({"cpu_seconds": 2}, defaults=Limits(wall_seconds=7))
    assert limits == Limits(cpu_seconds=2, wall_seconds=7)


def test_whole_number_floats_are_accepted_for_integer_limits():
    assert Limits.from_mapping({"memory_mb": 64.0}).memory_mb == 64
    assert isinstance(Limits.from_mapping({"memory_mb": 64.0}).memory_mb, int)


@pytest.mark.parametrize(
    "raw",
    [
        {"cpu_seconds": 0},
        {"cpu_seconds": -1},
        {"wall_seconds": math.nan},
        {"wall_seconds": math.inf},
        {"memory_mb": True},
        {"memory_mb": 1.5},
        {"output_bytes": "10"},
        {"output_bytes": None},
        {"output_bytes": [1]},
        {"bogus": 1},
    ],
)
def test_bad_values_are_refused(raw):
    with pytest.raises(InvalidRequest):
        Limits.from_mapping(raw)


@pytest.mark.parametrize("raw", [[], "cpu_seconds=1", None, 3])
def test_limits_must_be_an_object(raw):
    with pytest.raises(InvalidRequest, match="JSON object"):
        Limits.from_mapping(raw)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_seconds": -1},
        {"memory_mb": 0},
        {"memory_mb": 1.5},
        {"output_bytes": False},
        {"wall_seconds": math.inf},
    ],
)
def test_direct_construction_validates_too(kwargs):
    with pytest.raises(InvalidRequest):
        Limits(**kwargs)


def test_check_within_names_the_limit():
    with pytest.raises(LimitNotAllowed, match="memory_mb=2048"):
        Limits(memory_mb=2048).check_within(Limits(memory_mb=1024))
    Limits(memory_mb=1024).check_within(Limits(memory_mb=1024))


def test_to_dict_round_trips():
    limits = Limits(cpu_seconds=1.5, wall_seconds=3, memory_mb=64, output_bytes=10)
    assert Limits.from_mapping(limits.to_dict()) == limits


@given(
    st.dictionaries(
        st.text(max_size=15),
        st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=3)),
        max_size=5,
    )
)
def test_any_json_object_gives_limits_or_invalid_request(raw):
    try:
        limits = Limits.from_mapping(raw)
    except InvalidRequest:
        return
    for value in limits.to_dict().values():
        assert math.isfinite(value) and value > 0


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**18])
def test_integers_too_large_for_a_float_are_numbers_not_errors(value):
    # Issue 12, finding 13: math.isfinite(10**400) raised OverflowError, a 500 in the API.
    policy = Policy.load()
    with pytest.raises(InvalidRequest):
        policy.limits({"cpu_seconds": value})


@given(
    st.dictionaries(
        st.sampled_from(["cpu_seconds", "wall_seconds", "memory_mb", "output_bytes", "x"]),
        st.integers()
        | st.floats()
        | st.booleans()
        | st.none()
        | st.text(max_size=3)
        | st.integers(min_value=10**300, max_value=10**400),
        max_size=4,
    )
)
def test_any_limits_give_limits_or_an_invalid_request(raw):
    policy = Policy.load()
    try:
        limits = policy.limits(raw)
    except InvalidRequest:
        return
    limits.check_within(policy.maxima)
