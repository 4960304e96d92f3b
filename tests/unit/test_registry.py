"""The registry's cache never keeps a disabled client alive: every lookup checks `enabled`, and a
cached entry is used only while the registry generation it was read under is still current."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import hvac.exceptions
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.errors import DependencyUnavailable, NotFound
from appliance.registry import Client, Registry
from appliance.vault import VaultSession


class FakeKV:
    """KV v2 in memory, behind the hvac calls the registry makes; counts reads."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.reads = 0
        self.lists = 0

    def read_secret_version(
        self, path: str, mount_point: str, raise_on_deleted_version: bool
    ) -> dict[str, Any]:
        self.reads += 1
        if path not in self.data:
            raise hvac.exceptions.InvalidPath()
        return {"data": {"data": self.data[path]}}

    def create_or_update_secret(self, path: str, secret: dict[str, Any], mount_point: str) -> None:
        self.data[path] = secret

    def list_secrets(self, path: str, mount_point: str) -> dict[str, Any]:
        self.lists += 1
        return {"data": {"keys": [p.rsplit("/", 1)[1] for p in self.data]}}


class FakeSession:
    def __init__(self, kv: FakeKV) -> None:
        self.client = SimpleNamespace(secrets=SimpleNamespace(kv=SimpleNamespace(v2=kv)))

    def call(self, fn: Any) -> Any:
        return fn(self.client)


def _session(kv: FakeKV) -> VaultSession:
    return cast(VaultSession, FakeSession(kv))


class MemoryGeneration:
    """The registry generation in memory (Redis in production); shared by 'processes'."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.renewals = 0
        self.down = False

    def current(self) -> str | None:
        if self.down:
            raise DependencyUnavailable("Redis is unreachable")
        return self.value

    def renew(self) -> None:
        if self.down:
            raise DependencyUnavailable("Redis is unreachable")
        self.renewals += 1
        self.value = f"g{self.renewals}"


def _pem() -> str:
    """A real Ed25519 public key: a stored entry whose key does not load is refused."""
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


PEM = _pem()
ALICE = Client("alice", PEM, ("*",))


def _two_processes(cache_seconds: float = 3600) -> tuple[Registry, Registry, FakeKV]:
    """The operator's registry and an API process's, over one OpenBao and one Redis."""
    kv, generation = FakeKV(), MemoryGeneration()
    operator = Registry(_session(kv), generation=generation)
    api = Registry(_session(kv), cache_seconds=cache_seconds, generation=generation)
    return operator, api, kv


def test_a_disabled_client_is_refused_on_a_cache_hit() -> None:
    """The issue's bug: the hit path skipped the `enabled` check the miss path had."""
    kv, generation = FakeKV(), MemoryGeneration()
    kv.data["appliance/clients/alice"] = replace(ALICE, enabled=False).to_dict()
    registry = Registry(_session(kv), generation=generation)
    assert registry.get("alice") is None
    assert registry.get("alice") is None  # from the cache this time
    assert kv.reads == 1


def test_a_disable_in_another_process_takes_effect_on_the_next_lookup() -> None:
    operator, api, kv = _two_processes()
    operator.put(ALICE)
    assert api.get("alice") == ALICE
    assert api.get("alice") == ALICE
    assert kv.reads == 1  # cached while the generation holds
    operator.set_enabled("alice", False)
    assert api.get("alice") is None
    operator.set_enabled("alice", True)
    assert api.get("alice") == ALICE


def test_a_new_client_is_known_at_once_after_a_miss_was_cached() -> None:
    operator, api, _ = _two_processes()
    assert api.get("alice") is None
    operator.put(ALICE)
    assert api.get("alice") == ALICE


def test_a_narrowed_policy_takes_effect_at_once() -> None:
    operator, api, _ = _two_processes()
    operator.put(ALICE)
    assert api.get("alice") == ALICE
    operator.put(replace(ALICE, allowed_functions=("report_*",)))
    client = api.get("alice")
    assert client is not None and client.allowed_functions == ("report_*",)


def test_without_a_generation_every_lookup_reads_openbao() -> None:
    kv = FakeKV()
    kv.data["appliance/clients/alice"] = ALICE.to_dict()
    registry = Registry(_session(kv))
    registry.get("alice")
    registry.get("alice")
    assert kv.reads == 2


def test_the_cache_still_expires_for_writes_that_bypass_the_generation() -> None:
    _, api, kv = _two_processes(cache_seconds=0)
    kv.data["appliance/clients/alice"] = ALICE.to_dict()
    assert api.get("alice") == ALICE
    kv.data["appliance/clients/alice"] = replace(ALICE, enabled=False).to_dict()
    assert api.get("alice") is None


def test_redis_down_is_503_not_a_stale_answer() -> None:
    kv, generation = FakeKV(), MemoryGeneration()
    registry = Registry(_session(kv), generation=generation)
    registry.put(ALICE)
    assert registry.get("alice") == ALICE
    generation.down = True
    with pytest.raises(DependencyUnavailable):
        registry.get("alice")


def test_a_write_whose_generation_cannot_be_renewed_says_so() -> None:
    kv, generation = FakeKV(), MemoryGeneration()
    registry = Registry(_session(kv), generation=generation)
    generation.down = True
    with pytest.raises(DependencyUnavailable) as exc:
        registry.put(ALICE)
    assert exc.value.code == "generation_not_renewed"
    assert kv.data["appliance/clients/alice"]["enabled"] is True  # written all the same


def test_set_enabled_on_an_unknown_client_is_not_found() -> None:
    operator, _, _ = _two_processes()
    with pytest.raises(NotFound):
        operator.set_enabled("nobody", False)


def test_keyids_lists_disabled_clients_too() -> None:
    operator, _, _ = _two_processes()
    operator.put(ALICE)
    operator.put(Client("bob", PEM, enabled=False))
    assert operator.keyids() == ["alice", "bob"]
    assert operator.read("bob").enabled is False


def test_unknown_key_ids_cost_no_openbao_read_and_no_cache_entry() -> None:
    """Issue 12, finding 10: each new key id cost an OpenBao read and a cache entry for good."""
    operator, api, kv = _two_processes()
    operator.put(ALICE)
    for i in range(2000):
        assert api.get(f"made-up-{i}") is None
    assert kv.reads == 0
    assert kv.lists == 1  # the registered key ids, listed once under this generation
    assert len(api._cache) == 0


def test_a_flood_of_unknown_key_ids_does_not_evict_a_real_client() -> None:
    operator, api, kv = _two_processes()
    operator.put(ALICE)
    assert api.get("alice") == ALICE
    for i in range(5000):
        api.get(f"made-up-{i}")
    assert api.get("alice") == ALICE
    assert kv.reads == 1  # still the first read: alice stayed cached


def test_the_cache_is_a_bounded_lru_and_a_miss_on_a_real_key_still_works() -> None:
    kv, generation = FakeKV(), MemoryGeneration()
    operator = Registry(_session(kv), generation=generation)
    api = Registry(_session(kv), cache_seconds=3600, generation=generation, max_entries=2)
    for name in ("alice", "bob", "carol"):
        operator.put(Client(name, PEM, ("*",)))
    for name in ("alice", "bob", "alice", "carol"):
        assert api.get(name) is not None
    assert list(api._cache) == ["alice", "carol"]  # bob was the least recently used
    reads = kv.reads
    assert api.get("bob") is not None  # evicted, read again
    assert kv.reads == reads + 1


def test_the_key_id_listing_expires_for_writes_that_bypass_the_generation() -> None:
    _, api, kv = _two_processes(cache_seconds=0)
    assert api.get("alice") is None
    kv.data["appliance/clients/alice"] = ALICE.to_dict()  # written without the CLI
    assert api.get("alice") == ALICE
