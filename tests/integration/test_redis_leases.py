"""Short-lived Redis users from OpenBao's database engine (issue 4), on their own stack: the API
and the worker log in to Redis (redis-py and Celery's broker connections alike) as `V_…` users
whose lease they renew; the static `api`/`worker` users are off; revoking the leases mid-stream
deletes those users and drops their connections, and the services take new ones without losing a
task or a result."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import redis

from appliance import stack
from appliance._stack import generate_root_token, lease_rules, load_acl_policy

from .conftest import FREE_PORTS, Stack, submit
from .test_vault_restart import DOUBLE, Stream, _service_pids, _wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lease_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("redis-leases")
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


@pytest.fixture
def root(lease_stack: Stack) -> Iterator[hvac.Client]:
    addr = lease_stack.status["vault_addr"]
    client = hvac.Client(url=addr, token=generate_root_token(addr, lease_stack.state))
    yield client
    client.auth.token.revoke_self()


def _users_connected(admin: redis.Redis) -> set[str]:
    return {str(c["user"]) for c in admin.client_list()}


def _leased_users(admin: redis.Redis, role: str) -> set[str]:
    prefix = f"V_APPROLE_{role.upper()}_"
    return {u for u in admin.acl_users() if u.startswith(prefix)}


def test_services_log_in_as_leased_users(lease_stack: Stack) -> None:
    admin = lease_stack.admin_redis()
    for role in ("api", "worker"):
        assert _leased_users(admin, role), role
        assert admin.acl_getuser(role)["flags"] == ["off"]  # The static user is only a template.
        assert not (lease_stack.state / "secrets" / f"redis-{role}.pass").exists()
    connected = _users_connected(admin)
    assert not {"api", "worker"} & connected
    assert {"V_APPROLE_API", "V_APPROLE_WORKER"} <= {u.rsplit("_", 2)[0] for u in connected}
    worker_pid = stack.status(lease_stack.state)["services"]["worker"]["pid"]
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"APPLIANCE_REDIS_PASSWORD_FILE=")]


def test_creation_statements_come_from_the_acl_file(lease_stack: Stack, root: hvac.Client):
    policy = load_acl_policy()
    for role in ("api", "worker"):
        stored = root.adapter.get(f"/v1/database/roles/{role}")["data"]
        assert [json.loads(s) for s in stored["creation_statements"]] == [lease_rules(policy[role])]
        assert 60 <= stored["default_ttl"] <= 600


def test_leased_user_has_only_its_roles_rules(lease_stack: Stack) -> None:
    admin = lease_stack.admin_redis()
    worker_user = sorted(_leased_users(admin, "worker"))[0]
    rules = admin.acl_getuser(worker_user)
    assert "~nonce:*" not in rules["keys"] and "~claim:*" in rules["keys"]
    assert "acl" not in " ".join(rules["commands"]) or "-acl" in rules["commands"]


def test_relay_forwards_only_a_login_as_vault(lease_stack: Stack) -> None:
    port = json.loads((lease_stack.state / "redis" / "relay.json").read_text())["port"]
    ctx = ssl.create_default_context(cafile=lease_stack.status["redis"]["tls"]["ca"])
    admin_password = Path(lease_stack.status["redis"]["password_file"]).read_text().strip()
    for first in (f"AUTH admin {admin_password}", "PING", f"HELLO 3 AUTH admin {admin_password}"):
        words = first.split()
        command = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            conn.sendall(command.encode())
            assert conn.recv(100) == b"", first  # Closed without a reply from Redis.


def test_revoking_leases_mid_stream_loses_nothing(lease_stack: Stack, root: hvac.Client) -> None:
    admin = lease_stack.admin_redis()
    pids = _service_pids(lease_stack)
    before = {role: _leased_users(admin, role) for role in ("api", "worker")}
    stream = Stream()
    submitter = threading.Thread(target=stream.run, args=(lease_stack,), daemon=True)
    submitter.start()
    try:
        _wait_until(lambda: len(stream.accepted) >= 10, 60, "no submissions accepted")
        # The worker first (jobs are running and queued), then the API.
        for role in ("worker", "api"):
            root.adapter.put(f"/v1/sys/leases/revoke-prefix/database/creds/{role}")
            assert not _leased_users(admin, role) & before[role]  # Deleted in Redis.
            count = len(stream.accepted)
            _wait_until(
                lambda c=count: len(stream.accepted) >= c + 5,
                60,
                f"submissions stalled after revoking the {role} lease",
            )
    finally:
        stream.stop.set()
        submitter.join(30)

    client = lease_stack.client()
    for key, i in stream.accepted.items():
        resp = lease_stack.wait_result(client, key, timeout=120)
        assert resp.status_code == 200, (key, resp.text)
        assert (resp.json()["status"], resp.json()["result"]) == ("succeeded", 2 * i)
    assert _service_pids(lease_stack) == pids  # Recovered in place, not restarted.
    for role in ("api", "worker"):
        now = _leased_users(admin, role)
        assert now and not now & before[role], role  # New users, none of the revoked ones.
    assert not [r for r in stream.refused if r[1] != 503]
    accepted = submit(client, DOUBLE, "double", args=[50])
    assert accepted.status_code == 202
    assert lease_stack.wait_result(client, accepted.json()["result_key"]).json()["result"] == 100
    worker_log = (lease_stack.state / "run" / "worker" / "worker.log").read_text()
    print(
        f"\naccepted {len(stream.accepted)}, refused {len(stream.refused)}, broker reconnects "
        f"{worker_log.count('Connection to broker lost')}, "
        f"retries {worker_log.count('Retry in')}"
    )
