"""The stack as separate services (issue 14): `appliance prepare`, `serve redis|relay|openbao`,
`init` (twice), `serve worker` (replicas enrolled from the worker enrolment credential) and
`serve api`, each in the foreground as a container engine or systemd runs them; then a signed
job, the enrolment credential's life, SIGTERM. Real Redis, OpenBao, Celery worker and API.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest

from appliance import stack
from appliance._stack import enrolment_file, generate_root_token

from .conftest import Stack, submit

ADD = "def add(a, b):\n    return {'sum': a + b}\n"
FREE = ("--redis-port", "0", "--bao-port", "0", "--api-port", "0", "--flower-port", "0")


@dataclass
class Served:
    """A stack whose services run through `appliance serve`, each a child of this test."""

    state: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    inits: list[dict[str, Any]] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--state", str(self.state), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def serve(
        self, name: str, *args: str, key: str | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        log = self.state.parent / f"serve-{key or name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "appliance.cli", "--state", str(self.state)]
                + ["serve", name, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[key or name] = proc
        return proc

    def log(self, key: str) -> str:
        return (self.state.parent / f"serve-{key}.log").read_text(errors="replace")

    def stop(self, key: str, timeout: float = 30) -> int:
        proc = self.procs.pop(key)
        with _suppress_gone():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with _suppress_gone():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise

    def as_stack(self) -> Stack:
        return Stack(self.state, stack.status(self.state))

    def init(self) -> dict[str, Any]:
        done = self.cli("init")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        self.inits.append(result)
        return result

    def wait_ready(self, timeout: float = 90) -> None:
        url = f"{self.as_stack().status['api_url']}/readyz"
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for key, proc in self.procs.items():
                assert proc.poll() is None, f"{key} exited: {self.log(key)[-3000:]}"
            try:
                resp = httpx.get(url, timeout=2)
                if resp.status_code == 200:
                    return
                last = resp.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout} s: {last}")

    def secret_ids(self, role: str) -> list[dict[str, Any]]:
        listed = self.cli("identities", "list", "--role", role, "--json")
        assert listed.returncode == 0, listed.stderr
        rows: list[dict[str, Any]] = json.loads(listed.stdout)
        return rows


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("served")
    base.chmod(0o711)
    s = Served(base / "state")
    try:
        prepared = s.cli("prepare", *FREE)
        assert prepared.returncode == 0, prepared.stderr
        for name in ("redis", "relay", "openbao"):
            s.serve(name)
        s.init()
        s.init()
        s.serve("worker", "--replica", "replica-1", key="worker-1")
        s.serve("api")
        s.wait_ready()
        yield s
    finally:
        for key in list(s.procs):
            try:
                s.stop(key)
            except subprocess.TimeoutExpired:
                pass


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _wait_for(predicate: Any, timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_init_twice_is_idempotent(served: Served) -> None:
    first, second = served.inits[:2]
    assert first == {
        "initialised_now": True,
        "enrolled": ["api", "flower"],
        "worker_enrolment": "new",
    }
    # The second run keeps everything: the enrolments not yet used, the enrolment credential.
    assert second == {"initialised_now": False, "enrolled": [], "worker_enrolment": "kept"}
    credential = enrolment_file(served.state).read_bytes()
    # With the services running (their wrapped secret_ids used, successors minted), again.
    assert served.init() == second
    assert enrolment_file(served.state).read_bytes() == credential
    assert len(served.secret_ids("api")) == 1
    assert len(served.secret_ids("flower")) == 1
    assert len(served.secret_ids("enrol-worker")) == 1


def test_each_service_runs_in_the_foreground_as_its_own_user(served: Served) -> None:
    expected = {
        "redis": ("redis-server", "appliance-redis"),
        "relay": ("appliance._stack.redis_relay", "appliance-redis"),
        "openbao": ("server", "appliance-bao"),
        "api": ("appliance.api", "appliance-api"),
        "worker-1": ("celery", "appliance-worker"),
    }
    # Each its own user where the services' users can reach the state, Python and code (not
    # when the interpreter sits under /root: then `status` says why, and all run as root).
    users_enabled = stack.status(served.state)["service_users"]["enabled"]
    for key, (marker, user) in expected.items():
        pid = served.procs[key].pid
        # `serve` replaced itself with the service: the child we started IS the service.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert marker in cmdline, (key, cmdline)
        if users_enabled:
            assert _uid(pid) == pwd.getpwnam(user).pw_uid, key


def test_a_signed_job_is_served(served: Served) -> None:
    st = served.as_stack()
    client = st.client()
    resp = submit(client, ADD, "add", args=[2, 40])
    assert resp.status_code == 202, resp.text
    result = st.wait_result(client, resp.json()["result_key"])
    assert result.status_code == 200 and result.json()["result"] == {"sum": 42}, result.text


def test_worker_replicas_enrol_with_distinct_secret_ids(served: Served) -> None:
    credential = enrolment_file(served.state)
    before = credential.read_bytes()
    served.serve("worker", "--replica", "replica-2", key="worker-2")
    replicas = served.state / "run" / "worker" / "replicas"
    _wait_for(
        lambda: (replicas / "replica-2" / "vault-worker.secret-id").is_file(), what="replica-2"
    )

    # Each replica's live successor is its own: two worker secret_ids, one per replica.
    def two() -> list[dict[str, Any]] | None:
        rows = served.secret_ids("worker")
        return rows if len(rows) == 2 else None

    rows = _wait_for(two, what="two worker secret_ids")
    assert len({row["accessor"] for row in rows}) == 2
    secrets_on_disk = {
        (replicas / name / "vault-worker.secret-id").read_text()
        for name in ("replica-1", "replica-2")
    }
    assert len(secrets_on_disk) == 2
    # The credential was read, never changed or removed; two enrolments used two of its uses.
    assert credential.read_bytes() == before
    assert credential.stat().st_mode & 0o777 == 0o400
    if stack.status(served.state)["service_users"]["enabled"]:
        assert credential.stat().st_uid == pwd.getpwnam("appliance-worker").pw_uid
    (enrol,) = served.secret_ids("enrol-worker")
    assert enrol["uses_left"] == 1000 - 2
    # Each enrolment token was revoked once used: no token with the enrolment policy is left.
    addr = served.as_stack().status["vault_addr"]
    root = hvac.Client(url=addr, token=generate_root_token(addr, served.state))
    try:
        accessors = root.adapter.list("/v1/auth/token/accessors")["data"]["keys"]
        policies = [root.auth.token.lookup_accessor(a)["data"]["policies"] for a in accessors]
        assert not [p for p in policies if "enrol-worker" in p]
    finally:
        root.auth.token.revoke_self()
    assert served.procs["worker-2"].poll() is None, served.log("worker-2")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is missing")
def test_a_replica_with_a_worker_containers_five_capabilities_enrols_and_logs_in(
    served: Served,
) -> None:
    # As in the compose file: root with SYS_ADMIN, SETUID, SETGID, SYS_CHROOT and KILL only (no
    # DAC_OVERRIDE to read the worker's files, no SETPCAP, no SYS_PTRACE).
    caps = "-all,+sys_admin,+setuid,+setgid,+sys_chroot,+kill"
    served.serve(
        "worker",
        "--replica",
        "replica-caps",
        key="worker-caps",
        prefix=("setpriv", f"--bounding-set={caps}"),
    )
    successor = served.state / "run/worker/replicas/replica-caps/vault-worker.secret-id"
    enrolled = _wait_for(lambda: successor.is_file() and successor.read_text(), what="enrolled")
    # The worker's own login (after its sandbox launcher and its drop) spends the enrolment's
    # secret_id and leaves its successor.
    _wait_for(lambda: successor.read_text() != enrolled, what="the replica's first login")
    time.sleep(1)
    assert served.procs["worker-caps"].poll() is None, served.log("worker-caps")
    served.stop("worker-caps")


def test_the_enrolment_credential_mints_plain_worker_secret_ids_only(served: Served) -> None:
    credential = json.loads(enrolment_file(served.state).read_text())
    addr = served.as_stack().status["vault_addr"]
    thief = hvac.Client(url=addr)
    thief.auth.approle.login(role_id=credential["role_id"], secret_id=credential["secret_id"])
    refused = {
        "an api secret_id": lambda: thief.adapter.post("/v1/auth/approle/role/api/secret-id"),
        "a worker secret_id of more uses": lambda: thief.adapter.post(
            "/v1/auth/approle/role/worker/secret-id", json={"num_uses": 0}
        ),
        "a worker secret_id of other CIDRs": lambda: thief.adapter.post(
            "/v1/auth/approle/role/worker/secret-id", json={"cidr_list": "0.0.0.0/0"}
        ),
        "the worker's role_id": lambda: thief.auth.approle.read_role_id("worker"),
        "the list of worker secret_ids": lambda: thief.adapter.list(
            "/v1/auth/approle/role/worker/secret-id"
        ),
        "a job key": lambda: thief.secrets.transit.decrypt_data("jobs", "vault:v1:AAAA"),
        "a task secret": lambda: thief.secrets.kv.v2.read_secret_version(
            "appliance/secrets/x", mount_point="kv", raise_on_deleted_version=True
        ),
    }
    for what, attempt in refused.items():
        with pytest.raises(hvac.exceptions.Forbidden):
            attempt()
            pytest.fail(f"the enrolment token got {what}")
    thief.auth.token.revoke_self()


def test_destroying_the_enrolment_credential_stops_new_replicas_not_running_ones(
    served: Served,
) -> None:
    destroyed = served.cli("identities", "destroy", "enrol-worker", "--all")
    assert destroyed.returncode == 0, destroyed.stderr
    refused = served.serve("worker", "--replica", "replica-3", key="worker-3")
    assert refused.wait(60) == 1
    served.procs.pop("worker-3")
    assert "cannot enrol" in served.log("worker-3")
    assert not (
        served.state / "run" / "worker" / "replicas" / "replica-3" / "vault-worker.secret-id"
    ).exists()
    # The running replicas keep working.
    for key in ("worker-1", "worker-2"):
        assert served.procs[key].poll() is None, served.log(key)
    test_a_signed_job_is_served(served)
    # The next `init` makes a new enrolment credential, and new replicas enrol again.
    assert served.init()["worker_enrolment"] == "new"
    served.serve("worker", "--replica", "replica-3", key="worker-3")
    _wait_for(
        lambda: (served.state / "run/worker/replicas/replica-3/vault-worker.secret-id").is_file(),
        what="replica-3 enrolled",
    )


def test_bad_input_exits_2(served: Served, tmp_path: Path) -> None:
    empty = Served(tmp_path / "nothing")
    for args in (
        ("serve", "nosuch"),
        ("serve", "api", "--replica", "x"),
        ("serve", "worker", "--replica", "../x"),
        ("prepare", "--api-port", "70000"),
    ):
        done = served.cli(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.strip()
    for args in (("serve", "api"), ("init",)):
        done = empty.cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "appliance prepare" in done.stderr


def test_serve_api_stops_on_sigterm_and_starts_again(served: Served) -> None:
    # Last in this module: it stops the API. The SIGTERM reaches the API itself (no wrapper).
    pid = served.procs["api"].pid
    started = time.monotonic()
    # uvicorn shuts down gracefully, then ends by the signal it got (exit status -15).
    assert served.stop("api") in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 30
    assert f"Finished server process [{pid}]" in served.log("api")
    served.serve("api")
    # A restarted API logs in with the successor its last login left: no `init` needed.
    served.wait_ready()
