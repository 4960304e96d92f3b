"""The API's registry cache against the real stack (issue 16): a cache hit costs one Redis GET of
the registry generation and no OpenBao call, and a changed policy (or key state) is seen on the
very next request. The disabled-client case under concurrent requests is
`test_clients.py::test_disable_refuses_the_next_request_and_enable_restores_it`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from appliance.registry import Client, Registry
from appliance.vault import VaultSession

from .conftest import Stack, is_problem, submit

pytestmark = pytest.mark.integration

T = TypeVar("T")
_F = "def f():\n    return 1\n\ndef g():\n    return 2\n"


class CountingSession:
    """A real OpenBao session that counts the calls made through it (each one request)."""

    def __init__(self, session: VaultSession) -> None:
        self.session = session
        self.calls = 0

    def call(self, fn: Callable[[Any], T]) -> T:
        self.calls += 1
        return self.session.call(fn)


def _api_like_registry(stack: Stack) -> tuple[Registry, CountingSession]:
    """A registry that caches as the API's does (generation from the stack's Redis), reading
    the stack's real OpenBao through a counting session."""
    operator = stack.registry()
    counting = CountingSession(operator.session)
    registry = Registry(counting, generation=operator.generation)  # type: ignore[arg-type]
    return registry, counting


def test_a_cache_hit_makes_no_openbao_call(appliance_stack: Stack) -> None:
    appliance_stack.add_client("cached", functions=("f",))
    registry, openbao = _api_like_registry(appliance_stack)
    first = registry.get("cached")
    assert first is not None and first.allowed_functions == ("f",)
    assert openbao.calls == 2  # the listing of key ids and the entry
    for _ in range(50):
        assert registry.get("cached") == first
        assert registry.public_key("cached") is not None
    assert openbao.calls == 2  # 100 lookups, no OpenBao call

    # A registry write (another process: the operator's) renews the generation: the next
    # lookup reads OpenBao again and sees the new policy.
    appliance_stack.registry().put(
        Client("cached", first.public_key_pem, ("f", "g"), rate_per_minute=7)
    )
    changed = registry.get("cached")
    assert changed is not None and changed.allowed_functions == ("f", "g")
    assert changed.rate_per_minute == 7
    assert openbao.calls == 4
    assert registry.get("cached") == changed and openbao.calls == 4


def _entry_reads(stack: Stack) -> float:
    """The API process's own count of registry entry reads from OpenBao (its metrics)."""
    metrics = stack.status["metrics"]
    token = Path(metrics["token_file"]).read_text().strip()
    text = httpx.get(metrics["api"], headers={"Authorization": f"Bearer {token}"}).text
    found = re.search(r'^appliance_client_registry_reads_total\{op="entry"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_api_reads_openbao_once_for_many_requests(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("warm", rate_per_minute=100_000)
    client = appliance_stack.client("warm", key_file)
    assert submit(client, _F, "f").status_code == 202  # cached from here on
    before = _entry_reads(appliance_stack)
    for _ in range(20):
        assert submit(client, _F, "f").status_code == 202
    assert _entry_reads(appliance_stack) == before


def test_a_changed_policy_is_seen_on_the_next_request(appliance_stack: Stack) -> None:
    key_file = appliance_stack.add_client("policy", functions=("f",), rate_per_minute=100_000)
    client = appliance_stack.client("policy", key_file)
    public = key_file.with_suffix(".pub").read_text()
    assert submit(client, _F, "f").status_code == 202  # the entry is cached now
    assert is_problem(submit(client, _F, "g"), 403)["code"] == "function_not_allowed"

    appliance_stack.registry().put(Client("policy", public, ("f", "g"), rate_per_minute=100_000))
    assert submit(client, _F, "g").status_code == 202  # widened: the very next request

    appliance_stack.registry().put(Client("policy", public, ("g",), rate_per_minute=100_000))
    assert is_problem(submit(client, _F, "f"), 403)["code"] == "function_not_allowed"
    assert submit(client, _F, "g").status_code == 202

    appliance_stack.registry().put(
        Client("policy", public, ("f", "g"), rate_per_minute=100_000, limits={"cpu_seconds": 1})
    )
    refused = submit(client, _F, "g", limits={"cpu_seconds": 2})
    assert is_problem(refused, 403)["code"] == "limits_not_allowed"
