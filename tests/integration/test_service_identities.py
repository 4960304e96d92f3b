"""Service identities (issue 12, finding 5): the operator token cannot become a service; secret_ids
are single-use and expire; a service mints only its own successor, which lets it restart
without the bootstrap; the operator sees and destroys secret_ids.

Against a real OpenBao (the session's bootstrapped one) and the session's running stack.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import pytest

from appliance import stack
from appliance._stack import BaoHandle, Bootstrap, read_pid_file, stop_by_pid_file
from appliance.identities import destroy_secret_id, list_secret_ids, revoke_tokens
from appliance.vault import EnrolmentLost, VaultSession, successor_file

from .conftest import Stack, submit

ROLES = ("api", "worker", "flower")


def _operator(openbao: BaoHandle) -> hvac.Client:
    return hvac.Client(url=openbao.addr, token=openbao.operator_token(), timeout=10)


def _enrol(openbao: BaoHandle, role: str, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return openbao.write_service_credentials(role, directory)


def _accessor_of(openbao: BaoHandle, role: str, secret_id: str) -> dict[str, Any]:
    looked = openbao.client().adapter.post(
        f"/v1/auth/approle/role/{role}/secret-id/lookup", json={"secret_id": secret_id}
    )
    return dict(looked["data"])


# --------------------------------------------------------------------------------------------
# The review's attack: with the operator token, log in as the worker and read a task secret.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_operator_token_cannot_mint_or_read_a_service_credential(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, role: str
) -> None:
    operator = _operator(openbao)
    attempts = {
        "read role_id": lambda: operator.auth.approle.read_role_id(role),
        "mint wrapped secret_id": lambda: operator.auth.approle.generate_secret_id(
            role, wrap_ttl="120s"
        ),
        "mint secret_id": lambda: operator.adapter.post(
            f"/v1/auth/approle/role/{role}/secret-id", json={}
        ),
        "mint custom secret_id": lambda: operator.adapter.post(
            f"/v1/auth/approle/role/{role}/custom-secret-id", json={"secret_id": "chosen-by-me"}
        ),
        "read the role": lambda: operator.auth.approle.read_role(role),
        "widen the role": lambda: operator.adapter.post(
            f"/v1/auth/approle/role/{role}", json={"secret_id_bound_cidrs": ["0.0.0.0/0"]}
        ),
        "token with the role's policy": lambda: operator.auth.token.create(
            policies=[role], no_parent=True
        ),
        "rewrite its own policy": lambda: operator.sys.create_or_update_policy(
            "operator", 'path "*" { capabilities = ["sudo", "read", "update"] }'
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(hvac.exceptions.Forbidden):
            attempt()
            pytest.fail(f"the operator token could {what} for {role}")


def test_operator_cannot_read_a_task_secret_through_the_worker(
    openbao: BaoHandle, bao_bootstrap: Bootstrap
) -> None:
    """The review's chain, end to end: without a worker secret_id there is no worker login."""
    openbao.client().secrets.kv.v2.create_or_update_secret(
        "appliance/secrets/identity-canary", secret={"v": "canary-5"}, mount_point="kv"
    )
    operator = _operator(openbao)
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.secrets.kv.v2.read_secret_version(
            "appliance/secrets/identity-canary", mount_point="kv", raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        operator.auth.approle.generate_secret_id("worker", wrap_ttl="60s")


# --------------------------------------------------------------------------------------------
# Secret_ids: single use, expiring, bound to loopback.
# --------------------------------------------------------------------------------------------


def test_bootstrap_secret_id_is_single_use_and_expires(
    openbao: BaoHandle, bao_bootstrap: Bootstrap
) -> None:
    wrap_token = bao_bootstrap.issue_wrapped_secret_id("worker")
    secret_id = hvac.Client(url=openbao.addr, token=wrap_token).sys.unwrap()["data"]["secret_id"]
    info = _accessor_of(openbao, "worker", secret_id)
    assert info["secret_id_num_uses"] == 1
    assert 0 < info["secret_id_ttl"] <= 24 * 3600
    assert info["cidr_list"] in ([], None) or info["cidr_list"] == ["127.0.0.1/32"]
    role_id = bao_bootstrap.role_id("worker")
    hvac.Client(url=openbao.addr).auth.approle.login(role_id=role_id, secret_id=secret_id)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=openbao.addr).auth.approle.login(role_id=role_id, secret_id=secret_id)
    settings = openbao.client().auth.approle.read_role("worker")["data"]
    assert settings["secret_id_num_uses"] == 1
    assert 0 < settings["secret_id_ttl"] <= 24 * 3600


# --------------------------------------------------------------------------------------------
# The service's own successor: restart without the bootstrap, theft locks it out.
# --------------------------------------------------------------------------------------------


def test_service_restarts_from_its_own_successor(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path
) -> None:
    role_id, wrap = _enrol(openbao, "api", tmp_path)
    first = VaultSession.from_approle(openbao.addr, role_id, wrap)
    successor = successor_file(wrap)
    assert not wrap.exists()
    assert successor.stat().st_mode & 0o777 == 0o600
    before_restart = successor.read_text().strip()
    first.close()
    # A restart: no wrapped secret_id any more, only the successor the last login left.
    again = VaultSession.from_approle(openbao.addr, role_id, wrap)
    assert again.call(lambda c: c.auth.token.lookup_self()["data"]["policies"]) == ["api"]
    after_restart = successor.read_text().strip()
    assert after_restart != before_restart
    # The secret_id the restart used is spent; the new one is single-use and expires.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=openbao.addr).auth.approle.login(
            role_id=role_id.read_text().strip(), secret_id=before_restart
        )
    info = _accessor_of(openbao, "api", after_restart)
    assert info["secret_id_num_uses"] == 1
    assert json.loads(json.dumps(info["metadata"]))["pid"]


def test_a_stolen_successor_locks_the_service_out(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path
) -> None:
    role_id, wrap = _enrol(openbao, "worker", tmp_path)
    VaultSession.from_approle(openbao.addr, role_id, wrap).close()
    stolen = successor_file(wrap).read_text().strip()
    thief = hvac.Client(url=openbao.addr)
    thief.auth.approle.login(role_id=role_id.read_text().strip(), secret_id=stolen)
    # The thief's one login spends the secret_id: the service notices at its next login.
    with pytest.raises(EnrolmentLost):
        VaultSession.from_approle(openbao.addr, role_id, wrap)


def test_an_intercepted_enrolment_is_noticed(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path
) -> None:
    role_id, wrap = _enrol(openbao, "flower", tmp_path)
    hvac.Client(url=openbao.addr, token=wrap.read_text().strip()).sys.unwrap()
    with pytest.raises(EnrolmentLost):
        VaultSession.from_approle(openbao.addr, role_id, wrap)


def test_destroying_every_identity_ends_a_stolen_token_chain(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path
) -> None:
    """The red team's variant: a thief of a live worker token mints a secret_id and uses it at
    once (nothing left for `identities list` to show), hop after hop. `destroy --all` must end
    every link: the tokens, not only the secret_ids."""
    role_id_file, wrap = _enrol(openbao, "worker", tmp_path)
    VaultSession.from_approle(openbao.addr, role_id_file, wrap).close()
    role_id = role_id_file.read_text().strip()
    thief = hvac.Client(url=openbao.addr)
    thief.auth.approle.login(role_id=role_id, secret_id=successor_file(wrap).read_text().strip())
    mint = "/v1/auth/approle/role/worker/secret-id"
    hop = hvac.Client(url=openbao.addr)
    hop.auth.approle.login(role_id=role_id, secret_id=thief.adapter.post(mint)["data"]["secret_id"])
    spare = hop.adapter.post(mint)["data"]["secret_id"]  # one kept for later
    operator = VaultSession(openbao.addr, openbao.operator_token())
    assert revoke_tokens(operator, "worker") >= 2
    for info in list_secret_ids(operator, ["worker"]):
        destroy_secret_id(operator, "worker", info.accessor)
    for client in (thief, hop):
        with pytest.raises(hvac.exceptions.Forbidden):
            client.adapter.post(mint)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=openbao.addr).auth.approle.login(role_id=role_id, secret_id=spare)


@pytest.mark.parametrize("other", ["api", "flower"])
def test_a_service_mints_only_its_own_plain_successor(
    openbao: BaoHandle, bao_bootstrap: Bootstrap, tmp_path: Path, other: str
) -> None:
    role_id, wrap = _enrol(openbao, "worker", tmp_path)
    worker = VaultSession.from_approle(openbao.addr, role_id, wrap)
    token = worker.call(lambda c: c.token)
    client = hvac.Client(url=openbao.addr, token=token)
    refused = {
        f"mint for {other}": lambda: client.adapter.post(
            f"/v1/auth/approle/role/{other}/secret-id", json={}
        ),
        f"read {other}'s role_id": lambda: client.auth.approle.read_role_id(other),
        "widen its own CIDRs": lambda: client.adapter.post(
            "/v1/auth/approle/role/worker/secret-id", json={"cidr_list": ["0.0.0.0/0"]}
        ),
        "more uses": lambda: client.adapter.post(
            "/v1/auth/approle/role/worker/secret-id", json={"num_uses": 0}
        ),
        "list secret_ids": lambda: client.adapter.list("/v1/auth/approle/role/worker/secret-id"),
    }
    for what, attempt in refused.items():
        with pytest.raises(hvac.exceptions.Forbidden):
            attempt()
            pytest.fail(f"the worker could {what}")
    worker.close()


# --------------------------------------------------------------------------------------------
# The running stack: every service enrolled once; restart without `up`; list and destroy.
# --------------------------------------------------------------------------------------------


def _wait_ready(api_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{api_url} not ready after {timeout} s")


def _pid(appliance_stack: Stack, name: str) -> int | None:
    return read_pid_file(appliance_stack.state / "run" / name / f"{name}.pid")


@pytest.mark.parametrize("name", ["api", "worker"])
def test_restarted_service_logs_in_without_up(appliance_stack: Stack, name: str) -> None:
    state = appliance_stack.state
    old_pid = _pid(appliance_stack, name)
    assert old_pid is not None
    assert stop_by_pid_file(state / "run" / name / f"{name}.pid")
    stack.restart_service(state, name)
    assert _pid(appliance_stack, name) not in (None, old_pid)
    # Later tests read the session stack's pids from its status: keep it current.
    appliance_stack.status = stack.status(state)
    _wait_ready(appliance_stack.status["api_url"])
    client = appliance_stack.client()
    resp = submit(client, "def f():\n    return 41 + 1\n", "f")
    assert resp.status_code == 202, resp.text
    result = appliance_stack.wait_result(client, resp.json()["result_key"])
    assert result.status_code == 200 and result.json()["result"] == 42, result.text


def test_operator_lists_and_destroys_service_secret_ids(
    appliance_stack: Stack, tmp_path: Path
) -> None:
    listed = appliance_stack.cli("identities", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    # One live secret_id per service: the successor its last login left.
    assert sorted(row["role"] for row in rows) == sorted(ROLES)
    assert all(row["uses_left"] == 1 and row["pid"] for row in rows)
    assert not any("secret_id" in row for row in rows)
    flower_dir = appliance_stack.state / "run" / "flower"
    saved = tmp_path / "flower"
    shutil.copytree(flower_dir, saved)
    destroyed = appliance_stack.cli("identities", "destroy", "flower", "--all")
    assert destroyed.returncode == 0, destroyed.stderr
    after = json.loads(appliance_stack.cli("identities", "list", "--json").stdout)
    assert [row["role"] for row in after if row["role"] == "flower"] == []
    # What Flower would log in with at its next start is refused now.
    role_id = saved / "vault-flower.role-id"
    with pytest.raises(EnrolmentLost):
        VaultSession.from_approle(
            appliance_stack.status["vault_addr"], role_id, saved / "vault-flower.secret-id.wrap"
        )


@pytest.mark.parametrize(
    "args",
    [
        ("identities", "destroy", "flower"),
        ("identities", "destroy", "flower", "abc", "--all"),
        ("identities", "destroy", "nosuchrole", "--all"),
        ("identities", "destroy", "api", "00000000-0000-0000-0000-000000000000"),
        ("identities", "destroy", "api", ""),
        ("identities", "destroy", "api", "../../sys/seal"),
        ("identities", "list", "--role", "operator"),
    ],
)
def test_identities_usage_errors_exit_2(appliance_stack: Stack, args: tuple[str, ...]) -> None:
    before = json.loads(appliance_stack.cli("identities", "list", "--json").stdout)
    result = appliance_stack.cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()
    assert json.loads(appliance_stack.cli("identities", "list", "--json").stdout) == before


def test_identity_listing_names_no_secret(appliance_stack: Stack) -> None:
    rows = list_secret_ids(stack.operator_session(appliance_stack.state))
    secrets = [
        p.read_text().strip() for p in (appliance_stack.state / "run").rglob("vault-*.secret-id")
    ]
    assert secrets
    dumped = json.dumps([row.as_json() for row in rows])
    assert not any(secret in dumped for secret in secrets)
