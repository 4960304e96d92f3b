"""The Redis relay of OpenBao's database plugin against a real Redis (issue 12, finding 4).

The review logged in as `admin` over the relay's client certificate with a failed `AUTH vault x`
followed by `AUTH admin <pw>`, and raised Redis's client count for good by holding connections
after a failed login. The relay here is the real `Relay` on its own thread, with small limits so
that the deadlines can be waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from appliance._stack import RedisHandle, free_port
from appliance._stack.redis_relay import LOGIN_SECONDS, MAX_CONNECTIONS, Relay

pytestmark = pytest.mark.integration

LOGIN, IDLE, CAP = 1.0, 2.0, 4


@pytest.fixture(scope="module")
def relay(redis_server: RedisHandle) -> Iterator[int]:
    """A relay in front of the session's Redis; yields its port."""
    port = free_port()
    relay = Relay(
        redis_server.port,
        redis_server.pki,
        max_connections=CAP,
        login_seconds=LOGIN,
        idle_seconds=IDLE,
    )
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(relay.serve(port))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait(lambda: _port_open(port), 10, "the relay did not listen")
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks()])
        thread.join(10)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _wait(condition: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def _resp(*words: str) -> bytes:
    return (f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)).encode()


def _connect(redis_server: RedisHandle, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(redis_server.pki.ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_all(conn: ssl.SSLSocket) -> bytes:
    """Everything the relay sends until it closes (or 10 s pass)."""
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
        while chunk := conn.recv(4096):
            data += chunk
    return data


def _password(redis_server: RedisHandle, role: str) -> str:
    return redis_server.password_file(role).read_text().strip()


def _relayed(redis_server: RedisHandle) -> int:
    """Redis connections that came through a relay: logged in as vault, or not at all."""
    clients = redis_server.client("admin").client_list()
    return sum(1 for c in clients if c["user"] in ("vault", "default"))


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
def test_a_failed_vault_login_is_not_followed_by_another_user(
    redis_server: RedisHandle, relay: int, pipelined: bool
) -> None:
    """The review's attack: `AUTH vault wrong`, then `AUTH admin <pw>` on the same connection."""
    second = _resp("AUTH", "admin", _password(redis_server, "admin")) + _resp("ACL", "WHOAMI")
    with _connect(redis_server, relay) as conn:
        conn.sendall(_resp("AUTH", "vault", "wrong") + (second if pipelined else b""))
        if not pipelined:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                conn.recv(4096)  # Nothing: the relay closes without passing on Redis's refusal.
                conn.sendall(second)
        answer = _read_all(conn)
    assert answer == b""  # No -WRONGPASS, no +OK, no "admin".


def test_the_vault_login_goes_through(redis_server: RedisHandle, relay: int) -> None:
    with _connect(redis_server, relay) as conn:
        conn.sendall(_resp("AUTH", "vault", _password(redis_server, "vault")))
        assert conn.recv(100) == b"+OK\r\n"
        conn.sendall(_resp("ACL", "WHOAMI"))
        assert conn.recv(100) == b"$5\r\nvault\r\n"


@pytest.mark.parametrize(
    "first",
    [b"", b"*3\r\n$4\r\nAUTH\r\n", _resp("AUTH", "vault", "wrong")],
    ids=["silent", "half-a-command", "wrong-password"],
)
def test_held_connections_without_the_password_cost_redis_nothing(
    redis_server: RedisHandle, relay: int, first: bytes
) -> None:
    before = _relayed(redis_server)
    conns = [_connect(redis_server, relay) for _ in range(CAP)]
    try:
        for conn in conns:
            conn.sendall(first)
        # Each is closed by the relay within its login deadline, and Redis is back where it was.
        started = time.monotonic()
        assert [_read_all(conn) for conn in conns] == [b""] * CAP
        assert time.monotonic() - started < LOGIN + 2
        _wait(lambda: _relayed(redis_server) <= before, 5, "Redis kept the relay's clients")
    finally:
        for conn in conns:
            conn.close()


def test_the_cap_holds(redis_server: RedisHandle, relay: int) -> None:
    login = _resp("AUTH", "vault", _password(redis_server, "vault"))
    before = _relayed(redis_server)
    held = [_connect(redis_server, relay) for _ in range(CAP)]
    try:
        for conn in held:
            conn.sendall(login)
            assert conn.recv(100) == b"+OK\r\n"
        assert _relayed(redis_server) == before + CAP
        with _connect(redis_server, relay) as extra:
            extra.sendall(login)
            assert _read_all(extra) == b""  # Over the cap: closed, even with the password.
        assert _relayed(redis_server) == before + CAP
        held.pop().close()
        # A slot is free again once the relay has seen the close.
        _wait(lambda: _logs_in(redis_server, relay, login), 5, "no slot freed")
    finally:
        for conn in held:
            conn.close()


def _logs_in(redis_server: RedisHandle, port: int, login: bytes) -> bool:
    with _connect(redis_server, port) as conn:
        conn.sendall(login)
        return _read_all_until_ok(conn)


def _read_all_until_ok(conn: ssl.SSLSocket) -> bool:
    with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
        return conn.recv(100) == b"+OK\r\n"
    return False


def test_an_idle_logged_in_connection_is_closed(redis_server: RedisHandle, relay: int) -> None:
    before = _relayed(redis_server)
    with _connect(redis_server, relay) as conn:
        conn.sendall(_resp("AUTH", "vault", _password(redis_server, "vault")))
        assert conn.recv(100) == b"+OK\r\n"
        for _ in range(3):  # Activity keeps it open past the idle limit...
            time.sleep(IDLE / 2)
            conn.sendall(_resp("PING"))
            assert conn.recv(100) == b"+PONG\r\n"
        started = time.monotonic()
        assert _read_all(conn) == b""  # ...silence closes it.
        assert IDLE - 0.5 < time.monotonic() - started < IDLE + 2
    _wait(lambda: _relayed(redis_server) <= before, 5, "Redis kept the relay's client")


def test_the_stack_relays_defaults_are_bounded() -> None:
    assert LOGIN_SECONDS <= 5 and MAX_CONNECTIONS <= 32
