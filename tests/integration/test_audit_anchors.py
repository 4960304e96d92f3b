"""OpenBao's KV v2 (`VaultAnchorStore`) held to the anchor-store contract that the unit tests'
stub meets (tests/unit/audit/anchor_contract.py), and the services' policies: create, never
update or delete."""

from __future__ import annotations

import secrets

import pytest

from appliance._stack import Bootstrap
from appliance.audit import ANCHOR_PATH, Anchor, AnchorConflict, VaultAnchorStore
from appliance.errors import Forbidden
from appliance.vault import VaultSession
from tests.unit.audit.anchor_contract import AnchorStoreContract

pytestmark = pytest.mark.integration


class TestVaultAnchorStore(AnchorStoreContract):
    @pytest.fixture
    def store(self, bao_bootstrap: Bootstrap) -> VaultAnchorStore:
        handle = bao_bootstrap.handle
        # A path of its own per test: the contract needs an empty store.
        path = f"{ANCHOR_PATH}-test/{secrets.token_hex(4)}"
        return VaultAnchorStore(VaultSession(handle.addr, handle.root_token), path=path)


def _session(bootstrap: Bootstrap, policy: str) -> VaultSession:
    root = VaultSession(bootstrap.handle.addr, bootstrap.handle.root_token)
    token = root.call(
        lambda c: c.auth.token.create(policies=[policy], no_default_policy=True, ttl="10m")
    )["auth"]["client_token"]
    return VaultSession(bootstrap.handle.addr, token)


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_service_creates_anchors_but_cannot_rewrite_or_delete_them(
    bao_bootstrap: Bootstrap, role: str
) -> None:
    session = _session(bao_bootstrap, role)
    store = VaultAnchorStore(session)
    number = 10**9 + secrets.randbelow(10**9)
    anchor = Anchor(number, 1, 5, "ab" * 32, "cd" * 32, "2026-01-01T00:00:00.000000Z", "x")
    store.create(anchor)
    with pytest.raises(AnchorConflict):
        store.create(Anchor(number, 1, 5, "ef" * 32, "cd" * 32, anchor.signed_at, "y"))
    key = f"{ANCHOR_PATH}/{number:012d}"
    attempts = [
        lambda c: c.secrets.kv.v2.create_or_update_secret(
            path=key, secret={"number": number}, mount_point="kv"
        ),
        lambda c: c.secrets.kv.v2.delete_latest_version_of_secret(path=key, mount_point="kv"),
        lambda c: c.secrets.kv.v2.destroy_secret_versions(path=key, versions=[1], mount_point="kv"),
        lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(path=key, mount_point="kv"),
        lambda c: c.secrets.kv.v2.update_metadata(
            path=key, delete_version_after="1s", mount_point="kv"
        ),
    ]
    for attempt in attempts:
        with pytest.raises(Forbidden):
            session.call(attempt)
    assert store.get(number) == anchor


def test_the_operator_reads_anchors_but_cannot_create_or_sign(bao_bootstrap: Bootstrap) -> None:
    session = _session(bao_bootstrap, "operator")
    store = VaultAnchorStore(session)
    store.all()  # list and read
    anchor = Anchor(10**11, 1, 5, "ab" * 32, "cd" * 32, "2026-01-01T00:00:00.000000Z", "x")
    with pytest.raises(Exception, match="cannot anchor"):
        store.create(anchor)
    with pytest.raises(Forbidden):
        session.call(
            lambda c: c.secrets.transit.sign_data(
                name="audit", hash_input="eA==", mount_point="transit"
            )
        )
