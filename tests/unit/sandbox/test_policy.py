"""Policy: loading, validation (default deny, identities, layers) and import checks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox import LAYERS, ImportNotAllowed, LimitNotAllowed, Policy, PolicyError

BUNDLED = Path(__file__).resolve().parents[3] / "policies" / "sandbox.json"


@pytest.fixture
def raw() -> dict[str, Any]:
    return json.loads(BUNDLED.read_text())


def test_bundled_policy_loads_and_requires_every_os_layer(raw):
    policy = Policy.load(BUNDLED)
    assert policy.required_layers == set(LAYERS)
    assert policy.degraded_layers == frozenset()
    assert policy.uid == 65534
    assert "os" in policy.never and "math" in policy.importable
    assert not policy.may_skip("seccomp")


def _mutated(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("importable",), "math"),  # a string is not a list of names
        (("importable",), [1, 2]),
        (("never",), _DELETE),
        (("importable", "os"), "sneaked in"),  # both importable and never
        (("isolation", "required_layers"), ["seccomp", "teleport"]),
        (("isolation", "degraded_layers"), ["restricted_python"]),
        (("isolation", "uid"), 0),
        (("isolation", "uid"), -1),
        (("isolation", "uid"), 2**32 - 1),
        (("isolation", "gid"), True),
        (("isolation", "gid"), "65534"),
        (("limits", "defaults", "memory_mb"), 4096),  # above the maximum
        (("limits", "maxima", "cpu_seconds"), -1),
        (("limits", "defaults"), _DELETE),
    ],
)
def test_malformed_policy_is_refused(raw, path, value):
    with pytest.raises(PolicyError):
        Policy.from_dict(_mutated(raw, path, value))


@pytest.mark.parametrize("raw_policy", [[], "policy", None, 1])
def test_policy_must_be_an_object(raw_policy):
    with pytest.raises(PolicyError):
        Policy.from_dict(raw_policy)


def test_unreadable_policy_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError):
        Policy.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError):
        Policy.load(bad)


def test_never_allowed_module_is_named():
    policy = Policy.load(BUNDLED)
    with pytest.raises(ImportNotAllowed, match="os") as info:
        policy.check_imports(["math", "os"])
    assert info.value.never and info.value.modules == ["os"]
    with pytest.raises(ImportNotAllowed, match="os.path"):
        policy.check_imports(["os.path"])


def test_unlisted_module_is_named():
    with pytest.raises(ImportNotAllowed, match="csv") as info:
        Policy.load(BUNDLED).check_imports(["csv"])
    assert not info.value.never


def test_imports_are_deduplicated_in_order():
    assert Policy.load(BUNDLED).check_imports(["re", "math", "re"]) == ("re", "math")


def test_requested_limits_are_capped_by_the_maxima():
    policy = Policy.load(BUNDLED)
    assert policy.limits({"cpu_seconds": 30}).cpu_seconds == 30
    with pytest.raises(LimitNotAllowed):
        policy.limits({"cpu_seconds": 31})


def test_degraded_and_optional_layers_may_be_skipped(raw):
    raw["isolation"]["required_layers"] = ["restricted_python", "seccomp"]
    raw["isolation"]["degraded_layers"] = ["netns"]
    policy = Policy.from_dict(raw)
    assert policy.may_skip("netns") and policy.may_skip("uid")
    assert not policy.may_skip("seccomp")
