"""Shared fixtures for the attack suite: one fork server per session, side-effect detectors.

Every attempt goes through `attempt()` (RestrictedPython, the production path) or `attempt_raw()`
(`UnsafeRawCodeRun`: plain Python in a fully isolated child, to prove the OS layer on its own).
Both check, besides the status each test asserts, that the parent's canary environment variable
never shows up in an outcome and that the fork server survived.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sandbox import Outcome, Sandbox
from sandbox._testing import UnsafeRawCodeRun

CANARY_NAME = "SANDBOX_SECURITY_CANARY"
CANARY_VALUE = f"canary-{secrets.token_hex(16)}"

#: The sandbox's uid (policies/sandbox.json).
NOBODY = 65534

# Short limits keep the suite fast; tests that need more say so.
FAST = {"cpu_seconds": 1, "wall_seconds": 3, "memory_mb": 64}


@pytest.fixture(scope="session", autouse=True)
def canary() -> Iterator[str]:
    """A secret in the parent's environment, set before any fork server starts."""
    os.environ[CANARY_NAME] = CANARY_VALUE
    yield CANARY_VALUE
    os.environ.pop(CANARY_NAME, None)


@pytest.fixture(scope="session")
def sb(canary: str) -> Iterator[Sandbox]:
    """The production sandbox: a fork server with the bundled policy and every layer."""
    with Sandbox() as box:
        assert not [layer for layer, why in box.layers.items() if why], box.layers
        yield box


@pytest.fixture(scope="session")
def raw(canary: str) -> Iterator[UnsafeRawCodeRun]:
    """A fork server whose children run plain Python (no RestrictedPython), every OS layer on."""
    with UnsafeRawCodeRun() as box:
        yield box


def _assert_alive(box: Sandbox) -> None:
    proc = box._proc
    assert proc is not None and proc.poll() is None, "the fork server died"
    os.kill(proc.pid, 0)


@pytest.fixture(autouse=True)
def servers_survive(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every attempt, the fork servers it used are still alive."""
    yield
    for name in ("sb", "raw"):
        if name in request.fixturenames:
            _assert_alive(request.getfixturevalue(name))


def no_canary(outcome: Outcome) -> Outcome:
    """Fail if the parent's canary appears anywhere in the outcome."""
    assert CANARY_VALUE not in json.dumps(outcome.to_dict()), "canary leaked"
    return outcome


def attempt(
    box: Sandbox,
    source: str,
    *args: Any,
    imports: tuple[str, ...] = (),
    limits: dict[str, Any] | None = None,
    entry: str = "f",
) -> Outcome:
    """Run `entry(*args)` of `source` through RestrictedPython and every layer."""
    return no_canary(
        box.run(source, entry, list(args), limits=limits or FAST, allow_imports=imports)
    )


def attempt_raw(
    box: UnsafeRawCodeRun,
    source: str,
    *args: Any,
    limits: dict[str, Any] | None = None,
    entry: str = "f",
) -> Outcome:
    """Run plain-Python `entry(*args)` of `source` in an isolated child, RestrictedPython off."""
    return no_canary(box.run(source, entry, list(args), limits=limits or FAST))


def assert_status(outcome: Outcome, status: str, error_type: str | None = None) -> None:
    """The exact status (and error type, when given) the contract's table prescribes."""
    assert outcome.status == status, outcome
    if error_type is not None:
        assert outcome.error is not None and outcome.error["type"] == error_type, outcome
    if status == "ok":
        assert outcome.error is None
    else:
        assert outcome.value is None and outcome.error is not None


@dataclass
class Listener:
    """A TCP listener on the host's loopback that records every connection it accepts."""

    port: int
    accepted: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A loopback listener; the test asserts afterwards that nothing connected to it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.05)
    record = Listener(server.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except (TimeoutError, OSError):
                continue
            record.accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        # Give a late connection attempt the chance to be recorded before checking.
        stop.set()
        thread.join(timeout=2)
        server.close()


@pytest.fixture
def nobody_process() -> Iterator[int]:
    """A host process running as the sandbox's uid: a daemon, or another tenant's run."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the helper only sleeps
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            time.sleep(60)
        finally:
            os._exit(0)
    time.sleep(0.05)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
