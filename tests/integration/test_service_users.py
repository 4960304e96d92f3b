"""Every service of the stack as its own unprivileged user (issue 12, finding 23).

The review's attack: a compromised API process read the unseal shares and the operator token,
since every service ran as root with the whole state directory readable. Here each service's
process is checked from /proc, and a process with a service's exact credentials (uid, gid,
groups) tries to read what only root or another service may read.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import stack
from appliance._stack.users import SERVICE_USERS as USERS

from .conftest import Stack, submit

SERVICES = ("redis", "openbao", "redis-relay", "api", "worker", "flower")
#: Which user each process of `status()["services"]` must run as.
EXPECTED_USER = {**USERS, "redis-relay": USERS["redis"]}


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_status(int(entry.name))["PPid"])
            except (FileNotFoundError, ProcessLookupError, KeyError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _pids(appliance_stack: Stack) -> dict[str, int]:
    services = stack.status(appliance_stack.state)["services"]
    return {name: services[name]["pid"] for name in SERVICES}


def test_the_stack_runs_its_services_as_users_of_their_own(appliance_stack: Stack) -> None:
    users = stack.status(appliance_stack.state)["service_users"]
    assert users["enabled"], users.get("why")
    uids = {}
    for name, pid in _pids(appliance_stack).items():
        status = _status(pid)
        expected = pwd.getpwnam(EXPECTED_USER[name]).pw_uid
        # Real, effective, saved and filesystem uid: all the service's own, none root.
        assert status["Uid"].split() == [str(expected)] * 4, (name, status["Uid"])
        assert expected != 0
        # No capability in any set, the bounding set included, and no way back through a
        # setuid binary (the red team found a full bounding set and no_new_privs off).
        for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
            assert int(status[caps], 16) == 0, (name, caps, status[caps])
        assert status["NoNewPrivs"] == "1", name
        uids[name] = expected
    assert len({uids[n] for n in ("redis", "openbao", "api", "worker", "flower")}) == 5


def test_root_stays_with_the_sandbox_launcher_and_fork_servers(appliance_stack: Stack) -> None:
    worker = _pids(appliance_stack)["worker"]
    launchers = [pid for pid in _children(worker) if _status(pid)["Uid"].split()[0] == "0"]
    assert len(launchers) == 1, "the worker has exactly one child that runs as root"
    servers = _children(launchers[0])
    assert servers, "the launcher's children are the fork servers"
    assert all(_status(pid)["Uid"].split()[0] == "0" for pid in servers)
    # A fork server lost after the worker dropped root is replaced through the launcher.
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    client = appliance_stack.client()
    resp = submit(client, "def f():\n    return 'after the fork servers died'\n", "f")
    assert resp.status_code == 202, resp.text
    result = appliance_stack.wait_result(client, resp.json()["result_key"], timeout=60)
    assert result.status_code == 200, result.text
    assert result.json()["result"] == "after the fork servers died"


def _as_service(user: str, paths: list[Path]) -> dict[str, str]:
    """Try to read each path with exactly the credentials of `user`: 'read' or the error."""
    entry = pwd.getpwnam(user)
    groups = sorted({g for g in os.getgrouplist(user, entry.pw_gid)})
    probe = (
        "import json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        with open(p, 'rb') as f:\n"
        "            f.read(1)\n"
        "        out[p] = 'read'\n"
        "    except IsADirectoryError:\n"
        "        import os\n"
        "        try:\n"
        "            os.listdir(p)\n"
        "            out[p] = 'read'\n"
        "        except OSError as exc:\n"
        "            out[p] = type(exc).__name__\n"
        "    except OSError as exc:\n"
        "        out[p] = type(exc).__name__\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(  # noqa: S603 - the test's own probe
        [sys.executable, "-I", "-c", probe, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=groups,
        env={},
        cwd="/",
        timeout=30,
    )
    import json

    result: dict[str, str] = json.loads(done.stdout)
    return result


def _root_only(state: Path) -> list[Path]:
    return [
        state / "secrets" / "bao-unseal.json",
        state / "secrets" / "bao-operator.token",
        state / "secrets" / "redis-admin.pass",
        state / "secrets" / "redis-vault.pass",
        state / "tls" / "ca.key",
        state / "tls" / "client-admin.key",
        state / "clients" / "local.key",
        state / "bao" / "data",
        state / "redis" / "users.acl",
    ]


def _own_files(state: Path, service: str) -> list[Path]:
    directory = state / "run" / service
    return [
        directory / f"vault-{service}.role-id",
        directory / f"vault-{service}.secret-id",
        state / "tls" / f"client-{service}.key",
    ]


@pytest.mark.parametrize("service", ["api", "worker", "flower"])
def test_a_compromised_service_reads_only_its_own_secrets(
    appliance_stack: Stack, service: str
) -> None:
    state = appliance_stack.state
    others = [s for s in ("api", "worker", "flower") if s != service]
    forbidden = [*_root_only(state), *(p for o in others for p in _own_files(state, o))]
    if service == "flower":
        # Flower is not in the group of the audit log's writers.
        forbidden += [state / "audit" / "audit.jsonl", state / "secrets" / "metrics.token"]
    else:
        forbidden.append(state / "secrets" / "redis-flower.pass")
    outcome = _as_service(USERS[service], [*forbidden, *_own_files(state, service)])
    assert {p: outcome[str(p)] for p in forbidden} == {p: "PermissionError" for p in forbidden}
    assert all(outcome[str(p)] == "read" for p in _own_files(state, service))


def test_redis_and_openbao_read_nothing_of_the_services(appliance_stack: Stack) -> None:
    state = appliance_stack.state
    services = [p for s in ("api", "worker", "flower") for p in _own_files(state, s)]
    for user in (USERS["redis"], USERS["openbao"]):
        outcome = _as_service(user, [*_root_only(state), *services])
        readable = [p for p, what in outcome.items() if what == "read"]
        own = "redis" if user == USERS["redis"] else "bao"
        assert [p for p in readable if f"/{own}/" not in p] == [], user


def test_the_api_and_the_worker_share_the_audit_log(appliance_stack: Stack) -> None:
    directory = Path(appliance_stack.status["audit_log"]).parent
    mode = directory.stat().st_mode
    assert mode & 0o7777 == 0o3770  # setgid and sticky (red team H1)
    # What `audit verify` trusts first is root's alone (the red team found it group-writable).
    keys = directory / "audit-pubkeys.json"
    assert keys.stat().st_uid == 0 and keys.stat().st_mode & 0o022 == 0
    before = len(appliance_stack.audit_entries())
    client = appliance_stack.client()
    resp = submit(client, "def f():\n    return 1\n", "f")
    assert resp.status_code == 202
    appliance_stack.wait_result(client, resp.json()["result_key"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sources = {e.get("source") for e in appliance_stack.audit_entries()[before:]}
        if {"api", "worker"} <= sources:
            break
        time.sleep(0.1)
    entries = appliance_stack.audit_entries()[before:]
    assert {"api", "worker"} <= {e.get("source") for e in entries}
    result = appliance_stack.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
