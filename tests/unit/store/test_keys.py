"""`_keys` names every Redis key prefix once, and `policies/redis-acl.json` grants exactly
those: a prefix with no grant would fail at run time, a grant with no prefix is dead access."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.store import keys

ACL = Path(__file__).resolve().parents[3] / "policies" / "redis-acl.json"


def _granted_prefixes() -> set[str]:
    """The first segment (up to and with its colon) of every key pattern of a service role."""
    roles = json.loads(ACL.read_text())["roles"]
    prefixes = set()
    for name, role in roles.items():
        if name == "admin":  # `~*`: the operator sees everything.
            continue
        for pattern in role["keys"]:
            pattern = pattern.split("~", 1)[1]  # drop `~` or `%R~`
            prefixes.add(pattern.split(":", 1)[0] + ":")
    return prefixes


def test_the_acl_grants_exactly_the_named_prefixes() -> None:
    assert _granted_prefixes() == set(keys.PREFIXES)


def test_prefixes_are_distinct_and_none_is_a_prefix_of_another() -> None:
    assert len(set(keys.PREFIXES)) == len(keys.PREFIXES)
    for a in keys.PREFIXES:
        assert all(a == b or not b.startswith(a) for b in keys.PREFIXES)


def test_every_named_key_has_its_prefix() -> None:
    assert keys.prefix_of(keys.HEARTBEAT_KEY) == keys.HEARTBEAT
    assert keys.prefix_of(keys.REGISTRY_GENERATION_KEY) == keys.REGISTRY
    assert keys.prefix_of(keys.claim("n")) == keys.CLAIM
    assert keys.prefix_of(keys.nonce("k", "d")) == keys.NONCE
    assert keys.prefix_of(keys.ratelimit("k", "m:1")) == keys.RATELIMIT
    assert keys.prefix_of("celery-task-meta-x") is None
