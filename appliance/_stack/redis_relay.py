"""A loopback TLS relay that lets OpenBao's Redis database plugin reach a Redis that requires
client certificates.

The plugin (`redis-database-plugin`) speaks TLS but cannot present a client certificate (its
configuration has `tls`, `insecure_tls` and `ca_cert` only); our Redis runs with
`tls-auth-clients yes` on its one TLS port, and making certificates optional there would drop that
layer for every user. So the plugin connects here instead (SECURITY.md says why no other way
was taken). The relay serves TLS with the stack's server certificate and lets a connection reach
Redis, with the `vault` client certificate, only once Redis has accepted it as the `vault` user:

1. the connection's first command must be `AUTH vault PASSWORD` (what the plugin sends), whole
   within a few KiB; anything else is closed before a byte reaches Redis;
2. the relay sends that one command upstream and reads Redis's reply: anything but `+OK` closes
   both sides (Redis keeps a connection open after a failed AUTH, so forwarding blindly would
   let a second `AUTH admin ...` through on our certificate);
3. only then are the two sides spliced.

A connection must get through 1 and 2 within `LOGIN_SECONDS` of its TLS handshake (itself bounded
the same way), a logged-in one silent both ways for `IDLE_SECONDS` is closed, and at most
`MAX_CONNECTIONS` are open at once (the rest are closed at accept): holding relay connections
without the vault password costs Redis nothing, and holding them with it is bounded.

    python -m appliance._stack.redis_relay LISTEN_PORT REDIS_PORT TLS_DIR
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from pathlib import Path

from ..errors import ApplianceError
from .pki import Pki, write_file
from .procs import (
    StackError,
    free_port,
    read_pid_file,
    start_detached,
    stop_by_pid_file,
    wait_for_port,
)
from .shared_dirs import NotRegularFile, read_regular
from .users import RunAs

HOST = "127.0.0.1"
RELAYED_USER = b"vault"
#: The first command must arrive whole within this many bytes.
_FIRST_COMMAND_LIMIT = 4096
#: From accept to Redis's `+OK` (the TLS handshake gets as long again).
LOGIN_SECONDS = 5.0
#: A logged-in connection with no byte either way for this long is closed. The plugin's pool
#: reconnects on its own; its connections are used at each lease creation or deletion.
IDLE_SECONDS = 120.0
#: Connections open at once, logged in or not. The plugin keeps a pool of a few.
MAX_CONNECTIONS = 16
_ACCEPTED = b"+OK\r\n"


class Refused(ApplianceError):
    """Raised when a connection does not log in as the relayed user."""

    code, title = "relay_refused", "Relay refused the connection"


_CLOSED = (
    Refused,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    TimeoutError,
    OSError,
    ssl.SSLError,
    ValueError,
)


async def read_command(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    """One RESP array of bulk strings: its items and its raw bytes; raise Refused otherwise."""
    raw = bytearray()

    async def line() -> bytes:
        data = await reader.readuntil(b"\r\n")
        raw.extend(data)
        if len(raw) > _FIRST_COMMAND_LIMIT:
            raise Refused("first command too long")
        return data[:-2]

    header = await line()
    if not header.startswith(b"*") or not header[1:].isdigit():
        raise Refused("not a RESP array")
    items = []
    for _ in range(int(header[1:])):
        size = await line()
        if not size.startswith(b"$") or not size[1:].isdigit():
            raise Refused("not a bulk string")
        length = int(size[1:])
        if len(raw) + length + 2 > _FIRST_COMMAND_LIMIT:
            raise Refused("first command too long")
        data = await reader.readexactly(length + 2)
        raw.extend(data)
        items.append(data[:-2])
    return items, bytes(raw)


def logs_in_as_relayed_user(command: list[bytes]) -> bool:
    """True for `AUTH vault PASSWORD`, the plugin's login, and nothing else.

    `HELLO ... AUTH` is refused: its success reply is a map, not `+OK`, and the plugin does not
    send it; one accepted form keeps the check of Redis's answer exact.
    """
    return len(command) == 3 and command[0].upper() == b"AUTH" and command[1] == RELAYED_USER


class Relay:
    """The relay's listener, its upstream TLS settings and its open connections."""

    def __init__(
        self,
        redis_port: int,
        pki: Pki,
        *,
        max_connections: int = MAX_CONNECTIONS,
        login_seconds: float = LOGIN_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.redis_port = redis_port
        self.max_connections = max_connections
        self.login_seconds = login_seconds
        self.idle_seconds = idle_seconds
        self.open = 0
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(pki.server_cert, pki.server_key)
        self.upstream_tls = ssl.create_default_context(cafile=str(pki.ca))
        cert, key = pki.client("vault")
        self.upstream_tls.load_cert_chain(cert, key)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: refused at the cap, else logged in, then spliced."""
        if self.open >= self.max_connections:
            await _close(writer)
            return
        self.open += 1
        try:
            try:
                login = self._login(reader, writer)
                upstream = await asyncio.wait_for(login, self.login_seconds)
            except _CLOSED:
                await _close(writer)
                return
            await _Splice(self.idle_seconds).run((reader, writer), upstream)
        finally:
            self.open -= 1

    async def _login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Forward the first command only if it is the vault login, and return the upstream
        connection only if Redis answered `+OK`; raise (closing upstream) otherwise."""
        command, raw = await read_command(reader)
        if not logs_in_as_relayed_user(command):
            raise Refused("not a login as the relayed user")
        up_reader, up_writer = await asyncio.open_connection(
            HOST, self.redis_port, ssl=self.upstream_tls, server_hostname=HOST
        )
        try:
            up_writer.write(raw)
            await up_writer.drain()
            reply = await up_reader.readuntil(b"\r\n")
            if reply != _ACCEPTED:
                raise Refused("Redis did not accept the login")
        except BaseException:
            await _close(up_writer)
            raise
        writer.write(reply)
        await writer.drain()
        return up_reader, up_writer

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(
            self.handle, HOST, port, ssl=self.server_tls, ssl_handshake_timeout=self.login_seconds
        )
        async with server:
            await server.serve_forever()


class _Splice:
    """Copy bytes both ways until either side closes or both are silent for `idle` seconds."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.last = asyncio.get_running_loop().time()

    async def run(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        tasks = [
            asyncio.ensure_future(self._pipe(client[0], upstream[1])),
            asyncio.ensure_future(self._pipe(upstream[0], client[1])),
            asyncio.ensure_future(self._watch()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await _close(client[1])
            await _close(upstream[1])

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await source.read(65536):
                self.last = asyncio.get_running_loop().time()
                sink.write(data)
                await sink.drain()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while (left := self.last + self.idle - loop.time()) > 0:
            await asyncio.sleep(left)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a stream without waiting long for a peer that does not answer."""
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, RuntimeError):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)


def relay_port(state_dir: Path) -> int:
    """The relay's port: picked free on first start, then kept (OpenBao's config names it)."""
    path = state_dir / "redis" / "relay.json"
    try:
        recorded = read_regular(path)  # Redis's user's directory: never through a symlink.
    except NotRegularFile as exc:
        raise StackError(f"{exc}: remove it (the relay's port is picked again)") from None
    if recorded is not None:
        return int(json.loads(recorded)["port"])
    port = free_port(HOST)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(path, json.dumps({"port": port}).encode())  # Redis's user's directory.
    return port


def relay_argv(state_dir: Path, redis_port: int, pki: Pki) -> list[str]:
    """The relay's command line: on its kept port, in front of Redis on `redis_port`."""
    port = relay_port(state_dir)
    return [
        sys.executable,
        "-m",
        "appliance._stack.redis_relay",
        str(port),
        str(redis_port),
        str(pki.dir),
    ]


def relay_env() -> dict[str, str]:
    """The relay's whole environment."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def start_relay(state_dir: Path, redis_port: int, pki: Pki, run_as: RunAs | None = None) -> int:
    """Start this state's relay (idempotent) and return the port it listens on."""
    port = relay_port(state_dir)
    workdir = state_dir / "redis"
    pid_file = workdir / "relay.pid"
    if read_pid_file(pid_file) is not None:
        return port
    pid = start_detached(
        relay_argv(state_dir, redis_port, pki),
        log_file=workdir / "relay.log",
        pid_file=pid_file,
        env=relay_env(),
        cwd=workdir,
        run_as=run_as,
    )
    try:
        wait_for_port(HOST, port, pid=pid)
    except StackError as exc:
        stop_relay(state_dir)
        raise StackError(f"{exc}; see {workdir / 'relay.log'}") from exc
    return port


def stop_relay(state_dir: Path) -> bool:
    """Stop this state's relay if it runs; True when it was running."""
    return stop_by_pid_file(state_dir / "redis" / "relay.pid")


def main(argv: list[str]) -> None:
    listen_port, redis_port, tls_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    asyncio.run(Relay(redis_port, Pki(tls_dir)).serve(listen_port))


if __name__ == "__main__":
    main(sys.argv[1:])
