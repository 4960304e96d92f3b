"""Session-scoped fixtures for the real stack: PKI, Redis and OpenBao, started fresh for the run.

Each service is a real process on a free loopback port with its state in a temporary directory,
stopped at the end of the session even when tests fail. Nothing here talks to a service that was
started by hand or listens on a standard port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from appliance._stack import (
    BaoHandle,
    Bootstrap,
    Pki,
    RedisHandle,
    StackError,
    bootstrap,
    ensure_pki,
    free_port,
    start_openbao,
    start_redis,
    stop_openbao,
    stop_redis,
)

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
