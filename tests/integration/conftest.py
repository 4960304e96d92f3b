"""Fixtures of the real stack, never stubbed and never skipped.

Two kinds: the whole stack, started by `appliance.stack.up` on free loopback ports in a temp
directory (the same orchestrator the README's first command runs: real Redis with TLS and ACL
users, real OpenBao, a real Celery worker, the API under uvicorn and Flower); and, session-scoped,
single services (PKI, Redis, OpenBao) for the tests of one adapter. Each is a real process with
its state in a temporary directory, stopped at the end of the session even when tests fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from celery import Celery
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import stack
from appliance._stack import (
    BaoHandle,
    Bootstrap,
    Pki,
    RedisHandle,
    StackError,
    bootstrap,
    ensure_pki,
    free_port,
    generate_root_token,
    start_openbao,
    start_redis,
    stop_openbao,
    stop_redis,
)
from appliance.cli import SignedClient
from appliance.queue import BROKER_KEY_PREFIX
from appliance.registry import Client, Registry
from appliance.vault import Transit, VaultSession

#: Every port of a test stack: any free one (0).
FREE_PORTS = {"redis": 0, "bao": 0, "api": 0, "flower": 0, "metrics": 0}


def _pairs(items: Any) -> list[bytes]:
    return [b for pair in items for b in pair]


def _nothing(admin: Any, key: bytes) -> list[bytes]:
    return []


#: How to read every value of a key, by its Redis type.
_REDIS_READERS: dict[bytes, Callable[[Any, bytes], list[bytes]]] = {
    b"string": lambda admin, key: [admin.get(key) or b""],
    b"list": lambda admin, key: list(admin.lrange(key, 0, -1)),
    b"hash": lambda admin, key: _pairs(admin.hgetall(key).items()),
    b"set": lambda admin, key: list(admin.smembers(key)),
    b"zset": lambda admin, key: [m for m, _ in admin.zrange(key, 0, -1, withscores=True)],
    b"stream": lambda admin, key: [
        b for _id, fields in admin.xrange(key) for b in _pairs(fields.items())
    ],
}


@dataclass
class Stack:
    """A running stack and handles on it."""

    state: Path
    status: dict[str, Any]

    def admin_redis(self) -> redis.Redis:
        r = self.status["redis"]
        return redis.Redis(
            host=r["host"],
            port=r["port"],
            ssl=True,
            ssl_ca_certs=r["tls"]["ca"],
            ssl_certfile=r["tls"]["cert"],
            ssl_keyfile=r["tls"]["key"],
            username=r["username"],
            password=Path(r["password_file"]).read_text().strip(),
        )

    def local_key(self, key_file: Path | None = None) -> Ed25519PrivateKey:
        path = key_file or Path(self.status["client"]["private_key"])
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def client(self, keyid: str = "local", key_file: Path | None = None) -> SignedClient:
        return SignedClient(self.status["api_url"], keyid, self.local_key(key_file))

    def root_transit(self) -> Transit:
        """Transit with a root token (generated from the operator token and the unseal keys, as
        `appliance up` does): mints what only the API could otherwise."""
        token = generate_root_token(self.status["vault_addr"], self.state)
        return Transit(VaultSession(self.status["vault_addr"], token))

    def broker_producer(self, name: str, **conf: Any) -> Celery:
        """A Celery producer holding the admin's broker credentials: an intruder's view."""
        r = self.status["redis"]
        password = Path(r["password_file"]).read_text().strip()
        app = Celery(name, broker=f"rediss://admin:{password}@127.0.0.1:{r['port']}/0")
        app.conf.update(
            broker_use_ssl={
                "ssl_cert_reqs": 2,
                "ssl_ca_certs": r["tls"]["ca"],
                "ssl_certfile": r["tls"]["cert"],
                "ssl_keyfile": r["tls"]["key"],
            },
            broker_transport_options={"global_keyprefix": BROKER_KEY_PREFIX},
            **conf,
        )
        return app

    def registry(self) -> Registry:
        """The operator's registry: writes renew the registry generation, as the CLI's do."""
        return stack.operator_registry(self.state)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`appliance --state STATE ARGS...` in a process of its own."""
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--state", str(self.state), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def audit_entries(self) -> list[dict[str, Any]]:
        path = Path(self.status["audit_log"])
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def add_client(self, keyid: str, functions: tuple[str, ...] = ("*",), **kw: Any) -> Path:
        private, public = stack.write_keypair(self.state / "clients", keyid)
        self.registry().put(Client(keyid, public.read_text(), functions, **kw))
        return private

    def logs(self) -> str:
        """Every service log and every audit file of the stack."""
        files = [*(self.state / "run").rglob("*.log"), *(self.state / "audit").glob("*")]
        return "\n".join(p.read_text(errors="replace") for p in files if p.is_file())

    def all_redis_bytes(self) -> bytes:
        """Every key and value of every type in Redis: what a canary scan searches."""
        admin = self.admin_redis()
        chunks: list[bytes] = []
        for key in admin.scan_iter():
            chunks.append(key)
            chunks.extend(_REDIS_READERS.get(admin.type(key), _nothing)(admin, key))
        return b"\n".join(chunks)

    def wait_result(self, client: SignedClient, key: str, timeout: float = 30) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            resp = client.request("GET", "/get-result", params={"key": key})
            if resp.status_code != 202 or time.monotonic() > deadline:
                return resp
            time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def _services_may_reach_the_stacks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The stacks' services run as users of their own (issue 12, finding 23): let them cross
    this run's temporary directory (search only, no listing) to their state (tests/conftest.py
    puts it directly under /tmp)."""
    tmp_path_factory.getbasetemp().chmod(0o711)


@pytest.fixture(scope="session")
def appliance_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack")
    try:
        status = stack.up(state, FREE_PORTS)
        yield Stack(state, status)
    finally:
        stack.down(state)


def submit(client: SignedClient, module: str, function: str, **extra: Any) -> httpx.Response:
    body = {"module": module, "function": function, **extra}
    return client.request("POST", "/v1/tasks", body)


def is_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = json.loads(resp.text)
    for field in ("type", "title", "status", "detail", "code"):
        assert field in body
    assert body["status"] == status
    return body


_Handle = TypeVar("_Handle")


def _start_on_free_port(start: Callable[[int], _Handle], attempts: int = 3) -> _Handle:
    """Start a service on a fresh free port, retrying if another process grabbed the port first."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except StackError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def stack_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory shared by the session's services (like `appliance up --state`)."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def pki(stack_state: Path) -> Pki:
    """The session's CA, server certificate and per-role client certificates."""
    return ensure_pki(stack_state / "tls")


@pytest.fixture(scope="session")
def redis_server(stack_state: Path, pki: Pki) -> Iterator[RedisHandle]:
    """A TLS-only Redis with the ACL roles of `policies/redis-acl.json`."""
    try:
        yield _start_on_free_port(lambda port: start_redis(stack_state, port, pki))
    finally:
        stop_redis(stack_state)


@pytest.fixture(scope="session")
def openbao(stack_state: Path) -> Iterator[BaoHandle]:
    """A sealed-storage OpenBao (raft), initialised and unsealed, with its file audit device and
    a root token in memory (not yet bootstrapped)."""
    try:
        yield _start_on_free_port(lambda port: start_openbao(stack_state, port))
    finally:
        stop_openbao(stack_state)


@pytest.fixture(scope="session")
def bao_bootstrap(openbao: BaoHandle) -> Bootstrap:
    """The session's OpenBao with transit keys, KV, policies and AppRoles configured."""
    return bootstrap(openbao)
