"""Registry entries edited by hand in OpenBao are parsed with exact types (red team of issue 12,
item 6): a malformed entry is refused whole (`InvalidRegistryEntry`, a 401 `invalid_signature`
with an audit-only reason), never half-read into a client that is enabled by mistake, and never
an error of another kind (the API turned those into a 500 or a reset connection)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.registry import Client, InvalidRegistryEntry, parse_entry


def _pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


PEM = _pem()
GOOD = Client("alice", PEM, ("f*",), ("team-a/**",), ("math",), {"cpu_seconds": 2.5}).to_dict()

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def test_a_good_entry_round_trips() -> None:
    client = parse_entry("alice", GOOD)
    assert client.to_dict() == GOOD
    assert client.enabled is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enabled", "false"),
        ("enabled", 0),
        ("enabled", None),
        ("limits", {"cpu_seconds": "x"}),
        ("limits", {"cpu_seconds": True}),
        ("limits", {"cpu_seconds": float("inf")}),
        ("limits", {"cpu_seconds": 0}),
        ("limits", {"no_such_limit": 1}),
        ("limits", []),
        ("rate_per_minute", "lots"),
        ("rate_per_minute", 1.5),
        ("rate_per_minute", True),
        ("rate_per_minute", 0),
        ("daily_quota", -1),
        ("storage_bytes", -1),
        ("storage_bytes", 2**64),
        ("allowed_functions", "*"),
        ("allowed_functions", [None]),
        ("allowed_functions", [""]),
        ("allowed_secrets", [None]),
        ("allowed_secrets", ["team-a/**/x/../y"]),
        ("allowed_imports", {"math": 1}),
        ("public_key_pem", 12),
        ("public_key_pem", "not a key"),
        ("keyid", "bob"),
        ("enable", False),
    ],
)
def test_a_malformed_field_makes_the_entry_unusable(field: str, value: Any) -> None:
    with pytest.raises(InvalidRegistryEntry) as caught:
        parse_entry("alice", {**GOOD, field: value})
    assert caught.value.code == "invalid_signature"
    assert caught.value.reason == "invalid_registry_entry"
    # The detail names the field, never the value (a value may be a secret pasted by mistake).
    if isinstance(value, str) and len(value) > 3:
        assert value not in caught.value.detail


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(
        st.sampled_from([*GOOD, "extra", "enable"]) | st.text(max_size=10), JSON, max_size=4
    ),
    drop=st.sets(st.sampled_from(sorted(GOOD)), max_size=3),
)
def test_any_entry_parses_exactly_or_is_refused(changes: dict[str, Any], drop: set[str]) -> None:
    entry = {k: v for k, v in {**GOOD, **changes}.items() if k not in drop}
    try:
        client = parse_entry("alice", entry)
    except InvalidRegistryEntry as exc:
        assert exc.reason == "invalid_registry_entry"
        return
    # What parsed is exactly what was stored, types included: nothing was coerced.
    stored = client.to_dict()
    for name, value in entry.items():
        assert json.dumps(stored[name], sort_keys=True) == json.dumps(value, sort_keys=True)
        assert type(stored[name]) is type(value)
    assert isinstance(client.enabled, bool)


@given(JSON)
def test_any_json_value_as_a_whole_entry_is_refused_or_parsed(value: Any) -> None:
    try:
        parse_entry("alice", value)
    except InvalidRegistryEntry:
        pass
